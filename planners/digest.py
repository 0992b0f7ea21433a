"""Strict JSON for the metadata file, and the digest that seals it (format version 2).

The metadata is the one file that says where every byte lies and what every
non-tensor value is, and a shard's block checksums only protect the bytes the
metadata points at. So, since format version 2, the metadata carries a digest
of its own content: `"digest": "sha256:<hex>"`, the SHA-256 of the canonical
JSON of every other field (keys sorted, no whitespace, ASCII only, no NaN).
Canonical bytes, not the file's bytes, so a tool that re-indents the file
keeps it valid while any change of content is caught. The writer puts the
digest first and the canonical bytes after it, so a reader usually hashes a
slice of the file it already holds instead of encoding the document again.

Parsing is strict in what JSON itself leaves open: a key given twice in one
object and the NaN/Infinity literals are refused (typed values spell special
floats as `{"float": "nan"}`, so no honest file needs them).

Nothing here is a signature: anyone who can write the file can recompute the
digest. It catches corruption (bit rot, torn copies, edits by hand); hostile
content is still refused by the validation that follows.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from planners.errors import CorruptCheckpointError, InvalidCheckpointError

DIGEST_FIELD = "digest"
DIGEST_ALGORITHM = "sha256"
_PREFIX = f'{{"{DIGEST_FIELD}":"{DIGEST_ALGORITHM}:'.encode()
_HEX_CHARS = 64


def canonical_bytes(doc: dict[str, Any]) -> bytes:
    """The bytes the digest covers: `doc` without its digest, keys sorted, compact, ASCII."""
    body = {k: v for k, v in doc.items() if k != DIGEST_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def _hexdigest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(doc: dict[str, Any]) -> bytes:
    """The file bytes for `doc`: its digest first, then the canonical JSON of the rest."""
    canonical = canonical_bytes(doc)
    if canonical == b"{}":
        return _PREFIX + _hexdigest(canonical).encode() + b'"}'
    return _PREFIX + _hexdigest(canonical).encode() + b'",' + canonical[1:]


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup[:80]!r} appears twice in one object")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_loads(data: bytes | str) -> Any:
    """`json.loads` that refuses duplicate keys and NaN/Infinity (raises ValueError or RecursionError)."""
    return json.loads(data, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)


def check_digest(raw: bytes, doc: dict[str, Any], *, where: str) -> None:
    """Refuse `doc` (parsed from `raw`) unless its digest matches its content.

    Raises:
        CorruptCheckpointError: the digest is missing, malformed or does not match; `where` names the file.
    """
    stored = doc.get(DIGEST_FIELD)
    algorithm, _, hexdigest = stored.partition(":") if isinstance(stored, str) else ("", "", "")
    if algorithm != DIGEST_ALGORITHM or len(hexdigest) != _HEX_CHARS:
        raise CorruptCheckpointError(
            f"{where}: the metadata digest is missing or malformed (expected '{DIGEST_ALGORITHM}:<hex>'); "
            "the file is corrupt"
        )
    # Fast path: the writer's layout, where the canonical bytes follow the digest in the file itself.
    head = _PREFIX + hexdigest.encode("ascii", "replace") + b'",'
    if raw.startswith(head) and _hexdigest(b"{" + raw[len(head) :]) == hexdigest:
        return
    try:
        canonical = canonical_bytes(doc)
    except (ValueError, RecursionError) as e:
        raise InvalidCheckpointError(f"{where}: the metadata cannot be encoded again: {e}") from None
    if _hexdigest(canonical) != hexdigest:
        raise CorruptCheckpointError(
            f"{where}: the metadata does not match its digest; the file is corrupt "
            "(restore it from a copy, or load an earlier checkpoint)"
        )
