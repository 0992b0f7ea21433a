"""Step 4 of the save protocol: the commit, and the cleanup after it.

Every rank hands its write result to the coordinator (`commit_save`, a
collective), as JSON read back as untrusted input (`planners.write_report`:
an async save's results cross a store other processes can reach). The
coordinator refuses the save if any rank failed or a result does not
complete the plan, checks that every reported shard file is stored with
exactly the reported size, builds the metadata from the results (pure:
`planners.metadata_build`), refuses chunks that share bytes (as a load
would), and publishes it last: replacing an existing one only when the save passed
overwrite=True, so that of two saves racing to one path with overwrite=False
one commits and the other gets `CheckpointExistsError`. After a commit it
deletes files of other saves that can no longer commit (see
`checkpoint.save.lease` for which ones). Every rank learns the verdict, so all
raise together; when it refused the save before its metadata could have gone
out, every rank first takes back its shard files (`checkpoint.save.abort`).

Deletes are decided on evidence, never on a missing success signal: this save's
files go only when the coordinator knows its metadata never went out (it refused
before the publish, or, for a dead writer, `commit_stand_in` read the path's
`metadata.json` successfully and it does not hold this save's id); other saves'
leftovers go only after the committed metadata was read back and holds this save's
id. A rank that cannot learn the verdict (the exchange broke) reads the metadata
itself: if it holds this save's id, the save is committed, whatever the exchange said.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from checkpoint.save import lease
from checkpoint.save.abort import clean_failed_save
from checkpoint.save.collectives import COORDINATOR, Exchange, RejectedPayload
from checkpoint.save.protocol import PreparedSave
from planners.errors import (
    CheckpointExistsError,
    DistributedCheckpointError,
    InvalidCheckpointError,
    StorageError,
)
from planners.leftovers import leftover_names
from planners.metadata import METADATA_FILE, Metadata
from planners.metadata_build import RankWriteResult, build_metadata
from planners.metadata_parse import byte_overlap_problem
from planners.write_report import plan_problem, result_from_json, result_to_json
from storage.backend import CheckpointStorage
from storage.metadata_file import read_metadata_document

logger = logging.getLogger(__name__)


def commit_save(
    storage: CheckpointStorage | None, exchange: Exchange, prepared: PreparedSave, result: RankWriteResult
) -> Metadata | None:
    """Gather write results; the coordinator checks them and writes the metadata last (collective).

    `storage` may be None on a rank whose storage could not be opened (its `result` carries that
    error); the rank still takes part, so the others fail now instead of at their timeout.

    Raises:
        CheckpointExistsError: on every rank, when the save passed overwrite=False and another save
            committed at the path first (the metadata is published without replacing).
        DistributedCheckpointError: on every rank, when any rank failed to write or the commit failed.
    """
    published = [True]  # whether this save's metadata may have gone out (coordinator)

    def on_coordinator(results: list[RankWriteResult]) -> tuple[Any, tuple[dict[int, str], Any]]:
        assert prepared.draft is not None
        metadata, outcome, published[0] = _commit_on_coordinator(storage, prepared, results)
        return metadata, outcome

    return exchange_verdict(
        exchange,
        result,
        on_coordinator,
        url=prepared.url,
        clean=(lambda: not published[0], lambda: clean_failed_save(storage, exchange, prepared)),
        committed=lambda: metadata_holds(storage, prepared.save_id) is True,
    )


def commit_stand_in(
    storage: CheckpointStorage | None, exchange: Exchange, prepared: PreparedSave, result: RankWriteResult
) -> None:
    """A dead writer's part in the commit, run by its trainer with the writer's failure as `result`.

    The writer may have died at any point of the commit: before its result was sent, after the
    coordinator published the metadata, during the leftover removal, the barrier or `post_commit`.
    On the coordinator the verdict therefore comes from storage, not from the dead writer's missing
    report: the path's `metadata.json` holding this save's id means the save IS committed (every rank
    learns success, nothing is deleted); a metadata read that succeeds and shows no such id (absent,
    or another save's) means it never went out, and every rank takes back its files; a read that
    fails leaves it unknown, and the save fails with everything kept.

    Raises:
        DistributedCheckpointError: the save is not committed (or that cannot be known).
    """
    holds: list[bool | None] = [None]

    def on_coordinator(results: list[RankWriteResult]) -> tuple[Any, tuple[dict[int, str], Any]]:
        holds[0] = metadata_holds(storage, prepared.save_id)
        if holds[0] is True:
            logger.warning(
                "rank %d: its writer process failed after save %s was committed at %s; the checkpoint stands",
                prepared.rank,
                prepared.save_id,
                prepared.url,
            )
            return None, ({}, None)
        failures = {r.rank: r.error for r in results if r.error is not None}
        if holds[0] is None:
            failures[COORDINATOR] = (
                f"{failures.get(COORDINATOR, 'its writer process failed')}; whether the metadata of save "
                f"{prepared.save_id} was published could not be read, so every file at {prepared.url} is kept"
            )
        return None, (failures, None)

    exchange_verdict(
        exchange,
        result,
        on_coordinator,
        url=prepared.url,
        clean=(lambda: holds[0] is False, lambda: clean_failed_save(storage, exchange, prepared)),
        committed=lambda: metadata_holds(storage, prepared.save_id) is True,
    )


def metadata_holds(storage: CheckpointStorage | None, save_id: str) -> bool | None:
    """Whether the path's `metadata.json` holds save `save_id`: the evidence every delete of a commit needs.

    Returns True when it was read and holds that id (the save is committed), False when it was read and
    holds another id or is definitely absent (`FileNotFoundError`), and None when it could not be read
    (no storage, an I/O error, a file that does not parse): unknown, which must mean keep.
    """
    if storage is None:
        return None
    try:
        doc = read_metadata_document(storage)
    except FileNotFoundError:
        return False
    except Exception:
        logger.warning("cannot read the metadata at %s", storage.url, exc_info=True)
        return None
    return doc.get("save_id") == save_id


def exchange_verdict(
    exchange: Exchange,
    result: RankWriteResult,
    on_coordinator: Callable[
        [list[RankWriteResult]], tuple[Any, tuple[dict[int, str], BaseException | None]]
    ],
    *,
    url: str,
    clean: tuple[Callable[[], bool], Callable[[], None]] | None = None,
    committed: Callable[[], bool] | None = None,
) -> Any:
    """The commit's exchange (collective): gather results, `on_coordinator` decides, every rank learns it.

    `on_coordinator` gets every rank's result (an unreadable one as that rank's error) and returns
    `(value, (failures by rank, overwrite-race error))`; the value is returned on the coordinator
    (None elsewhere). A staged save and an upload from the local tier
    (`checkpoint.tiers.upload`) differ only in that function. `clean`: on a failure, whether the
    coordinator knows the metadata never went out (asked on the coordinator), and the clean-up every
    rank then runs together (`checkpoint.save.abort.clean_failed_save`); None: nothing is cleaned.
    `committed`: asked on a rank whose exchange broke before it learnt the verdict; True (the storage
    shows the save committed) makes that rank return None instead of raising the exchange's error.
    """
    try:
        value, doc = _decide(exchange, result, on_coordinator, clean)
    except Exception:
        if committed is not None and committed():
            logger.warning(
                "rank %d: the commit exchange for %s failed, but its metadata shows the save committed",
                exchange.rank,
                url,
                exc_info=True,
            )
            return None
        raise
    outcome, exists = _read_verdict(doc)
    failed = outcome or exists is not None
    if failed and clean is not None and isinstance(doc, dict) and doc.get("clean") is True:
        clean[1]()  # every rank decides alike: the same verdict
    if exists is not None:
        raise CheckpointExistsError(exists)
    if outcome:
        raise DistributedCheckpointError(f"save to {url} failed; the checkpoint was not committed", outcome)
    return value


def _decide(
    exchange: Exchange,
    result: RankWriteResult,
    on_coordinator: Callable[..., tuple[Any, tuple[dict[int, str], BaseException | None]]],
    clean: tuple[Callable[[], bool], Callable[[], None]] | None,
) -> tuple[Any, Any]:
    """Gather the results, let the coordinator decide, broadcast: `(value, verdict document)`."""
    docs = exchange.gather(result_to_json(result))
    verdict: dict[str, Any] | None = None
    value = None
    if exchange.rank == COORDINATOR:
        assert docs is not None
        value, (failures, error) = on_coordinator(_read_results(docs))
        verdict = {
            "failures": {str(r): t for r, t in failures.items()},
            "exists": str(error) if error else None,
            "clean": clean is not None and clean[0](),  # the metadata never went out: files may go
        }
    return value, exchange.broadcast(verdict)


def _read_results(docs: list[Any]) -> list[RankWriteResult]:
    """Each rank's result from its JSON form; one that cannot be read becomes that rank's failure."""
    results = []
    for rank, doc in enumerate(docs):
        if isinstance(doc, RejectedPayload):
            results.append(RankWriteResult(rank=rank, error=doc.reason))
            continue
        try:
            results.append(result_from_json(doc, rank=rank))
        except ValueError as e:
            results.append(RankWriteResult(rank=rank, error=f"its write result is malformed: {e}"))
    return results


def _read_verdict(doc: Any) -> tuple[dict[int, str], str | None]:
    """The coordinator's verdict: failures by rank, and the message of a lost overwrite=False race."""
    try:
        failures = {int(r): str(t) for r, t in doc["failures"].items()}
        exists = doc["exists"]
        return failures, None if exists is None else str(exists)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        return {COORDINATOR: f"the coordinator's verdict is malformed ({type(e).__name__}: {e})"}, None


def _commit_on_coordinator(
    storage: CheckpointStorage | None, prepared: PreparedSave, results: list[RankWriteResult]
) -> tuple[Metadata | None, tuple[dict[int, str], BaseException | None], bool]:
    """Check the stored sizes and publish the metadata.

    Returns it, `(failures by rank, error)`, and whether the metadata may have been published (a
    publish that failed may still have landed, so the shard files must then stay).
    """
    outcome = {r.rank: r.error for r in results if r.error is not None}
    if outcome:
        return None, (outcome, None), False
    assert storage is not None  # a rank without storage reports an error
    published = False
    try:
        assert prepared.draft is not None  # the coordinator's PreparedSave carries the draft
        problem = plan_problem(prepared.draft, results, save_id=prepared.save_id)
        if problem is not None:
            raise InvalidCheckpointError(
                f"{prepared.url}: the write results do not complete the plan: {problem}"
            )
        check_stored_sizes(storage, results)
        metadata = build_metadata(
            prepared.draft, results, save_id=prepared.save_id, world_size=prepared.world_size
        )
        overlap = byte_overlap_problem(metadata.tensors, metadata.rank_local)  # a load refuses shared bytes
        if overlap is not None:
            raise InvalidCheckpointError(f"{prepared.url}: the write results overlap: {overlap}")
        published = True
        storage.publish(METADATA_FILE, metadata.to_json(), overwrite=prepared.overwrite)
    except FileExistsError:
        error = CheckpointExistsError(
            f"another save committed a checkpoint at {storage.url} while this one (save {prepared.save_id}) was "
            "writing; this save passed overwrite=False, so it was not committed and the other one stays"
        )
        # A no-replace publish that refused left this save's metadata out; a replacing one cannot say.
        return None, ({}, error), published and prepared.overwrite
    except Exception as e:
        logger.exception("committing %s failed", prepared.url)
        return None, ({COORDINATOR: f"commit failed: {type(e).__name__}: {e}"}, None), published
    remove_leftovers(storage, metadata)
    return metadata, ({}, None), True


# Stat requests in flight while the coordinator checks sizes (one HeadObject per file on S3).
SIZE_CHECK_THREADS = 16


def check_stored_sizes(storage: CheckpointStorage, results: list[RankWriteResult]) -> None:
    """Every file the ranks reported must be stored with exactly the size they reported.

    Raises:
        StorageError: a file is missing or its size differs, naming the file, its rank and both sizes.
    """
    reported = [(r.rank, name, nbytes) for r in results for name, nbytes in r.files.items()]

    def problem(entry: tuple[int, str, int]) -> str | None:
        rank, name, nbytes = entry
        try:
            stored = storage.size(name)
        except FileNotFoundError:
            return f"{storage.url}/{name}: rank {rank} reported {nbytes} bytes written but the file is gone"
        if stored != nbytes:
            return (
                f"{storage.url}/{name}: rank {rank} reported {nbytes} bytes written but {stored} are stored"
            )
        return None

    if len(reported) > 1:
        with ThreadPoolExecutor(
            min(SIZE_CHECK_THREADS, len(reported)), thread_name_prefix="shardsafe-stat"
        ) as pool:
            problems = list(pool.map(problem, reported))
    else:
        problems = [problem(e) for e in reported]
    found = [p for p in problems if p is not None]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise StorageError(found[0] + more)


def remove_leftovers(storage: CheckpointStorage, metadata: Metadata) -> None:
    """Delete files of other saves at this path that can no longer commit (only names shardsafe writes).

    Evidence required: the path's metadata, read back just before the delete, holds this save's id (so
    no file it names is among those deleted), and each deleted name is a shard file or marker of another
    save id without a live in-progress marker. Saves with a live marker keep their files; if another save
    has committed since this one, or the metadata cannot be read back, nothing is deleted.
    """
    try:
        names = storage.list_names()
        live, stale_markers = lease.live_save_ids(storage, names, own=metadata.save_id)
        stale = leftover_names(names, keep=live | {metadata.save_id})  # live saves may still commit
        if not stale and not stale_markers:
            return
        if metadata_holds(storage, metadata.save_id) is not True:  # the evidence: our metadata, read back
            logger.info(
                "another save committed at %s after %s; leaving cleanup to it", storage.url, metadata.save_id
            )
            return
        storage.remove(stale + stale_markers)
    except Exception:  # the new checkpoint is committed; leftovers only cost space
        logger.warning("could not remove stale files at %s", storage.url, exc_info=True)
