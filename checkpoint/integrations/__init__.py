"""shardsafe inside the trainers people already run: one module per framework.

Each module plugs shardsafe into the one seam its framework lets a user
choose (DCP's `StorageReader`, Lightning's strategy and `CheckpointIO`,
torchtitan's checkpoint manager) and is built on shardsafe's own load and
save paths, so checksums, resharding and the pickle refusal hold the same
way they do for `checkpoint.load.loader`. Modules here may import `checkpoint`,
`planners` and `storage`; nothing else in shardsafe imports them.

A module whose framework is an optional extra raises `ImportError` naming
the extra to install (`require`), so `import checkpoint` never pulls a
framework in.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from planners.errors import CheckpointError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(CheckpointError, ImportError):
    """An integration's framework is not installed; the message names the shardsafe extra that installs it."""


def require(module: str, *, extra: str) -> ModuleType:
    """Import `module`, or raise `ImportError` saying which shardsafe extra installs it.

    Raises:
        MissingExtraError: `module` is not installed; the message names `pip install 'shardsafe[<extra>]'`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"shardsafe's {extra} integration needs {module!r}, which is not installed: "
            f"pip install 'shardsafe[{extra}]'"
        ) from e
