"""Keeping credentials out of everything shardsafe shows: log lines, error messages, the metadata file.

Credentials reach shardsafe in two ways: fsspec storage options (`key`, `secret`, `token`, an Azure
`account_key` or SAS token, ...) and, for a few protocols, the user part of a URL
(`ftp://user:password@host/...`). Neither is ever written into a checkpoint (the metadata names
files relative to the checkpoint directory, never the URL). What can leak is text: the URL in a
message, or a client library's error text that quotes a request. So every URL shardsafe prints goes
through `display_url`, and every foreign error text through a `Redactor` built from the options.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# Option names (lower-cased substrings) whose string values are credentials. `key` covers `key`,
# `access_key`, `account_key`; an endpoint URL or a region name matches none of them.
_SECRET_NAME_PARTS = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "sas",
    "signature",
    "auth",
)
# Shorter values are not worth hiding and would blank out unrelated text ("a", "us").
_MIN_SECRET_CHARS = 4
REDACTED = "***"
# The `user[:password]@` part of each URL in a (possibly chained) fsspec URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")


def display_url(url: str) -> str:
    """`url` with any `user:password@` part replaced by `***@`, fit for logs and messages."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)


def secret_values(options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The credential strings in fsspec storage options, nested dicts included, longest first."""
    found: set[str] = set()

    def walk(mapping: Mapping[str, Any]) -> None:
        for name, value in mapping.items():
            if isinstance(value, Mapping):
                walk(value)
            elif (
                isinstance(value, str)
                and len(value) >= _MIN_SECRET_CHARS
                and any(part in str(name).lower() for part in _SECRET_NAME_PARTS)
            ):
                found.add(value)

    walk(options or {})
    # Longest first, so a secret that contains another is replaced whole.
    return tuple(sorted(found, key=len, reverse=True))


class Redactor:
    """Replaces known credential strings in text with `***`.

    Example:
        >>> Redactor(["s3cr3t"])("signature for s3cr3t failed")
        'signature for *** failed'
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(sorted(set(secrets), key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return display_url(text)

    def __repr__(self) -> str:  # never show what is hidden
        return f"Redactor({len(self._secrets)} secrets)"
