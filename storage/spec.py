"""StorageSpec: where a checkpoint lives, resolved once and opened wherever the bytes move.

A save touches its checkpoint directory from several places: the trainer plans
and claims the save's lease there, the process that writes (the trainer for a
sync save, the writer process for an async one) writes shard files and commits
there, and a trainer whose writer died commits its failure there. Resolving the
path (fsspec's `url_to_fs`, which parses the URL and builds the file system)
happens once, in `StorageSpec.resolve`; the resulting spec is a small picklable
record that travels to the writer process with each request, and every step
calls `spec.open()` for its own `CheckpointStorage` handle.

A checkpointer holds one `StorageAccess` (its storage options and transfer
settings) and resolves each save's or load's path through it. The read-side entry points (verify, diff, the exports, the `shardsafe`
command) resolve the location they are given once (`spec_for`, which also
accepts a spec resolved earlier) and pass the spec down; a run's root is
resolved once and each step directory derived from it (`StorageSpec.child`).
"""

from __future__ import annotations

import os
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
        path: str | os.PathLike[str],
        *,
        storage_options: Mapping[str, Any] | None = None,
        transfer: TransferConfig | None = None,
    ) -> StorageSpec:
        """Resolve a plain local path (str or `os.PathLike`), a `file://` URL or any fsspec URL (calls `url_to_fs` once).

        Raises:
            CheckpointError: the URL's protocol is unknown, or needs a package that is not
                installed (the message names the extra to install, e.g. `shardsafe[s3]`).
        """
        path = os.fspath(path)
        if "://" not in path or path.startswith("file://"):
            # Absolute here, once: the spec travels to the async writer process, whose working directory
            # is the one the trainer had when it spawned it, not the one it has now (after an os.chdir).
            root = os.path.abspath(os.path.expanduser(path.removeprefix("file://")))
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

    def child(self, name: str) -> StorageSpec:
        """The spec of the directory `name` directly inside this one, without resolving anything again.

        A run's root is resolved once and each step directory derived from it, so listing a run of
        N steps builds one file system, not N + 1 (the child shares this spec's file system).

        Raises:
            ValueError: `name` is not one plain directory name (empty, `.`, `..`, or holds a `/`).
        """
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"child directory name must be one plain name, got {name!r}")
        path = _join(self.path, name)
        return StorageSpec(
            protocol=self.protocol,
            root=_join(self.root, name),
            url=_join(self.url, name) if self.protocol == "file" else display_url(path),
            storage_options=self.storage_options,
            transfer=self.transfer,
            path=path,
            fs=self.fs,
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


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageAccess:
    """How a checkpointer reaches storage: the fsspec options and transfer settings it opens every path with.

    Built once from the checkpointer's config and handed to its writer, reader and writer process
    as one value; each save or load then resolves its own path through it, once (`resolve`).

    Attributes:
        storage_options: fsspec options (credentials, endpoint) for remote paths (kept out of repr).
        transfer: part sizes, concurrency and retries of remote transfers (None: defaults).
    """

    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    transfer: TransferConfig | None = None

    def resolve(self, path: str) -> StorageSpec:
        """The spec of the checkpoint directory at `path`, resolved with these options."""
        return StorageSpec.resolve(path, storage_options=self.storage_options, transfer=self.transfer)


def spec_for(
    location: str | os.PathLike[str] | StorageSpec, *, storage_options: Mapping[str, Any] | None = None
) -> StorageSpec:
    """What a public entry point was given, as a spec: a path or URL is resolved now, a spec is used as is.

    Entry points (verify, diff, the exports, the command line) take either, so a caller that
    already resolved a location (the `shardsafe` command reads a checkpoint twice) resolves it
    once. `storage_options` apply to a location given as a string; a spec keeps its own.

    Raises:
        CheckpointError: as `StorageSpec.resolve`.
    """
    if isinstance(location, StorageSpec):
        return location
    return StorageSpec.resolve(location, storage_options=storage_options)


def specs_for(
    *locations: str | os.PathLike[str] | StorageSpec, storage_options: Mapping[str, Any] | None = None
) -> list[StorageSpec]:
    """`spec_for` each location of one call (a diff's two checkpoints, an export's source and output).

    All are resolved before the caller opens any, so a bad second URL leaves nothing open.
    """
    return [spec_for(location, storage_options=storage_options) for location in locations]


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


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
