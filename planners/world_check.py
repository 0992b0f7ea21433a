"""Checks that the ranks of a save agree, run by the coordinator on distinct structures only.

With structures instead of chunk lists, agreement is a property of a few
records: a key held by several structures must have one dtype, shape, kind
(plain or DTensor) and, for a DTensor, one mesh shape and placements (its
meshes may differ: sub-mesh replicas, resolved by `planners.world_layout`);
any key may live on some ranks only (a pipeline stage's layers, or its
optimizer's flattened `param_groups` values); and a DTensor key must be
held by every rank of its mesh, since that rank's box would be missing
otherwise, and each rank must sit in the meshes of its own tensors. The work grows with structures times meshes
times world size, never with chunks. Errors name keys and the lowest rank
of each structure.
"""

from __future__ import annotations

from planners.errors import InvalidStateDictError
from planners.global_plan import Mesh, RankStructure, TensorDescriptor, WorldStructure
from planners.key_check import MAX_KEYS_SHOWN, describe_keys
from planners.placement import chunk_box, coordinate_of
from planners.world_layout import key_layouts


def _layout_text(s: RankStructure, t: TensorDescriptor) -> str:
    if t.mesh is None:
        return "no mesh (a plain tensor)"
    m = s.meshes[t.mesh]
    return f"mesh {list(m.shape)} of ranks {list(m.ranks)[:8]}{'...' if len(m.ranks) > 8 else ''} placements {list(t.placements)}"


def _layout_kind(s: RankStructure, t: TensorDescriptor) -> object:
    """What must agree between two holders of a key: the mesh shape and placements, not the mesh's ranks."""
    return None if t.mesh is None else (s.meshes[t.mesh].shape, t.placements)


def check_world(world: WorldStructure) -> None:
    """Raise if the ranks' structures disagree.

    Raises:
        InvalidStateDictError: naming the key and the ranks that disagree.
    """
    _check_same_kinds(world)
    _check_same_tensors(world)
    _check_meshes(world)
    key_layouts(world)


def _check_same_kinds(world: WorldStructure) -> None:
    """A key is a tensor on every rank that has it, or on none."""
    tensor_on: dict[str, int] = {}
    for i, s in enumerate(world.structures):
        for t in s.tensors:
            tensor_on.setdefault(t.fqn, i)
    for i, s in enumerate(world.structures):
        for key in s.other_keys:
            if key in tensor_on:
                raise InvalidStateDictError(
                    f"key {key!r}: rank {world.representative(tensor_on[key])} holds a tensor, "
                    f"rank {world.representative(i)} a value; every rank must hold the same kind of leaf"
                )


def _check_same_tensors(world: WorldStructure) -> None:
    seen: dict[str, tuple[int, TensorDescriptor]] = {}
    for i, s in enumerate(world.structures):
        for t in s.tensors:
            if t.fqn not in seen:
                seen[t.fqn] = (i, t)
                continue
            j, first = seen[t.fqn]
            a, b = world.representative(j), world.representative(i)
            if (first.dtype, first.global_shape) != (t.dtype, t.global_shape):
                raise InvalidStateDictError(
                    f"key {t.fqn!r}: rank {a} has dtype {first.dtype} shape {list(first.global_shape)}, "
                    f"rank {b} has dtype {t.dtype} shape {list(t.global_shape)}"
                )
            if _layout_kind(world.structures[j], first) != _layout_kind(s, t):
                fa, fb = _layout_text(world.structures[j], first), _layout_text(s, t)
                raise InvalidStateDictError(f"key {t.fqn!r}: rank {a} has {fa}, rank {b} has {fb}")


def _check_meshes(world: WorldStructure) -> None:
    keys = [{t.fqn for t in s.tensors} for s in world.structures]
    for i, s in enumerate(world.structures):
        own = world.ranks_with(frozenset({i}))
        for m_index, mesh in enumerate(s.meshes):
            members = set(mesh.ranks)
            outside = [r for r in own if r not in members]
            on_mesh = {t.fqn for t in s.tensors if t.mesh == m_index}
            if outside:
                raise InvalidStateDictError(
                    f"key {describe_keys(on_mesh)}: rank {outside[0]} holds a DTensor on a mesh of ranks "
                    f"{sorted(members)[:MAX_KEYS_SHOWN]} that does not include it"
                )
            if any(r >= world.world_size for r in members):
                raise InvalidStateDictError(
                    f"key {describe_keys(on_mesh)}: mesh lists rank {max(members)} in a world of {world.world_size}"
                )
            for j in sorted({world.rank_structure[r] for r in members} - {i}):
                missing = on_mesh - keys[j]
                if missing:
                    lacking = next(r for r in sorted(members) if world.rank_structure[r] == j)
                    raise InvalidStateDictError(
                        f"key {describe_keys(missing)}: rank {lacking} is in the key's DTensor mesh but lacks it, "
                        f"so {_region(s, min(missing), mesh, lacking)} would be missing from the checkpoint "
                        f"(rank {world.representative(i)} holds it); every rank of a DTensor's mesh must save it"
                    )


def _region(s: RankStructure, fqn: str, mesh: Mesh, rank: int) -> str:
    """The box of `fqn` that `rank` holds by its position in `mesh`, in words."""
    t = next(t for t in s.tensors if t.fqn == fqn)
    coord = coordinate_of(list(mesh.ranks).index(rank), mesh.shape)
    box = chunk_box(t.global_shape, mesh.shape, coord, t.placements)
    return f"its region of {fqn!r} at offsets {list(box.offsets)} sizes {list(box.sizes)}"
