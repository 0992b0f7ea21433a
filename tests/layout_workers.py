"""Rank functions of the layout matrix (module level, so spawned ranks can import them).

Every layout holds the same reference state: the parameters of `reference_model()` under `model`,
plus `experts` (a 3-D tensor, one row per expert) and, for the pipeline layout, a plain tensor on
stage 0 only. Each source layout saves it with shardsafe and with DCP; each target layout loads
both and returns full tensors, so the test compares shardsafe, DCP and the reference exactly.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import checkpoint

# Source layouts on 4 ranks (see `build`); targets add "fsdp" on any world size and "one" (one process).
SOURCES = ("submesh", "pp_fsdp", "hsdp", "moe", "pp_fsdp_tp")
EXPERTS = (4, 6, 5)
STAGE0_TABLE = (7, 3)


def reference_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 6))


def reference_state() -> dict:
    """The full state every layout holds, as plain tensors."""
    g = torch.Generator().manual_seed(1)
    return {
        "model": {k: v.detach().clone() for k, v in reference_model().state_dict().items()},
        "experts": torch.randn(*EXPERTS, generator=g),
        "stage0_table": torch.arange(21, dtype=torch.int64).reshape(STAGE0_TABLE) * 3,
    }


def _stage(model: nn.Sequential, layers: tuple[str, ...]) -> nn.ModuleDict:
    """A pipeline stage keeping the model's own names for its layers (torchtitan's split does the same)."""
    return nn.ModuleDict({name: model[int(name)] for name in layers})


def _fresh(model: nn.Module) -> None:
    """Overwrite every parameter, so that a load must fill all of them."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-7.0)


def build(layout: str, rank: int, world_size: int, *, fresh: bool) -> dict:
    """The state dict of `layout` on this rank: reference values, or -7 everywhere when `fresh`."""
    ref = reference_state()
    model = reference_model()
    experts = ref["experts"].clone()
    state: dict = {}
    if layout == "submesh":  # FSDP2 over dp of a 2x2 dp x tp mesh; TP on layer 0 only
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel()})
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh["dp"])
        state["experts"] = distribute_tensor(experts, mesh["dp"], [Shard(0)])
        module: nn.Module = model
    elif layout in ("pp_fsdp", "pp_fsdp_tp"):  # 2 stages x 2 ranks; stage 0 also holds a plain tensor
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        stage = rank // 2
        module = _stage(model, ("0", "2") if stage == 0 else ("4",))
        if (
            layout == "pp_fsdp_tp" and stage == 0
        ):  # stage 0's 2 ranks do TP (colwise, rowwise), stage 1's FSDP
            parallelize_module(module, mesh["dp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        else:
            for layer in module.values():
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh["dp"])
        if stage == 0:
            state["stage0_table"] = ref["stage0_table"].clone()
        else:
            state["experts"] = distribute_tensor(experts, mesh["dp"], [Shard(0)])
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        state["experts"] = distribute_tensor(experts, mesh, [Shard(0), Shard(1)])
        module = model
    elif layout == "moe":  # dense layers on the 4-rank dp mesh, experts on an ep sub-mesh of (2 x 2)
        dp = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
        ep = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "ep"))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=dp)
        state["experts"] = distribute_tensor(experts, ep["ep"], [Shard(0)])
        module = model
    elif layout == "fsdp":  # the plain FSDP2 target, any world size
        mesh = init_device_mesh("cpu", (world_size,))
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        fully_shard(model, mesh=mesh)
        state["experts"] = distribute_tensor(experts, mesh, [Shard(0)])
        module = model
    else:
        raise ValueError(layout)
    if not layout.startswith("pp_"):
        state["stage0_table"] = ref["stage0_table"].clone()  # plain, on every rank
    if fresh:
        _fresh(module)
        for v in state.values():
            local = v.to_local() if isinstance(v, DTensor) else v
            local.fill_(-7)
    state["model"] = module.state_dict()
    return state


def full(tree: object) -> object:
    if isinstance(tree, dict):
        return {k: full(v) for k, v in tree.items()}
    if isinstance(tree, DTensor):
        return tree.full_tensor().clone()
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    return tree


def gathered(state: dict, rank: int, world_size: int) -> dict:
    """Every key of every rank's state as full tensors (a pipeline stage's keys gathered to all)."""
    mine = full(state)
    parts: list = [None] * world_size
    dist.all_gather_object(parts, mine)
    out: dict = {}
    for part in parts:
        out.setdefault("model", {}).update(part.pop("model"))
        out.update(part)
    return out


def save_sources(rank: int, world_size: int, root: str) -> dict:
    """Save every source layout with shardsafe and DCP; returns rank 0's gathered view of each."""
    ckpt = checkpoint.make_sync_checkpointer()
    seen = {}
    for layout in SOURCES:
        state = build(layout, rank, world_size, fresh=False)
        if layout == "pp_fsdp" and rank >= 2:
            state["stage1_lr"] = 0.5  # a value stage 1 holds and rank 0 does not
        ckpt.save(state, os.path.join(root, "shardsafe", layout))
        dcp.save(state, checkpoint_id=os.path.join(root, "dcp", layout))
        seen[layout] = gathered(state, rank, world_size)
        if layout == "pp_fsdp":  # the same structure again: the plan is reused, the stage's value is new
            state.update({"stage1_lr": 0.25} if rank >= 2 else {})
            ckpt.save(state, os.path.join(root, "shardsafe", "pp_fsdp-again"))
            assert ckpt.last_save.plan_reused is True
    ckpt.close()
    # The pipeline layout once more through the async writer processes (the same plan, another writer).
    writer = checkpoint.make_async_checkpointer()
    _, committed = writer.save(
        build("pp_fsdp", rank, world_size, fresh=False), os.path.join(root, "async", "pp_fsdp")
    )
    committed.result()
    writer.close()
    return seen if rank == 0 else {}


def load_into(rank: int, world_size: int, root: str, target: str, sources: tuple[str, ...]) -> dict:
    """Load every source's shardsafe and DCP checkpoints into `target` (strict); full tensors per source."""
    ckpt = checkpoint.make_sync_checkpointer()
    out = {}
    for layout in sources:
        for system in ("shardsafe", "dcp"):
            state = build(target, rank, world_size, fresh=True)
            path = os.path.join(root, system, layout)
            if system == "shardsafe":
                ckpt.load(path, state_dict=state, strict=True)
            else:
                dcp.load(state, checkpoint_id=path)
            out[(layout, system)] = gathered(state, rank, world_size)
    ckpt.close()
    return out if rank == 0 else {}


def save_refused(rank: int, world_size: int, path: str, case: str) -> str:
    """A save that must fail on every rank; returns this rank's error text."""
    state = build("moe", rank, world_size, fresh=False)
    if case == "expert_left_out" and rank == 3:
        del state["experts"]  # one expert-parallel rank's experts left out
    ckpt = checkpoint.make_sync_checkpointer()
    try:
        ckpt.save(state, path)
    except Exception as e:  # the test checks the exact type and text
        return f"{type(e).__name__}: {e}"
    finally:
        ckpt.close()
    return "saved"


def save_diverging(rank: int, world_size: int, path: str) -> list[str]:
    """A plain tensor that differs between ranks, and one that does not; returns rank's warnings."""
    import warnings

    state = {"samples_seen": torch.tensor([100 + rank]), "lr_scale": torch.ones(3), "step": 5}
    ckpt = checkpoint.make_sync_checkpointer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(state, path)
    ckpt.close()
    return [str(w.message) for w in caught if "differ between ranks" in str(w.message)]
