"""Keeping credentials out of everything shardsafe shows: log lines, error messages, the metadata file.

Credentials reach shardsafe in three ways: fsspec storage options (`key`, `secret`, `token`, an Azure
`account_key`, `connection_string` or SAS token, ...), for a few protocols the user part of a URL
(`ftp://user:password@host/...`), and signed URLs (an Azure SAS `?sig=...`, an S3 presigned
`X-Amz-Signature=...`). Neither is ever written into a checkpoint (the metadata names
files relative to the checkpoint directory, never the URL). What can leak is text: the URL in a
message, or a client library's error text that quotes a request. So every URL shardsafe prints goes
through `display_url`, and every foreign error text through a `Redactor` built from the options.
A secret is also hidden in its URL-encoded spellings, since client libraries quote requests, and the
parts of a connection string (`AccountKey=...`) are hidden on their own as well as whole.
"""

from __future__ import annotations

import re
import urllib.parse
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
    "connection",
)
# Shorter values are not worth hiding and would blank out unrelated text ("a", "us").
_MIN_SECRET_CHARS = 4
REDACTED = "***"
# The `user[:password]@` part of each URL in a (possibly chained) fsspec URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@")
# Query parameters of signed URLs that carry the signature or a credential (Azure SAS `sig`, S3
# presigned `X-Amz-*`, GCS `Signature`), wherever they appear in a text.
_SIGNED_QUERY = re.compile(
    r"(?P<name>[?&](?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"x-goog-signature|x-goog-credential)=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)
# Secret fields of an Azure connection string (`...;AccountKey=<base64>;...`), wherever they appear.
_CONNECTION_SECRET = re.compile(
    r"(?P<name>(?:AccountKey|SharedAccessSignature|SharedAccessKey)=)[^;\s\"'<>]+", re.IGNORECASE
)


_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def display_url(url: str) -> str:
    """`url` with any `user:password@` part and URL signature replaced by `***`, fit for logs and messages."""
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)
    url = _SIGNED_QUERY.sub(lambda m: f"{m['name']}{REDACTED}", url)
    return _CONNECTION_SECRET.sub(lambda m: f"{m['name']}{REDACTED}", url)


def _spellings(secret: str) -> set[str]:
    """The secret as given and as URL-encoding writes it (a `+` or `/` of base64 becomes `%2B`, `%2F`)."""
    found = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret, safe="")}
    found |= {_ESCAPE.sub(lambda m: m[0].lower(), s) for s in found}  # some clients write lower-case escapes
    for m in _CONNECTION_SECRET.finditer(secret):  # each secret part of a connection string alone
        value = secret[m.end("name") :].split(";", 1)[0]
        if len(value) >= _MIN_SECRET_CHARS:
            found |= _spellings(value)
    return found


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
        spelled = {s for secret in secrets for s in _spellings(secret)}
        self._secrets = tuple(sorted(spelled, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return display_url(text)

    def __repr__(self) -> str:  # never show what is hidden
        return f"Redactor({len(self._secrets)} secrets)"
