"""A one-file plan of whole tensors, for tests that stage tensors without running a save's plan exchange."""

from __future__ import annotations

import torch

from planners.boxes import full_box
from planners.dtypes import dtype_name
from planners.save_plan import FilePlan, WriteItem


def one_file_plan(tensors: dict[str, torch.Tensor]) -> tuple[FilePlan, ...]:
    """Every tensor whole, in order, in one file `r0-0`."""
    items = tuple(
        WriteItem(
            fqn=k,
            dtype=dtype_name(t.dtype, key=k),
            global_shape=tuple(t.shape),
            box=full_box(t.shape),
            nbytes=t.numel() * t.element_size(),
        )
        for k, t in tensors.items()
    )
    return (FilePlan(stem="r0-0", items=items),)
