"""Finding what a load target's key refers to in a checkpoint saved with another nesting.

A load walks the target: every tensor of the target is read into, and every
other leaf (a plain value, or `None` meaning "load this key") takes the saved
value at its path. The saved side may be nested differently from the target:
a dict without tensors was saved as one typed-JSON value (`{"epoch": 10,
"step": 2000}` under `metadata`), while the target asks for `metadata.epoch`
alone; or the target holds `None` where a whole saved subtree (a module's
tensors) lies. This module resolves a target path against the saved nesting
(`Metadata.structure`), purely: what to decode, what to index into it, or
which subtree to rebuild.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from planners.values import JSON

Path = tuple[Any, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedNode:
    """The saved node at (a prefix of) a target path.

    Attributes:
        node: the structure node (`{"value": fqn}`, `{"tensor": fqn}`, `{"dict": [...]}`, ...).
        rest: the target path's components below the node, to index into a decoded value.
    """

    node: JSON
    rest: Path


def index_structure(structure: JSON) -> dict[Path, JSON]:
    """Every node of the saved nesting by its path (the root's path is `()`)."""
    index: dict[Path, JSON] = {}
    stack: list[tuple[Path, JSON]] = [((), structure)]
    while stack:
        path, node = stack.pop()
        index[path] = node
        ((kind, body),) = node.items()
        if kind == "dict":
            stack += [((*path, k), child) for k, child in body]
        elif kind in ("list", "tuple"):
            stack += [((*path, i), child) for i, child in enumerate(body)]
    return index


def locate(index: Mapping[Path, JSON], path: Path) -> SavedNode | None:
    """The saved node at `path`, or the value leaf at its longest saved prefix; None when neither exists."""
    for cut in range(len(path), -1, -1):
        node = index.get(path[:cut])
        if node is None:
            continue
        if cut == len(path) or "value" in node:
            return SavedNode(node=node, rest=path[cut:])
        return None  # a container or tensor that lacks the next component
    return None


# What `pick` returns for a component the saved value lacks (None is a value).
ABSENT = object()


def pick(value: Any, rest: Path) -> Any:
    """`value[rest[0]][rest[1]]...` for a decoded value, or `ABSENT` when a component is missing."""
    for component in rest:
        if isinstance(value, Mapping):
            value = value.get(component, ABSENT)
        elif isinstance(value, (list, tuple)) and type(component) is int and 0 <= component < len(value):
            value = value[component]
        else:
            return ABSENT
        if value is ABSENT:
            return ABSENT
    return value
