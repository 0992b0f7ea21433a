"""Step 1 of the save protocol, on each trainer rank: live tensors in, a local plan out.

This is the one place where the save reads torch objects to plan: each
tensor leaf of the flattened state dict (`checkpoint.state.flatten`) becomes a
plain `planners.save_plan.LocalChunk` (dtype name, global shape, the box
this rank holds, its bytes, its layout), and the pure
`planners.save_plan.plan_local` turns those into the rank's `LocalPlan`.
Non-tensor leaves are encoded to typed JSON here too (`planners.values`).
The tensors themselves stay in the returned `LocalSave`, for the write (sync)
or the staging copy (async). Nothing here does I/O or joins an exchange;
`checkpoint.save.protocol` does the rest of the protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoint.state.flatten import FlatStateDict, flatten_state_dict
from planners.boxes import full_box
from planners.dtypes import dtype_name
from planners.errors import InvalidStateDictError
from planners.placement import Layout
from planners.save_plan import LocalChunk, LocalPlan, chunk_layouts, plan_local
from planners.union import MAX_COMPARED_BYTES, MAX_COMPARED_TOTAL_BYTES
from planners.values import JSON, encode_value


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalSave:
    """One rank's view of a save: its plan, the tensors behind it, its encoded values."""

    plan: LocalPlan
    tensors: dict[str, torch.Tensor]  # fqn -> this rank's chunk (or rank-local tensor)
    values: dict[str, JSON]
    rank_local_values: dict[str, JSON]
    structure: JSON
    # The plan's digest, computed once: the agreement and the async stager's guess both compare it, and
    # hashing the plan's repr costs about 50 ms for 10,000 keys.
    fingerprint: str
    layouts: dict[str, Layout | None] = field(default_factory=dict)  # fqn -> DTensor layout (None: plain)


def describe_local(flat: FlatStateDict, rank: int, *, allow_pickle: bool) -> LocalSave:
    """Local plan and encoded values of one rank.

    Raises:
        InvalidStateDictError: a tensor on the meta device, or a dtype safetensors cannot store.
        TypeError, ValueError: what `planners.values.encode_value` raises for a value it cannot encode.
    """
    tensors = _held_tensors(flat)
    _refuse_meta(tensors)
    chunks = _local_chunks(flat)
    rank_local_values = {
        fqn: encode_value(h.value, key=fqn, allow_pickle=allow_pickle)
        for fqn, h in flat.rank_local.items()
        if not isinstance(h.value, torch.Tensor)
    }
    values = {fqn: encode_value(v, key=fqn, allow_pickle=allow_pickle) for fqn, v in flat.values.items()}
    plan = plan_local(rank, chunks, other_keys=[*flat.values, *rank_local_values])
    return LocalSave(
        plan=plan,
        fingerprint=plan.fingerprint(),
        tensors=tensors,
        values=values,
        rank_local_values=rank_local_values,
        structure=flat.structure,
        layouts=chunk_layouts(chunks),
    )


def value_digests(local: LocalSave) -> dict[str, str]:
    """Digests of this rank's plain tensors small enough to compare across ranks (`planners.union`).

    A plain tensor is taken as replicated; comparing digests is how a rank-dependent one (a sample
    counter, an RNG state, an unseeded module) is caught. Only tensors up to `MAX_COMPARED_BYTES`,
    and at most `MAX_COMPARED_TOTAL_BYTES` per rank, are hashed, and only when the plan is made
    (not on a save that reuses it): each costs a host copy on a GPU.
    """
    out: dict[str, str] = {}
    budget = MAX_COMPARED_TOTAL_BYTES
    for fqn, layout in local.layouts.items():
        if layout is not None:
            continue
        t = local.tensors[fqn]
        nbytes = _nbytes(t)
        if nbytes > MAX_COMPARED_BYTES or nbytes > budget:
            continue
        budget -= nbytes
        try:
            raw = t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes()
        except (RuntimeError, TypeError):  # a layout with no flat byte view: not compared, still saved
            continue
        out[fqn] = hashlib.blake2b(raw, digest_size=16).hexdigest()
    return out


def describe_or_error(state_dict: Any, rank: int, *, allow_pickle: bool) -> LocalSave | BaseException:
    """`describe_local` of a state dict, or the error it raised.

    The error is not raised here: it travels through the plan exchange, so the
    other ranks fail with it instead of waiting for this one.
    """
    try:
        return describe_local(flatten_state_dict(state_dict), rank, allow_pickle=allow_pickle)
    except Exception as e:
        return e


def _held_tensors(flat: FlatStateDict) -> dict[str, torch.Tensor]:
    """Every tensor this rank saves, by key: its chunk of each tensor key, then its rank-local tensors."""
    tensors = {leaf.fqn: leaf.local for leaf in flat.tensors.values()}
    tensors.update((fqn, h.value) for fqn, h in flat.rank_local.items() if isinstance(h.value, torch.Tensor))
    return tensors


def _refuse_meta(tensors: dict[str, torch.Tensor]) -> None:
    for fqn, t in tensors.items():
        if t.device.type == "meta":
            raise InvalidStateDictError(
                f"key {fqn!r}: tensor is on the meta device and holds no data; materialise it before saving"
            )


def _local_chunks(flat: FlatStateDict) -> list[LocalChunk]:
    """The plain descriptors of this rank's tensors, tensor keys first, then rank-local tensors."""
    chunks = [
        LocalChunk(
            fqn=leaf.fqn,
            dtype=dtype_name(leaf.local.dtype, key=leaf.fqn),
            global_shape=leaf.global_shape,
            box=leaf.box,
            nbytes=_nbytes(leaf.local),
            layout=leaf.layout,
        )
        for leaf in flat.tensors.values()
    ]
    for fqn, holder in flat.rank_local.items():
        t = holder.value
        if isinstance(t, torch.Tensor):
            shape = tuple(t.shape)
            chunks.append(
                LocalChunk(
                    fqn=fqn,
                    dtype=dtype_name(t.dtype, key=fqn),
                    global_shape=shape,
                    box=full_box(shape),
                    nbytes=_nbytes(t),
                    rank_local=True,
                )
            )
    return chunks


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
