"""torchtitan's own parallelisms on 4 gloo ranks, saved by its manager and resharded onto 3.

- `parallelize_llama` with `data_parallel_shard_degree=2, tensor_parallel_degree=2`
  (`spmd_backend="partial_dtensor"`) shards the debug model with FSDP2 over each TP coordinate's
  `dp_shard` sub-mesh (ranks {0, 2} and {1, 3}): every parameter is held twice, once per sub-mesh.
- `pipeline_llm` with `pipeline_parallel_degree=2, data_parallel_shard_degree=2` splits the model
  into two stages, each FSDP2-sharded over its own 2 ranks.

torchtitan cannot run a backward pass on CPU (see test_integration_torchtitan.py), so the optimizer
steps on gradients computed from the parameters. `ShardsafeCheckpointManager` saves two steps; 3
ranks of plain FSDP2 (the existing test's layout) load the last one exactly: model, AdamW state,
LR schedule, data loader position and step.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.frameworks import framework

framework("torchtitan", extra="torchtitan")

from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.distributed.pipeline_parallel import pipeline_llm  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402
from torchtitan.models.llama3.parallelize import parallelize_llama  # noqa: E402

from checkpoint.integrations.torchtitan import ShardsafeCheckpointManager  # noqa: E402
from checkpoint.testing.ranks import run_ranks  # noqa: E402
from tests.fsdp_workers import assert_same  # noqa: E402
from tests.test_integration_torchtitan import Loader, TrainState, _build, _snapshot  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def _torchtitan_parallel(world_size: int, root: str, layout: str) -> tuple:
    """torchtitan's model parts for `layout`: "dp_tp" (parallelize_llama) or "pp_fsdp" (its pipeline split)."""
    import torchtitan.distributed.parallel_dims as parallel_dims_module

    parallel_dims_module.device_type = "cpu"  # torchtitan picks the accelerator's type; gloo here
    degrees = {"dp_tp": {"tensor_parallel_degree": 2}, "pp_fsdp": {"pipeline_parallel_degree": 2}}[layout]
    parallelism = ParallelismConfig(
        data_parallel_shard_degree=2,
        spmd_backend="partial_dtensor",
        pipeline_parallel_schedule="1F1B",
        **degrees,
    )
    dims = ParallelDims.from_config(parallelism, world_size)
    dims.build_mesh()
    model_config = model_registry("debugmodel").model
    model_config.layers = model_config.layers[:2]
    with torch.device("meta"):
        model = model_config.build()
    common = dict(
        parallel_dims=dims,
        training=TrainingConfig(local_batch_size=2),
        parallelism=parallelism,
        compile_config=CompileConfig(),
        ac_config=None,
        dump_folder=root,
    )
    if layout == "pp_fsdp":
        _, parts, _, _ = pipeline_llm(
            model,
            **common,
            device=torch.device("cpu"),
            model_config=model_config,
            parallelize_fn=parallelize_llama,
            loss_fn=lambda out, labels: (out - labels).sum(),  # never called: no CPU backward
        )
    else:
        parts = [parallelize_llama(model, **common)]
    torch.manual_seed(0)  # every replica and stage initialises as torchtitan's seeded init does
    for part in parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            part.init_weights(buffer_device=torch.device("cpu"))
    model = parts[0]
    optimizers = default_adamw(lr=1e-3).build(model_parts=parts)
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8).build(
        optimizers=optimizers, training_steps=10
    )
    train_state, loader = TrainState(), Loader()
    manager = ShardsafeCheckpointManager.Config(
        enable=True, folder="checkpoint", interval=1, keep_latest_k=2
    ).build(
        dataloader=loader,
        model_parts=parts,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
        base_folder=root,
    )
    return model, optimizers, lr_schedulers, train_state, loader, manager


def _train_and_save(rank: int, world_size: int, root: str, layout: str) -> dict:
    model, optimizers, lr_schedulers, train_state, loader, manager = _torchtitan_parallel(
        world_size, root, layout
    )
    meshes = {tuple(p.device_mesh.mesh.flatten().tolist()) for p in model.parameters()}
    for step in range(1, 3):
        for p in model.parameters():
            p.grad = torch.sin(p.detach() * step)
        optimizers.step()
        lr_schedulers.step()
        train_state.step, loader.position = step, step * 8
        assert manager.save(step) is True
    manager.maybe_wait_for_saving()
    snapshot = _snapshot(model, optimizers, lr_schedulers, train_state, loader)
    manager.close()
    stages: list = [None] * world_size  # a pipeline stage's snapshot holds its own keys: merge them
    torch.distributed.all_gather_object(stages, snapshot)
    for other in stages:
        snapshot["model"].update(other["model"])
        snapshot["optim"].update(other["optim"])
    return {"snapshot": snapshot, "meshes": sorted(meshes)}


def _resume(rank: int, world_size: int, root: str, expected: dict) -> str:
    """Plain FSDP2 over 3 ranks (the existing torchtitan test's layout) loads the last step exactly."""
    parts = _build(world_size, root, seed=123)  # other initial values: the load must overwrite all
    manager = parts[-1]
    assert manager.load() is True
    got = _snapshot(*parts[:-1])
    for key in ("model", "optim"):
        assert_same(expected[key], got[key], key)
    assert got["lr"] == expected["lr"]
    assert (got["step"], got["position"]) == (2, 16)
    manager.close()
    return "ok"


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "meshes"),
    [
        # dp_shard 2 x tp 2: each TP coordinate's parameters on its own dp_shard sub-mesh (replicas)
        ("dp_tp", {0: [(0, 2)], 1: [(1, 3)], 2: [(0, 2)], 3: [(1, 3)]}),
        # pp 2 x dp_shard 2: each stage's layers on its own 2 ranks
        ("pp_fsdp", {0: [(0, 1)], 1: [(0, 1)], 2: [(2, 3)], 3: [(2, 3)]}),
    ],
)
def test_torchtitan_layouts_save_on_4_and_load_on_3(tmp_path, layout, meshes):
    root = str(tmp_path / "run")
    first = run_ranks(_train_and_save, 4, root, layout, timeout_secs=300)
    assert {r: f["meshes"] for r, f in enumerate(first)} == meshes
    assert sorted(os.listdir(os.path.join(root, "checkpoint"))) == ["step-000000001", "step-000000002"]
    assert run_ranks(_resume, 3, root, first[0]["snapshot"], timeout_secs=300) == ["ok"] * 3
