"""The trainer frameworks the integration tests run against, imported or skipped.

Locally a missing framework skips its tests (install the extra to run them); in CI (`CI` set)
the extras are installed by the Makefile, so a missing one fails the test instead of hiding it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def framework(module: str, *, extra: str) -> ModuleType:
    """`module` imported; skipped locally when absent, a failure in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(
                f"{module} is not installed in CI: the Makefile installs '.[{extra}]' ({e})", pytrace=False
            )
        pytest.skip(f"{module} is not installed: pip install -e '.[{extra}]'", allow_module_level=True)
        raise  # unreachable: skip raises
