"""Flattening a state dict into keyed leaves, and putting values back.

A state dict is nested dicts, lists and tuples whose leaves are tensors,
DTensors, plain values, `RankLocal` wrappers, or objects with
`state_dict()`/`load_state_dict()` (models, optimizers, torchtitan-style
wrappers). Flattening gives every leaf a fully qualified name (FQN: the path
joined with dots) and records the nesting as a small JSON tree, so a load
without a target can rebuild the same nesting.

On save, a container with no tensor anywhere below it is one value leaf
(stored as typed JSON). A load target is flattened with `for_load=True`:
non-empty dicts are then always walked, so a target asks for single keys of
a saved dict (`{"metadata": {"epoch": None}}` gets `epoch` alone), while an
empty dict, or a list or tuple with no tensor inside, stays one leaf that
takes the saved value whole, whatever its length, as an optimizer's
`param_groups` (or a fresh optimizer's empty `state`) should.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from checkpoint.state.descriptors import dtensor_layout
from planners.boxes import Box, full_box
from planners.errors import InvalidStateDictError
from planners.placement import Layout
from planners.values import JSON

Path = tuple[Any, ...]


class RankLocal:
    """Marks a value that belongs to the rank that saves it.

    Plain tensors and values are taken as replicated and written once; wrap
    per-rank state (RNG state, data loader position) in `RankLocal` and each
    rank gets its own value back on load. That needs the same world size on
    load; otherwise `RankLocalError` is raised.

    Example:
        >>> state = {"rng": RankLocal(torch.get_rng_state())}
        >>> # after load, state["rng"].value holds this rank's saved value
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"RankLocal({self.value!r})"


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorLeaf:
    """This rank's chunk of one (possibly distributed) tensor."""

    fqn: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    box: Box
    layout: Layout | None = None  # None: a plain tensor, held whole by every rank


@dataclass(frozen=True, slots=True, kw_only=True)
class FlatStateDict:
    """A flattened state dict; `structure` is the JSON nesting tree."""

    tensors: dict[str, TensorLeaf]
    values: dict[str, Any]
    rank_local: dict[str, RankLocal]
    structure: JSON
    # Stateful objects met on the way, by path, with the dict their state_dict() gave.
    stateful: dict[Path, tuple[Any, Any]] = field(default_factory=dict)
    # The path of each value leaf (a key with dots in it has no other unambiguous spelling).
    value_paths: dict[str, Path] = field(default_factory=dict)
    # Flattened as a load target: every dict walked (see the module docstring).
    for_load: bool = False


def is_stateful(obj: Any) -> bool:
    return (
        not isinstance(obj, (torch.Tensor, Mapping, list, tuple))
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def fqn_of(path: Path) -> str:
    return ".".join(str(p) for p in path)


def flatten_state_dict(state_dict: Any, *, for_load: bool = False) -> FlatStateDict:
    """Flatten `state_dict` (calls `state_dict()` on stateful objects).

    Args:
        state_dict: what to save, or the target of a load.
        for_load: flatten a load target: walk every dict, even one without tensors.
    """
    flat = FlatStateDict(tensors={}, values={}, rank_local={}, structure=None, for_load=for_load)
    paths: dict[str, Path] = {}
    structure = _walk(state_dict, (), flat, paths)
    return FlatStateDict(
        tensors=flat.tensors,
        values=flat.values,
        rank_local=flat.rank_local,
        structure=structure,
        stateful=flat.stateful,
        value_paths=flat.value_paths,
        for_load=for_load,
    )


def _is_walked(obj: Any, path: Path, for_load: bool) -> bool:
    """Whether a container is walked into, rather than being one value leaf."""
    if not isinstance(obj, (Mapping, list, tuple)):
        return False
    if not path or contains_tensor(obj):
        return True
    # An empty dict asks for no key in particular: it stays one leaf and takes the saved value whole
    # (a fresh optimizer's empty `state` gets the saved state).
    return for_load and isinstance(obj, Mapping) and len(obj) > 0 and all(type(k) in (str, int) for k in obj)


def _claim(fqn: str, path: Path, paths: dict[str, Path]) -> None:
    if fqn in paths:
        raise InvalidStateDictError(
            f"paths {list(paths[fqn])} and {list(path)} both flatten to the key {fqn!r}; rename one of them"
        )
    paths[fqn] = path


def _walk(obj: Any, path: Path, flat: FlatStateDict, paths: dict[str, Path]) -> JSON:
    fqn = fqn_of(path)
    if isinstance(obj, RankLocal):
        _claim(fqn, path, paths)
        flat.rank_local[fqn] = obj
        return {"rank_local": fqn}
    if isinstance(obj, torch.Tensor):
        _claim(fqn, path, paths)
        flat.tensors[fqn] = tensor_leaf(fqn, obj)
        return {"tensor": fqn}
    if is_stateful(obj):
        sd = obj.state_dict()
        if not isinstance(sd, Mapping):
            raise InvalidStateDictError(
                f"key {fqn!r}: {type(obj).__qualname__}.state_dict() returned {type(sd).__qualname__}, not a dict"
            )
        flat.stateful[path] = (obj, sd)
        return _walk_container(sd, path, flat, paths)
    if _is_walked(obj, path, flat.for_load):
        return _walk_container(obj, path, flat, paths)
    if not path:
        raise InvalidStateDictError(
            f"a state dict must be a dict, list or tuple, not {type(obj).__qualname__}"
        )
    _claim(fqn, path, paths)
    flat.values[fqn] = obj
    flat.value_paths[fqn] = path
    return {"value": fqn}


def _walk_container(obj: Any, path: Path, flat: FlatStateDict, paths: dict[str, Path]) -> JSON:
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise InvalidStateDictError(
                    f"key {fqn_of(path + (k,))!r}: dict keys must be str or int, not {type(k).__qualname__}"
                )
            items.append([k, _walk(v, path + (k,), flat, paths)])
        return {"dict": items}
    kind = "tuple" if isinstance(obj, tuple) else "list"
    return {kind: [_walk(v, path + (i,), flat, paths) for i, v in enumerate(obj)]}


def contains_tensor(obj: Any) -> bool:
    """Whether a tensor, `RankLocal` or stateful object lies anywhere inside `obj`."""
    if isinstance(obj, (torch.Tensor, RankLocal)) or is_stateful(obj):
        return True
    if isinstance(obj, Mapping):
        return any(contains_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(contains_tensor(v) for v in obj)
    return False


def tensor_leaf(fqn: str, tensor: torch.Tensor) -> TensorLeaf:
    """Where this rank's part of `tensor` lies in the global tensor."""
    if not isinstance(tensor, DTensor):
        return TensorLeaf(fqn=fqn, local=tensor, global_shape=tuple(tensor.shape), box=full_box(tensor.shape))
    global_shape = tuple(tensor.shape)
    layout, box = dtensor_layout(tensor, key=fqn)
    with torch.no_grad():  # a plain view of the local shard, without an autograd node per tensor
        local = tensor.to_local()
    if tuple(local.shape) != box.sizes:
        raise InvalidStateDictError(
            f"key {fqn!r}: local tensor shape {list(local.shape)} does not match the shape "
            f"{list(box.sizes)} its placements {tensor.placements} imply"
        )
    return TensorLeaf(fqn=fqn, local=local, global_shape=global_shape, box=box, layout=layout)


def rebuild(structure: JSON, leaf: Callable[[str, str], Any]) -> Any:
    """Build the nesting recorded in `structure`; `leaf(kind, fqn)` supplies each leaf."""
    ((kind, body),) = structure.items()
    if kind == "dict":
        return {k: rebuild(v, leaf) for k, v in body}
    if kind == "list":
        return [rebuild(v, leaf) for v in body]
    if kind == "tuple":
        return tuple(rebuild(v, leaf) for v in body)
    return leaf(kind, body)


def fill_target(target: Any, flat: FlatStateDict, new_values: Mapping[str, Any]) -> Any:
    """Put loaded values into `target`; tensors were already filled in place.

    Dicts and lists are updated in place, tuples rebuilt, and each stateful
    object gets `load_state_dict()` with its filled state dict.
    """
    return _fill(target, (), flat, new_values)


def _fill(obj: Any, path: Path, flat: FlatStateDict, new_values: Mapping[str, Any]) -> Any:
    fqn = fqn_of(path)
    if isinstance(obj, RankLocal):
        if fqn in new_values:
            obj.value = new_values[fqn]
        return obj
    if isinstance(obj, torch.Tensor):
        return obj
    if path in flat.stateful:
        owner, sd = flat.stateful[path]
        owner.load_state_dict(_fill_container(sd, path, flat, new_values))
        return owner
    if _is_walked(obj, path, flat.for_load):
        return _fill_container(obj, path, flat, new_values)
    return new_values.get(fqn, obj)


def _fill_container(obj: Any, path: Path, flat: FlatStateDict, new_values: Mapping[str, Any]) -> Any:
    if isinstance(obj, tuple):
        filled = [_fill(v, path + (i,), flat, new_values) for i, v in enumerate(obj)]
        return tuple(filled) if type(obj) is tuple else type(obj)(*filled)  # namedtuples take fields
    keys = obj.keys() if isinstance(obj, Mapping) else range(len(obj))
    for k in list(keys):
        obj[k] = _fill(obj[k], path + (k,), flat, new_values)
    return obj
