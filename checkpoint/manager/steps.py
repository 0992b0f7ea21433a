"""The step directories of a run, where the manager used to keep them: this name is `checkpoint.run.steps`.

The run's vocabulary moved below both tiers (`checkpoint.run`). This module makes the old import path
the very same module object, not a copy of its names, so code written against it (imports, and
patches of its functions in tests) keeps working unchanged.
"""

from __future__ import annotations

import sys

from checkpoint.run import steps as _steps

sys.modules[__name__] = _steps
