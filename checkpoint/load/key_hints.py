"""What to tell a user whose load target asks for keys the checkpoint lacks.

The usual cause is nesting: the state was saved as `{"train": {"model": ...}}`
and the target is `{"model": ...}`, so every key is off by one prefix. The
next most common is a model that grew (a layer the checkpoint never had).
For the first few unloaded keys this module finds the saved key each one
most likely meant (the same key under another prefix, else the closest
spelling) and, when they agree on one prefix, says how to nest the target.
Pure: key names in, text out; both the non-strict warning and the strict
load's `MissingKeysError` use it, so they give the same advice.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

# Unloaded target keys named (each with its nearest saved key) before "... (N in all)".
MAX_KEYS_NAMED = 5
# Saved keys compared by spelling for each named key; past this, only prefix matches are looked for
# (difflib is quadratic in key length and linear in candidates: a 100k-key checkpoint stays fast).
MAX_SPELLING_CANDIDATES = 20_000
# How alike two keys must be (difflib ratio) to be offered as "nearest".
SPELLING_CUTOFF = 0.6


def _under_prefix(key: str, saved: Sequence[str]) -> str | None:
    """The saved key that is `key` with a prefix added or removed (shortest such difference)."""
    best: str | None = None
    for s in saved:
        if s.endswith("." + key) or key.endswith("." + s):
            if best is None or abs(len(s) - len(key)) < abs(len(best) - len(key)):
                best = s
    return best


def nearest_saved(key: str, saved: Sequence[str]) -> str | None:
    """The saved key `key` most likely meant: the same key under another prefix, else the closest spelling."""
    found = _under_prefix(key, saved)
    if found is not None:
        return found
    pool = saved if len(saved) <= MAX_SPELLING_CANDIDATES else ()
    close = difflib.get_close_matches(key, pool, n=1, cutoff=SPELLING_CUTOFF)
    return close[0] if close else None


def _nesting(pairs: list[tuple[str, str]]) -> str | None:
    """How to nest the target, when every named key sits under one prefix more (or less) in the checkpoint."""
    extra = {s[: -len(k) - 1] for k, s in pairs if s.endswith("." + k)}
    fewer = {k[: -len(s) - 1] for k, s in pairs if k.endswith("." + s)}
    if len(extra) == 1 and not fewer and len(pairs) > 0:
        (prefix,) = extra
        parts = [*prefix.split("."), pairs[0][0].split(".")[0]]
        example = "".join(f"{{{p!r}: " for p in parts) + "..." + "}" * len(parts)
        return (
            f"the checkpoint holds these keys under {prefix + '.'!r}: nest the target the same way "
            f"(e.g. {example})"
        )
    if len(fewer) == 1 and not extra and len(pairs) > 0:
        (prefix,) = fewer
        return (
            f"the target nests these keys under {prefix + '.'!r} but the checkpoint holds them without it: "
            "load into the inner dict (or save it nested)"
        )
    return None


def describe_unloaded(missing: Sequence[str], saved: Sequence[str]) -> str:
    """Up to `MAX_KEYS_NAMED` unloaded keys, each with its nearest saved key, and a nesting hint if one fits.

    Example:
        >>> describe_unloaded(["model.w"], ["train.model.w", "step"])
        "'model.w' (saved as 'train.model.w'). The checkpoint holds these keys under 'train.': nest the
        target the same way (e.g. {'train': {'model': ...}})"
    """
    named = sorted(missing)[:MAX_KEYS_NAMED]
    parts, pairs = [], []
    for key in named:
        near = nearest_saved(key, saved)
        if near is None:
            parts.append(f"{key!r} (no similar saved key)")
        elif near.endswith("." + key) or key.endswith("." + near):
            parts.append(f"{key!r} (saved as {near!r})")
            pairs.append((key, near))
        else:
            parts.append(f"{key!r} (nearest saved key: {near!r})")
    more = f", ... ({len(missing)} in all)" if len(missing) > len(named) else ""
    text = ", ".join(parts) + more
    hint = _nesting(pairs) if len(pairs) == len(named) else None
    return f"{text}. {hint[0].upper()}{hint[1:]}" if hint else text
