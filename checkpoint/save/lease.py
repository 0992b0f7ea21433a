"""In-progress markers: which saves at a path may still commit, so cleanup never deletes their files.

Several saves may target one path at once (a restarted job, two jobs pointed at one directory). The
coordinator of every save writes `.inprogress-<save id>.json` before any rank writes a shard file of that
save, rewrites it every quarter of the lease while the save runs (the heartbeat), and deletes it when the
save ends, committed or not. The file holds the save id, the writer's wall clock at the last heartbeat,
the lease length, the pid of the process that renews it and that process's host identity: host name,
kernel boot id and PID namespace. A marker whose heartbeat is older than its lease belongs to a save
that died. So does one whose pid no longer exists, but only when all three parts of its host identity
equal this process's: containers often share a host name without sharing a PID namespace, so a pid
that is not visible here may be alive next door. In any doubt (another identity, a marker written
before identities were recorded) only the heartbeat counts. A marker is read with a small size cap;
one that cannot be read counts as live.

After a commit, cleanup deletes only the shard files of save ids that are neither the committed one nor
covered by a live marker, and re-reads `metadata.json` just before deleting: if another save has
committed since, it deletes nothing (that save's own cleanup runs instead). A save that stalls for longer
than its lease may find its files gone; its commit then fails the size check instead of committing.
Clocks of the hosts that save to one path must agree to well within the lease.

Call order (coordinator only): `claim()` while planning (before the plan reaches the ranks), `renew()`
from the keeper's thread, `release()` once the save has ended; `live_save_ids()` during cleanup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from storage.backend import CheckpointStorage

logger = logging.getLogger(__name__)

MARKER_RE = re.compile(r"^\.inprogress-(?P<save_id>[0-9a-f]{8,32})\.json$")
# A save renews its marker this many times per lease, so one or two missed renewals (a slow request,
# a busy host) never make a live save look dead.
RENEWALS_PER_LEASE = 4
# A marker is a few hundred bytes of JSON; anything larger is not one of ours and is never read whole.
MAX_MARKER_BYTES = 64 * 1024
_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
_PID_NAMESPACE = "/proc/self/ns/pid"


def marker_name(save_id: str) -> str:
    return f".inprogress-{save_id}.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class HostIdentity:
    """Where a pid means something: a host name, the kernel's boot id and the PID namespace's inode.

    Two processes may judge each other's pids only when all three are equal and none is empty
    (the boot id and namespace are empty where `/proc` does not provide them).
    """

    host: str
    boot_id: str = ""
    pid_namespace: str = ""

    @classmethod
    def current(cls) -> HostIdentity:
        return cls(host=socket.gethostname(), boot_id=_boot_id(), pid_namespace=_pid_namespace())

    def same_pid_space(self, other: HostIdentity) -> bool:
        return bool(self.host and self.boot_id and self.pid_namespace) and self == other


def _boot_id() -> str:
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as f:
            return f.read(64).strip()
    except (OSError, ValueError):
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat(_PID_NAMESPACE).st_ino)
    except OSError:
        return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    """The content of one marker file (markers written before `boot_id`/`pid_namespace` lack them)."""

    save_id: str
    heartbeat_unix: float
    lease_secs: float
    host: str = ""
    boot_id: str = ""
    pid_namespace: str = ""
    pid: int = 0

    @property
    def identity(self) -> HostIdentity:
        return HostIdentity(host=self.host, boot_id=self.boot_id, pid_namespace=self.pid_namespace)

    def to_json(self) -> bytes:
        doc = {
            "save_id": self.save_id,
            "heartbeat_unix": self.heartbeat_unix,
            "lease_secs": self.lease_secs,
            "host": self.host,
            "boot_id": self.boot_id,
            "pid_namespace": self.pid_namespace,
            "pid": self.pid,
        }
        return json.dumps(doc).encode()

    def live(self, now_unix: float, here: HostIdentity | None = None) -> bool:
        """False once the heartbeat is older than the lease, or when the renewing process is gone.

        The pid is judged only when the marker's host identity equals `here` (default: this
        process's) exactly; otherwise a fresh heartbeat is all that counts.
        """
        if now_unix - self.heartbeat_unix > self.lease_secs:
            return False
        here = HostIdentity.current() if here is None else here
        return not (self.pid > 0 and here.same_pid_space(self.identity) and not _process_exists(self.pid))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def claim(storage: CheckpointStorage, save_id: str, lease_secs: float) -> None:
    """Write (or renew) the marker of `save_id`."""
    here = HostIdentity.current()
    record = LeaseRecord(
        save_id=save_id,
        heartbeat_unix=time.time(),
        lease_secs=lease_secs,
        host=here.host,
        boot_id=here.boot_id,
        pid_namespace=here.pid_namespace,
        pid=os.getpid(),
    )
    storage.publish(marker_name(save_id), record.to_json())


def release_quietly(storage: CheckpointStorage, save_id: str) -> None:
    """Delete the marker of a save that ended before its keeper started (its plan failed).

    Evidence: the marker's name carries `save_id`, this save's own id; no other save's marker is touched.
    """
    try:
        storage.remove([marker_name(save_id)])
    except Exception:  # it goes stale and a later cleanup deletes it
        logger.warning("could not delete the in-progress marker of save %s", save_id, exc_info=True)


def _read(storage: CheckpointStorage, name: str) -> LeaseRecord | None:
    """The marker's record; None when it is gone. An unreadable marker counts as live (never guess)."""
    try:
        doc = json.loads(storage.read_bytes(name, max_bytes=MAX_MARKER_BYTES))
        return LeaseRecord(
            save_id=str(doc["save_id"]),
            heartbeat_unix=float(doc["heartbeat_unix"]),
            lease_secs=float(doc["lease_secs"]),
            host=str(doc.get("host", "")),
            boot_id=str(doc.get("boot_id", "")),
            pid_namespace=str(doc.get("pid_namespace", "")),
            pid=int(doc.get("pid", 0)),
        )
    except FileNotFoundError:
        return None
    except Exception as e:
        logger.warning("%s/%s: unreadable in-progress marker (%s); treated as live", storage.url, name, e)
        return LeaseRecord(save_id="", heartbeat_unix=time.time(), lease_secs=float("inf"))


def live_save_ids(storage: CheckpointStorage, names: list[str], *, own: str) -> tuple[set[str], list[str]]:
    """Save ids other than `own` with a live marker among `names`, and the names of stale markers."""
    now, here = time.time(), HostIdentity.current()
    live, stale = set(), []
    for name in names:
        if (m := MARKER_RE.fullmatch(name)) is None or m["save_id"] == own:
            continue
        record = _read(storage, name)
        if record is None:
            continue
        if record.live(now, here):
            live.add(m["save_id"])
        else:
            stale.append(name)
    return live, stale


class LeaseKeeper:
    """Renews one save's marker from a daemon thread until `release()` deletes it.

    Example:
        >>> keeper = LeaseKeeper(storage, "4c62bed4887a", lease_secs=300.0)  # claim() already ran
        >>> ...  # the save writes and commits
        >>> keeper.release()
    """

    def __init__(self, storage: CheckpointStorage, save_id: str, *, lease_secs: float) -> None:
        self._storage = storage
        self._save_id = save_id
        self._lease_secs = lease_secs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shardsafe-lease-{save_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._lease_secs / RENEWALS_PER_LEASE):
            try:
                claim(self._storage, self._save_id, self._lease_secs)
            except Exception:  # the next renewal may succeed; a lost lease only risks this save
                logger.warning(
                    "could not renew the in-progress marker of save %s", self._save_id, exc_info=True
                )

    def release(self) -> None:
        """Stop renewing and delete the marker (the save has ended, whatever its outcome).

        Evidence: the marker is this save's own (its name carries the save id this keeper renews).
        """
        self._stop.set()
        self._thread.join()
        try:
            self._storage.remove([marker_name(self._save_id)])
        except Exception:  # a leftover marker goes stale and a later cleanup deletes it
            logger.warning("could not delete the in-progress marker of save %s", self._save_id, exc_info=True)
        finally:
            self._storage.close()
