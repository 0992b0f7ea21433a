"""The library's import rules, checked by reading its modules with `ast` (no import runs).

`tests/test_import_rules.py` applies `check_tree` to this repository and to small broken trees
built on purpose, so the rules themselves are known to fire. The rules:

- layering: `planners` imports neither `checkpoint`, `storage` nor `torch.distributed` (pure
  planning over plain data); `storage` never imports `checkpoint`; no library module imports
  `checkpoint.testing` (test helpers only); each `checkpoint` subpackage imports only the parts its
  `__init__` docstring allows (`SUBPACKAGE_MAY_IMPORT`);
- no two subpackages of `NEVER_BOTH_WAYS` import each other (a "knot" between folders), even
  through different modules;
- no import cycle between modules, counting imports inside functions and `TYPE_CHECKING` blocks
  too: a cycle hidden in a function is still two modules that each need the other;
- no module longer than `MAX_MODULE_LINES`.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

MAX_MODULE_LINES = 400
LIBRARY_PACKAGES = ("checkpoint", "planners", "storage")

# Top-level modules of `checkpoint` that every part may use: records and errors, no behaviour.
CHECKPOINT_RECORDS = frozenset(
    {"checkpoint.errors", "checkpoint.types", "checkpoint.options", "checkpoint.config"}
)

# What each `checkpoint` subpackage may import from the rest of `checkpoint` (besides itself and the
# records above). The API modules at the top (checkpointer, builder, __init__) may import any part.
SUBPACKAGE_MAY_IMPORT: dict[str, frozenset[str]] = {
    "checkpoint.state": frozenset(),
    # The run's vocabulary, below both tiers: the manager and the tiers import it, it imports neither.
    "checkpoint.run": frozenset(),
    "checkpoint.save": frozenset({"checkpoint.state"}),
    "checkpoint.load": frozenset({"checkpoint.state"}),
    "checkpoint.async_writer": frozenset(
        {"checkpoint.save", "checkpoint.state", "checkpoint.load", "checkpoint.checkpointer"}
    ),
    "checkpoint.manager": frozenset(
        {
            "checkpoint.checkpointer",
            "checkpoint.load",
            "checkpoint.save",
            "checkpoint.state",
            "checkpoint.tiers",
            "checkpoint.run",
        }
    ),
    "checkpoint.tools": frozenset(
        {
            "checkpoint.load",
            "checkpoint.state",
            "checkpoint.manager",
            "checkpoint.save",
            "checkpoint.tiers",
            "checkpoint.run",
        }
    ),
    "checkpoint.tiers": frozenset(
        {
            "checkpoint.load",
            "checkpoint.state",
            "checkpoint.save",
            "checkpoint.async_writer",
            "checkpoint.checkpointer",
            "checkpoint.builder",
            "checkpoint.run",
        }
    ),
    "checkpoint.integrations": frozenset(
        {
            "checkpoint",
            "checkpoint.load",
            "checkpoint.state",
            "checkpoint.tools",
            "checkpoint.checkpointer",
            "checkpoint.builder",
            "checkpoint.manager",
            "checkpoint.run",
        }
    ),
}

# Two folders that must never import each other, in either direction, even through different modules:
# the manager composes the tiers, so the tiers may not import the manager (their shared words live in
# `checkpoint.run`). `SUBPACKAGE_MAY_IMPORT` already says it one way; this names the pair, so that a
# later edit of that table cannot allow the knot back silently.
NEVER_BOTH_WAYS: tuple[tuple[str, str], ...] = (("checkpoint.manager", "checkpoint.tiers"),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """One broken rule: which rule, in which module, and what it saw."""

    rule: str
    module: str
    detail: str


def module_name(root: Path, path: Path) -> str:
    """`checkpoint/save/commit.py` -> `checkpoint.save.commit`; an `__init__.py` names its package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_modules(root: Path) -> dict[str, Path]:
    """Every module of the three library packages under `root`, by dotted name."""
    found: dict[str, Path] = {}
    for package in LIBRARY_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def imported_names(path: Path, name: str, modules: Collection[str]) -> set[str]:
    """The modules a module imports, anywhere in its body, one name per imported thing.

    `from a import b` names `a.b` when that is a module of the tree, else `a` (b is a name in a).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _part(name: str) -> str:
    """The part of `checkpoint` a module belongs to: its subpackage, or itself at the top."""
    pieces = name.split(".")
    return ".".join(pieces[:2])


def _layering(name: str, imports: set[str]) -> list[Violation]:
    banned: tuple[str, ...] = ()
    if _within(name, "planners"):
        banned = ("checkpoint", "storage", "torch.distributed")
    elif _within(name, "storage"):
        banned = ("checkpoint",)
    if not _within(name, "checkpoint.testing"):
        banned = (*banned, "checkpoint.testing")
    return [
        Violation(rule="layering", module=name, detail=f"imports {imported}")
        for imported in sorted(imports)
        for prefix in banned
        if _within(imported, prefix)
    ]


def _subpackage_rule(name: str, imports: set[str], modules: dict[str, Path]) -> list[Violation]:
    own = _part(name)
    allowed = SUBPACKAGE_MAY_IMPORT.get(own)
    if allowed is None or not _within(name, "checkpoint"):
        return []
    found = []
    for imported in sorted(imports):
        if imported not in modules or not _within(imported, "checkpoint"):
            continue
        part = _part(imported)
        if part == own or part in CHECKPOINT_RECORDS or part in allowed:
            continue
        found.append(
            Violation(rule="subpackage", module=name, detail=f"imports {imported} ({part} not allowed)")
        )
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _knots(edges: dict[str, set[str]]) -> list[Violation]:
    """Each pair of `NEVER_BOTH_WAYS` whose folders import each other (module edges, any modules)."""
    parts = {(_part(a), _part(b)) for a, targets in edges.items() for b in targets}
    return [
        Violation(rule="knot", module=first, detail=f"{first} <-> {second}")
        for first, second in NEVER_BOTH_WAYS
        if (first, second) in parts and (second, first) in parts
    ]


def check_tree(root: Path) -> list[Violation]:
    """Every broken import rule and oversized module of the library under `root`."""
    modules = library_modules(root)
    found: list[Violation] = []
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        imports = imported_names(path, name, modules)
        edges[name] = {imported for imported in imports if imported in modules and imported != name}
        found += _layering(name, imports)
        found += _subpackage_rule(name, imports, modules)
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(Violation(rule="size", module=name, detail=f"{lines} lines > {MAX_MODULE_LINES}"))
    found += _knots(edges)
    for component in _cycles(edges):
        found.append(Violation(rule="cycle", module=component[0], detail=" <-> ".join(component)))
    return found
