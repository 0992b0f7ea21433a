"""Bytes in and out for shardsafe: shard files and the metadata file.

`StorageSpec.resolve` (or `spec_for`) turns a plain path or any fsspec URL
into a picklable spec, once; `spec.open()` gives a `CheckpointStorage`
(`open_storage` does both). `StorageAccess` is a checkpointer's storage
options and transfer settings as one value. `write_safetensors` streams
tensors into a shard file.
"""

from storage.backend import CheckpointStorage, open_storage
from storage.remote import TransferConfig
from storage.retry import RetryPolicy
from storage.safetensors_io import WrittenTensor, tensor_bytes, write_safetensors
from storage.spec import StorageAccess, StorageSpec, spec_for, specs_for

__all__ = [
    "CheckpointStorage",
    "RetryPolicy",
    "StorageAccess",
    "StorageSpec",
    "TransferConfig",
    "WrittenTensor",
    "open_storage",
    "spec_for",
    "specs_for",
    "tensor_bytes",
    "write_safetensors",
]
