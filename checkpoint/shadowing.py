"""Refuse, by name, a user's file that takes the place of one of shardsafe's packages.

shardsafe installs three top-level packages: `checkpoint`, `planners` and
`storage` (the repository's given layout). The last two are common words: a
training project's own `storage.py` beside its script comes first on
`sys.path` (the script's directory), so `import checkpoint` would die deep
inside with "No module named 'storage.backend'; 'storage' is not a package".
`checkpoint/__init__.py` calls `require_own_packages` before importing
anything else, so the error names the file in the way and the fix instead.

A user's own `checkpoint.py` cannot be caught here: Python then imports it and
never runs this package (the README's "Install and import" says so). Only the
standard library is used, because the packages checked may be the broken ones.
"""

from __future__ import annotations

import importlib.util
import os

# The top-level packages of the shardsafe distribution; they are installed side by side.
PACKAGES = ("checkpoint", "planners", "storage")


def _found_at(name: str) -> str | None:
    """Where `import name` finds it (a module file, a package's `__init__.py`, or a folder), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a module in sys.modules without a spec: nothing to compare
        return None
    if spec is None:
        return None
    if spec.origin not in (None, "namespace"):
        return spec.origin
    locations = list(spec.submodule_search_locations or ())
    return locations[0] if locations else None


def shadowing_message(name: str, found: str) -> str:
    """The error for a `name` found at `found` instead of among shardsafe's packages."""
    kind = "folder" if os.path.isdir(found) or found.endswith("__init__.py") else "file"
    shown = os.path.dirname(found) if found.endswith("__init__.py") else found
    return (
        f"shardsafe cannot import its package {name!r}: the {kind} {shown} is imported under that name "
        f"instead, because its directory comes first on sys.path (the script's directory or the current "
        f"one). Rename that {kind} (e.g. to my_{name}) or run from a directory that does not hold it; "
        f"shardsafe's top-level packages are {', '.join(PACKAGES)}"
    )


def require_own_packages(names: tuple[str, ...], *, beside: str) -> None:
    """Raise `ImportError` if any of `names` would be imported from anywhere but next to `beside`.

    Args:
        names: top-level package names to check (those this package imports).
        beside: the directory holding shardsafe's packages (the parent of `checkpoint/`).
    """
    root = os.path.realpath(beside)
    for name in names:
        found = _found_at(name)
        if found is None:
            continue  # not importable at all: Python's own ModuleNotFoundError names it
        mine = os.path.join(root, name)
        if os.path.realpath(found) not in (os.path.join(mine, "__init__.py"), mine):
            raise ImportError(shadowing_message(name, found), name=name, path=found)


# Run on import: `checkpoint/__init__.py` imports this module first, before any sibling package.
require_own_packages(
    ("planners", "storage"), beside=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
