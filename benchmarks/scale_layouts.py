"""The Llama-70B-shaped state dict and its FSDP, FSDP x TP, FSDP x TP x PP and 3-D layouts, as descriptors.

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

`pp_tp_fsdp_sub` is the 3-D job of issue 24: PP 8 stages x TP 8 x FSDP, and
the parameters TP does not touch (the norms) FSDP-sharded over the `dp`
sub-mesh of their TP coordinate only, so each of the 8 TP coordinates of a
stage holds them on its own sub-mesh (sub-mesh replicas): 64 distinct
structures, whose keys the planner folds into one mesh per stage.
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
SCHEMES = ("fsdp", "fsdp_tp", "fsdp_tp_pp", "pp_tp_fsdp_sub")
# Pipeline stages of each scheme.
STAGES = {"fsdp": 1, "fsdp_tp": 1, "fsdp_tp_pp": PP, "pp_tp_fsdp_sub": 8}


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    name: str
    shape: tuple[int, ...]
    role: str  # col, row, norm
    stage: int  # pipeline stage (of PP)


def parameters(layers: int = LAYERS, stages: int = PP) -> list[Param]:
    """The 723 parameters (80 layers), each with the pipeline stage that owns it (layers split evenly)."""
    out = [Param(name="tok_embeddings.weight", shape=(VOCAB, HIDDEN), role="col", stage=0)]
    per_stage = -(-layers // stages)
    for layer in range(layers):
        for name, (shape, role) in _LAYER.items():
            out.append(Param(name=f"layers.{layer}.{name}", shape=shape, role=role, stage=layer // per_stage))
    out.append(Param(name="norm.weight", shape=(HIDDEN,), role="norm", stage=stages - 1))
    out.append(Param(name="output.weight", shape=(VOCAB, HIDDEN), role="col", stage=stages - 1))
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
    need = {"fsdp": 1, "fsdp_tp": TP, "fsdp_tp_pp": TP * PP, "pp_tp_fsdp_sub": TP * 8}[scheme]
    return world_size % need == 0 and world_size >= need


class Job:
    """Which tensors each rank of a `scheme` job of `world_size` ranks holds, as descriptors."""

    def __init__(self, scheme: str, world_size: int, *, layers: int = LAYERS) -> None:
        if not supported(scheme, world_size):
            raise ValueError(f"{scheme} needs a multiple of its model-parallel size, got {world_size}")
        self.scheme = scheme
        self.world_size = world_size
        self.stages = STAGES[scheme]
        self.params = parameters(layers, self.stages if self.stages > 1 else PP)
        per = world_size // self.stages
        shape = (per,) if scheme == "fsdp" else (per // TP, TP)
        # One rank tuple per stage mesh, shared by its layouts as one DeviceMesh would be.
        self.meshes = [(shape, tuple(range(s * per, (s + 1) * per))) for s in range(self.stages)]
        # pp_tp_fsdp_sub: per (stage, TP coordinate), the dp sub-mesh (every TP-th rank of the stage).
        self.sub_meshes = {
            (s, t): tuple(range(s * per + t, (s + 1) * per, TP))
            for s in range(self.stages)
            for t in range(TP if scheme == "pp_tp_fsdp_sub" else 0)
        }

    def stage_of(self, rank: int) -> int:
        return rank // (self.world_size // self.stages)

    def structure_of_rank(self, rank: int) -> int:
        """Index of `rank`'s distinct structure: its stage, and in the sub-mesh scheme its TP coordinate."""
        if self.scheme != "pp_tp_fsdp_sub":
            return self.stage_of(rank)
        return self.stage_of(rank) * TP + rank % TP

    def representatives(self) -> list[int]:
        """The lowest rank of each distinct structure, in structure order."""
        first: dict[int, int] = {}
        for r in range(self.world_size):
            first.setdefault(self.structure_of_rank(r), r)
        return [first[i] for i in sorted(first)]

    def descriptors(self, rank: int) -> list[tuple[str, str, tuple[int, ...], Layout]]:
        """(key, dtype, global shape, layout) of every tensor `rank` holds: params, exp_avg, exp_avg_sq."""
        stage = self.stage_of(rank)
        mesh_shape, ranks = self.meshes[stage]
        out = []
        for p in self.params:
            if self.stages > 1 and p.stage != stage:
                continue
            if self.scheme == "pp_tp_fsdp_sub" and p.role == "norm":
                sub = self.sub_meshes[(stage, rank % TP)]
                layout = Layout(mesh_shape=(len(sub),), placements=(Shard(dim=0),), ranks=sub)
            else:
                layout = Layout(
                    mesh_shape=mesh_shape, placements=_placements(self.scheme, p.role), ranks=ranks
                )
            out.append((f"model.{p.name}", "bfloat16", p.shape, layout))
            out.append((f"optim.state.{p.name}.exp_avg", "float32", p.shape, layout))
            out.append((f"optim.state.{p.name}.exp_avg_sq", "float32", p.shape, layout))
        return out

    def sample_ranks(self) -> list[int]:
        """First and last rank of every stage: the ranks whose planning is timed."""
        per = self.world_size // self.stages
        return sorted({r for s in range(self.stages) for r in (s * per, (s + 1) * per - 1)})
