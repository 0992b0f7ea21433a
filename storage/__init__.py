"""Bytes in and out for shardsafe: shard files and the metadata file.

`open_storage` turns a plain path or any fsspec URL into a
`CheckpointStorage`; `write_safetensors` streams tensors into a shard file.
"""

from storage.backend import CheckpointStorage, open_storage
from storage.remote import TransferConfig
from storage.retry import RetryPolicy
from storage.safetensors_io import WrittenTensor, tensor_bytes, write_safetensors

__all__ = [
    "CheckpointStorage",
    "RetryPolicy",
    "TransferConfig",
    "WrittenTensor",
    "open_storage",
    "tensor_bytes",
    "write_safetensors",
]
