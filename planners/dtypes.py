"""Dtype names as they appear on disk, as plain strings.

The metadata file names dtypes the way torch prints them (``"bfloat16"``),
shard files use the safetensors codes (``"BF16"``). Only dtypes that
safetensors can store are accepted, so every shard file stays readable by any
safetensors reader. Everything here works on names, so planning never needs
torch; `checkpoint.state.dtypes` maps names to torch dtypes.
"""

from __future__ import annotations

from typing import Any

from planners.errors import InvalidCheckpointError, InvalidStateDictError

# dtype name -> (safetensors code, bytes per element). The list is the
# safetensors spec's; a dtype missing here (e.g. complex128) cannot be written
# in a safetensors file.
_TABLE: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "bool": ("BOOL", 1),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1),
    "float8_e5m2": ("F8_E5M2", 1),
    "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "complex64": ("C64", 8),
}
_BY_CODE: dict[str, str] = {code: name for name, (code, _) in _TABLE.items()}
DTYPE_NAMES: frozenset[str] = frozenset(_TABLE)


def dtype_name(dtype: Any, *, key: str) -> str:
    """Name of a dtype (a torch dtype or its name) for the metadata file; refuses what safetensors cannot store."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TABLE:
        raise InvalidStateDictError(
            f"key {key!r}: dtype {dtype} cannot be stored in a safetensors file; "
            f"convert it to one of {sorted(_TABLE)}"
        )
    return name


def checked_name(name: Any, *, where: str) -> str:
    """`name` itself when it is a known dtype name, for untrusted metadata."""
    if not isinstance(name, str) or name not in _TABLE:
        raise InvalidCheckpointError(f"{where}: unknown dtype {name!r}")
    return name


def itemsize(name: str) -> int:
    """Bytes per element of a (validated) dtype name."""
    return _TABLE[name][1]


def safetensors_code(dtype: Any) -> str:
    """The safetensors header code of a dtype or dtype name (validated earlier by `dtype_name`)."""
    return _TABLE[str(dtype).removeprefix("torch.")][0]


def name_from_code(code: Any, *, where: str) -> str:
    """Inverse of `safetensors_code`, for untrusted shard headers."""
    try:
        return _BY_CODE[code]
    except (KeyError, TypeError):
        raise InvalidCheckpointError(f"{where}: unknown safetensors dtype {code!r}") from None
