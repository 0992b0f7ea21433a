"""Dtype names as they appear on disk.

The metadata file names dtypes the way torch prints them (``"bfloat16"``),
shard files use the safetensors codes (``"BF16"``). Only dtypes that
safetensors can store are accepted, so every shard file stays readable by any
safetensors reader.
"""

from __future__ import annotations

import torch

from planners.errors import InvalidCheckpointError, InvalidStateDictError

# torch dtype -> safetensors code. The list is the safetensors spec's; a dtype
# missing here (e.g. complex128) cannot be written in a safetensors file.
_SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}
_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in _SAFETENSORS_CODES}
_BY_CODE: dict[str, torch.dtype] = {code: d for d, code in _SAFETENSORS_CODES.items()}


def dtype_name(dtype: torch.dtype, *, key: str) -> str:
    """Name of a dtype for the metadata file; refuses dtypes safetensors cannot store."""
    if dtype not in _SAFETENSORS_CODES:
        raise InvalidStateDictError(
            f"key {key!r}: dtype {dtype} cannot be stored in a safetensors file; "
            f"convert it to one of {sorted(_BY_NAME)}"
        )
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, *, where: str) -> torch.dtype:
    """Inverse of `dtype_name`, for untrusted metadata."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise InvalidCheckpointError(f"{where}: unknown dtype {name!r}") from None


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors header code of a dtype (validated earlier by `dtype_name`)."""
    return _SAFETENSORS_CODES[dtype]


def dtype_from_code(code: str, *, where: str) -> torch.dtype:
    """Inverse of `safetensors_code`, for untrusted shard headers."""
    try:
        return _BY_CODE[code]
    except (KeyError, TypeError):
        raise InvalidCheckpointError(f"{where}: unknown safetensors dtype {code!r}") from None
