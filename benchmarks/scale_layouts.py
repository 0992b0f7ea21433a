"""The Llama-70B-shaped state dict and its FSDP, FSDP x TP and FSDP x TP x PP layouts, as descriptors.

No tensor is built: each rank's state dict is described the way
`checkpoint.state.descriptors` describes live DTensors (key, dtype, global shape,
`Layout`), so thousands of ranks are simulated in one process. Shapes:
80 layers, hidden 8192, MLP 28672, 8 KV heads of 128, vocabulary 128256;
model in bfloat16 plus AdamW `exp_avg`/`exp_avg_sq` in float32:
723 x 3 = 2,169 tensors.

TP follows torchtitan's plan: q/k/v, gate/up, embedding and output are
column-wise (`Shard(0)` on the TP dim), o/down row-wise (`Shard(1)`), norms
replicated. FSDP2 then shards dim 0 over the data-parallel dim, which for a
TP-`Shard(0)` tensor is `_StridedShard(0, split_factor=tp)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from planners.placement import Layout, Placement, Replicate, Shard, StridedShard

LAYERS = 80
HIDDEN = 8192
MLP = 28672
KV = 1024
VOCAB = 128256
TP = 8
PP = 4

# name -> (shape, TP role)
_LAYER = {
    "attention.wq.weight": ((HIDDEN, HIDDEN), "col"),
    "attention.wk.weight": ((KV, HIDDEN), "col"),
    "attention.wv.weight": ((KV, HIDDEN), "col"),
    "attention.wo.weight": ((HIDDEN, HIDDEN), "row"),
    "feed_forward.w1.weight": ((MLP, HIDDEN), "col"),
    "feed_forward.w3.weight": ((MLP, HIDDEN), "col"),
    "feed_forward.w2.weight": ((HIDDEN, MLP), "row"),
    "attention_norm.weight": ((HIDDEN,), "norm"),
    "ffn_norm.weight": ((HIDDEN,), "norm"),
}
SCHEMES = ("fsdp", "fsdp_tp", "fsdp_tp_pp")


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    name: str
    shape: tuple[int, ...]
    role: str  # col, row, norm
    stage: int  # pipeline stage (of PP)


def parameters(layers: int = LAYERS) -> list[Param]:
    """The 723 parameters (80 layers), each with the pipeline stage that owns it (20 layers per stage)."""
    out = [Param(name="tok_embeddings.weight", shape=(VOCAB, HIDDEN), role="col", stage=0)]
    per_stage = -(-layers // PP)
    for layer in range(layers):
        for name, (shape, role) in _LAYER.items():
            out.append(Param(name=f"layers.{layer}.{name}", shape=shape, role=role, stage=layer // per_stage))
    out.append(Param(name="norm.weight", shape=(HIDDEN,), role="norm", stage=PP - 1))
    out.append(Param(name="output.weight", shape=(VOCAB, HIDDEN), role="col", stage=PP - 1))
    return out


def _placements(scheme: str, role: str) -> tuple[Placement, ...]:
    if scheme == "fsdp":
        return (Shard(dim=0),)
    if role == "col":
        return (StridedShard(dim=0, split_factor=TP), Shard(dim=0))
    if role == "row":
        return (Shard(dim=0), Shard(dim=1))
    return (Shard(dim=0), Replicate())


def supported(scheme: str, world_size: int) -> bool:
    need = {"fsdp": 1, "fsdp_tp": TP, "fsdp_tp_pp": TP * PP}[scheme]
    return world_size % need == 0 and world_size >= need


class Job:
    """Which tensors each rank of a `scheme` job of `world_size` ranks holds, as descriptors."""

    def __init__(self, scheme: str, world_size: int, *, layers: int = LAYERS) -> None:
        if not supported(scheme, world_size):
            raise ValueError(f"{scheme} needs a multiple of its model-parallel size, got {world_size}")
        self.scheme = scheme
        self.world_size = world_size
        self.stages = PP if scheme == "fsdp_tp_pp" else 1
        self.params = parameters(layers)
        per = world_size // self.stages
        shape = (per,) if scheme == "fsdp" else (per // TP, TP)
        # One rank tuple per stage mesh, shared by its layouts as one DeviceMesh would be.
        self.meshes = [(shape, tuple(range(s * per, (s + 1) * per))) for s in range(self.stages)]

    def stage_of(self, rank: int) -> int:
        return rank // (self.world_size // self.stages)

    def descriptors(self, rank: int) -> list[tuple[str, str, tuple[int, ...], Layout]]:
        """(key, dtype, global shape, layout) of every tensor `rank` holds: params, exp_avg, exp_avg_sq."""
        stage = self.stage_of(rank)
        mesh_shape, ranks = self.meshes[stage]
        out = []
        for p in self.params:
            if self.stages > 1 and p.stage != stage:
                continue
            layout = Layout(mesh_shape=mesh_shape, placements=_placements(self.scheme, p.role), ranks=ranks)
            out.append((f"model.{p.name}", "bfloat16", p.shape, layout))
            out.append((f"optim.state.{p.name}.exp_avg", "float32", p.shape, layout))
            out.append((f"optim.state.{p.name}.exp_avg_sq", "float32", p.shape, layout))
        return out

    def sample_ranks(self) -> list[int]:
        """First and last rank of every stage: the ranks whose planning is timed."""
        per = self.world_size // self.stages
        return sorted({r for s in range(self.stages) for r in (s * per, (s + 1) * per - 1)})
