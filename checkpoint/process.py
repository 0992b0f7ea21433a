"""`checkpoint.process.CheckpointProcess`, kept importable under its first module name.

The trainer-side client lives in `checkpoint.writer_client`; the supervision of
the writer process in `checkpoint.writer_supervisor`; what runs inside it in
`checkpoint.writer_child`.
"""

from checkpoint.writer_client import CheckpointProcess

__all__ = ["CheckpointProcess"]
