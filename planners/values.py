"""Typed JSON for the non-tensor leaves of a state dict.

Plain JSON loses types that training code relies on: a tuple comes back as a
list, an int dict key as a string, ``nan`` is not JSON at all. Each such value
is therefore written as a one-key JSON object naming its type, and a JSON
object means nothing else. JSON arrays, strings, numbers, booleans and null
are themselves. Pickle is only used when the caller opts in, and it is tagged
so that a loader can refuse it by default.

    (1, "a")          -> {"tuple": [1, "a"]}
    {0: [1.5]}        -> {"dict": [[0, [1.5]]]}
    float("nan")      -> {"float": "nan"}
"""

from __future__ import annotations

import base64
import math
import pickle
from typing import Any

from planners.errors import InvalidCheckpointError, InvalidStateDictError, PickleNotAllowedError

JSON = Any
_SCALARS = (type(None), bool, int, str)
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
# Nesting beyond this in a single value is refused on load so that a hostile
# file cannot exhaust the interpreter's stack.
MAX_VALUE_DEPTH = 64


def is_plain_value(value: Any) -> bool:
    """True when `value` can be stored as typed JSON without pickle."""
    if type(value) in _SCALARS or type(value) is float:
        return True
    if type(value) in (list, tuple):
        return all(is_plain_value(v) for v in value)
    if type(value) is dict:
        return all(type(k) in (str, int, bool, float, type(None)) for k in value) and all(
            is_plain_value(v) for v in value.values()
        )
    return False


def encode_value(value: Any, *, key: str, allow_pickle: bool) -> JSON:
    """Encode a non-tensor leaf; other types need `allow_pickle=True`."""
    if is_plain_value(value):
        return _encode(value)
    if not allow_pickle:
        where, item = _first_unplain(value, key)
        inside = "" if item is value else f" (its item {where} is a {type_name(item)})"
        raise PickleNotAllowedError(
            f"key {key!r}: a value of type {type(value).__qualname__}{inside} cannot be stored as JSON. "
            "Convert it to int/float/str/bool/None or lists, tuples and dicts of them, "
            "or pass allow_pickle=True to save() to store it pickled."
        )
    try:
        payload = pickle.dumps(value)
    except Exception as e:
        raise InvalidStateDictError(
            f"key {key!r}: value of type {type(value).__qualname__} cannot be pickled: {e}"
        ) from e
    return {"pickle": base64.b64encode(payload).decode("ascii")}


def type_name(value: Any) -> str:
    """The type of `value` as a user reads it: `int`, `numpy.ndarray` (builtins without a module)."""
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _first_unplain(value: Any, where: str) -> tuple[str, Any]:
    """The first item inside `value` (depth first) that is not a plain value, and its path from `where`.

    `value` itself when none of its items is to blame (its own type is, or a dict key is).
    """
    if type(value) in (list, tuple):
        items = list(enumerate(value))
    elif type(value) is dict and all(type(k) in (str, int, bool, float, type(None)) for k in value):
        items = list(value.items())
    else:
        return where, value
    for k, v in items:
        if not is_plain_value(v):
            return _first_unplain(v, f"{where}[{k!r}]")
    return where, value


def saved_type_name(data: JSON) -> str:
    """The type of the value a typed-JSON record holds, without decoding it (for error messages)."""
    if type(data) is dict and len(data) == 1:
        tag = next(iter(data))
        return {"tuple": "tuple", "dict": "dict", "float": "float", "pickle": "pickled object"}.get(
            tag, "dict"
        )
    return type_name(data)


def _encode(value: Any) -> JSON:
    if type(value) is float:
        if math.isfinite(value):
            return value
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if type(value) in _SCALARS:
        return value
    if type(value) is list:
        return [_encode(v) for v in value]
    if type(value) is tuple:
        return {"tuple": [_encode(v) for v in value]}
    return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}


def decode_value(data: JSON, *, key: str, allow_pickle: bool, depth: int = 0) -> Any:
    """Decode a value written by `encode_value`; pickle only with `allow_pickle`."""
    if depth > MAX_VALUE_DEPTH:
        raise InvalidCheckpointError(f"key {key!r}: value nested deeper than {MAX_VALUE_DEPTH} levels")
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode_value(v, key=key, allow_pickle=allow_pickle, depth=depth + 1) for v in data]
    if type(data) is not dict or len(data) != 1:
        raise InvalidCheckpointError(f"key {key!r}: malformed value record {str(data)[:80]!r}")
    ((tag, body),) = data.items()
    if tag == "tuple" and type(body) is list:
        return tuple(decode_value(v, key=key, allow_pickle=allow_pickle, depth=depth + 1) for v in body)
    if tag == "dict" and type(body) is list:
        return _decode_dict(body, key=key, allow_pickle=allow_pickle, depth=depth)
    if tag == "float" and body in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[body]
    if tag == "pickle" and type(body) is str:
        if not allow_pickle:
            raise PickleNotAllowedError(
                f"key {key!r} holds a pickled value; loading it would run code from the checkpoint. "
                "Pass allow_pickle=True to load() only if you trust this checkpoint."
            )
        return pickle.loads(base64.b64decode(body))  # allow_pickle=True: the caller opted in
    raise InvalidCheckpointError(f"key {key!r}: unknown value tag {tag!r}")


def _decode_dict(body: list, *, key: str, allow_pickle: bool, depth: int) -> dict:
    out = {}
    for pair in body:
        if type(pair) is not list or len(pair) != 2:
            raise InvalidCheckpointError(f"key {key!r}: malformed dict entry {str(pair)[:80]!r}")
        k = decode_value(pair[0], key=key, allow_pickle=allow_pickle, depth=depth + 1)
        try:
            out[k] = decode_value(pair[1], key=key, allow_pickle=allow_pickle, depth=depth + 1)
        except TypeError as e:  # an unhashable key from a hostile file
            raise InvalidCheckpointError(f"key {key!r}: dict key {k!r} is not hashable") from e
    return out
