"""torch dtypes for the dtype names of `planners.dtypes`.

Planning speaks dtype names only; the trainer side turns them into torch
dtypes here, at the point where tensors are allocated or viewed.
"""

from __future__ import annotations

import torch

from planners.dtypes import checked_name, dtype_name, name_from_code, safetensors_code

__all__ = ["dtype_from_code", "dtype_from_name", "dtype_name", "safetensors_code"]


def dtype_from_name(name: str, *, where: str) -> torch.dtype:
    """The torch dtype of a metadata dtype name (untrusted input is validated)."""
    return getattr(torch, checked_name(name, where=where))


def dtype_from_code(code: str, *, where: str) -> torch.dtype:
    """The torch dtype of a safetensors code (untrusted input is validated)."""
    return getattr(torch, name_from_code(code, where=where))
