"""StorageSpec: where a checkpoint lives, resolved once and opened wherever the bytes move.

A save touches its checkpoint directory from several places: the trainer plans
and claims the save's lease there, the process that writes (the trainer for a
sync save, the writer process for an async one) writes shard files and commits
there, and a trainer whose writer died commits its failure there. Resolving the
path (fsspec's `url_to_fs`, which parses the URL and builds the file system)
happens once, in `StorageSpec.resolve`; the resulting spec is a small picklable
record that travels to the writer process with each request, and every step
calls `spec.open()` for its own `CheckpointStorage` handle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import fsspec

from planners.errors import CheckpointError
from storage.redact import Redactor, display_url, secret_values
from storage.remote import TransferConfig

# The pip extra that provides each object-store protocol, for the error when its package is missing.
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageSpec:
    """A resolved checkpoint directory: enough to open it again in any process.

    Attributes:
        protocol: `"file"` for local disk (fsync, atomic rename), else the fsspec protocol.
        root: the directory inside the file system (a local path for `"file"`).
        url: the path as shown in messages and logs: never holds credentials.
        storage_options: the fsspec options the file system was built with (kept out of repr).
        transfer: part sizes, concurrency and retries of remote transfers (None: defaults).
        path: the path as given (kept out of repr: a URL may carry credentials).
        fs: the fsspec file system of a remote protocol, built by `resolve`. It is not pickled:
            another process (the async writer) builds its own from `path` on its first `open()`,
            so a file system the trainer registered but that process lacks fails there, by name.
    """

    protocol: str
    root: str
    url: str
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    transfer: TransferConfig | None = None
    path: str = field(default="", repr=False)
    fs: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fs"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "fs", None)

    @classmethod
    def resolve(
        cls,
        path: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
    ) -> StorageSpec:
        """Resolve a plain local path, a `file://` URL or any fsspec URL (calls `url_to_fs` once).

        Raises:
            CheckpointError: the URL's protocol is unknown, or needs a package that is not
                installed (the message names the extra to install, e.g. `shardsafe[s3]`).
        """
        if "://" not in path:
            return cls(protocol="file", root=path, url=path, path=path)
        if path.startswith("file://"):
            root = path.removeprefix("file://")
            return cls(protocol="file", root=root, url=root, path=root)
        fs, root = _url_to_fs(path, storage_options)
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
            return cls(protocol="file", root=root, url=root, path=root)
        protocol = path.split("://", 1)[0].rsplit("::", 1)[-1]
        return cls(
            protocol=protocol,
            root=root,
            url=display_url(path),
            path=path,
            storage_options=storage_options,
            transfer=transfer,
            fs=fs,
        )

    def open(self) -> Any:
        """A `CheckpointStorage` for this directory (cheap: the file system is already built)."""
        from storage.local import LocalStorage
        from storage.remote import FsspecStorage

        if self.protocol == "file":
            return LocalStorage(self.root)
        if self.fs is None:  # unpickled in another process: resolve there, once
            object.__setattr__(self, "fs", _url_to_fs(self.path, self.storage_options)[0])
        redact = Redactor(secret_values(self.storage_options))
        return FsspecStorage(self.fs, self.root, url=self.url, transfer=self.transfer, redact=redact)


def _url_to_fs(path: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """fsspec's file system for `path`; failures become `CheckpointError`s free of credentials."""
    protocol = path.split("://", 1)[0].rsplit("::", 1)[-1]
    shown = display_url(path)
    redact = Redactor(secret_values(storage_options))
    try:
        return fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except ImportError as e:
        extra = _EXTRAS.get(protocol)
        hint = (
            f"pip install 'shardsafe[{extra}]'"
            if extra
            else f"install the fsspec implementation for {protocol}://"
        )
        raise CheckpointError(
            f"cannot open {shown}: the {protocol}:// backend is not installed ({redact(str(e))}); {hint}"
        ) from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"cannot open {shown}: {type(e).__name__}: {redact(str(e))}") from None
