"""Write stage: one Milvus upsert and one delete per batch, behind the version guard.

For each target collection: lock the batch's products, read their recorded versions, keep the
ops that are newer, write them, record the new versions, unlock. A task waits on its op's
future, so its message is acked only after its vectors are written.

After a batch, one pipelined Redis call records freshness samples and queues the live products
written for duplicate detection (``Handoff``), before any of the batch's events is acked. A
worker killed before that call has its events redelivered; one whose redelivered event finds
its own version already recorded (killed between the record and that call) queues it again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis

from cardigan.errors import IndexRejected, StateUnavailable
from cardigan.event import primary_key
from cardigan.keys import FRESHNESS_KEY, TARGETS_KEY
from cardigan.store.guard import Held, VersionGuard
from cardigan.store.index import Index
from cardigan.store.tombstones import Tombstones

log = logging.getLogger(__name__)

Outcome = Literal["applied", "stale"]
# The last outcome of each product's live event (applied / stale), kept worker.outcome_ttl_s
# seconds (workers/pipeline.py writes it, `cardigan events show` reads it)
TOMBSTONE_SWEEP_S = 60.0
REPAIR_ATTEMPTS = 4  # a write that outlived its lock: repairs, each with a lock twice as long
MAX_REPAIR_LOCK_MS = 600_000


class Handoff(Protocol):
    """Where written live products go for duplicate detection (workers/detector.py)."""

    def queue_into(self, pipe: redis.client.Pipeline, since_ms: dict[str, int], versions: dict[str, int]) -> None:
        """Queue them in the shared pending set, as part of the writer's pipeline."""

    def note(
        self, since_ms: dict[str, int], rows: dict[str, tuple[int, list[dict[str, Any]]]] | None = None, *, queued: bool = False
    ) -> None:
        """The rows just written (``queued``: the pipeline ran; otherwise the detector queues them)."""


class LockLost(Exception):
    """Our lock expired before a write (internal: the write is repaired, the repair tried again)."""


@dataclass
class WriteOp:
    """The whole new state of one product at one version."""

    product_id: str
    version: int
    kind: Literal["upsert", "delete"]
    rows: list[dict[str, Any]] = field(default_factory=list)  # image i -> row with pk id#i
    published_at_ms: int | None = None
    # a reindex snapshot names its collection: written there only, never to the live targets
    collection: str | None = None

    def delete_keys(self, max_images: int) -> list[str]:
        """Keys this op removes: n..K-1 for an upsert of n images, all K for a delete."""
        start = len(self.rows) if self.kind == "upsert" else 0
        return [primary_key(self.product_id, i) for i in range(start, max_images)]


def _newest(ops: list[WriteOp]) -> dict[str, WriteOp]:
    """Highest version per product within a batch; at equal versions a delete wins."""
    best: dict[str, WriteOp] = {}
    for op in ops:
        cur = best.get(op.product_id)
        if cur is None or (op.version, op.kind == "delete") > (cur.version, cur.kind == "delete"):
            best[op.product_id] = op
    return best


class IndexWriter:
    """Applies batches of WriteOps to every write target (the live collection, plus a reindex's)."""

    def __init__(
        self,
        index: Index,
        guard: VersionGuard,
        state: redis.Redis,
        *,
        max_images: int,
        live: str,
        tombstones: Tombstones | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._index = index
        self._guard = guard
        self._state = state
        self._max_images = max_images
        self._live = live
        self._targets_key = TARGETS_KEY.format(alias=index.alias)
        self._tombstones = tombstones
        self._swept_at = 0.0
        self._handoff = handoff  # duplicate detection: the live products written or deleted
        self._same: list[WriteOp] = []  # this batch's ops whose version was already recorded

    def targets(self) -> list[str]:
        """A reindex lists its collections here; otherwise the live one (read every batch)."""
        extra = sorted(self._state.smembers(self._targets_key))  # type: ignore[arg-type]
        return extra or [self._live]

    def write_batch(self, ops: list[WriteOp]) -> list[Outcome | IndexRejected]:
        """Each op's outcome; an op whose rows Milvus refuses gets its own IndexRejected, and
        the other ops of the batch are written without it."""
        targets = self.targets()
        by_collection: dict[str, list[WriteOp]] = {}
        for op in ops:
            for collection in [op.collection] if op.collection else targets:
                by_collection.setdefault(collection, []).append(op)
        applied_any: set[int] = set()
        rejected: dict[int, IndexRejected] = {}
        self._same = []
        for collection in sorted(by_collection):
            applied, refused = self._write_one(collection, _newest(by_collection[collection]))
            applied_any |= {id(op) for op in applied}
            rejected.update(refused)
        written = [op for op in ops if id(op) in applied_any and id(op) not in rejected]
        # a redelivery of a version already recorded: its hand-off may have been lost with its worker
        again = [op for op in self._same if op.collection is None and id(op) not in applied_any]
        self._after_write(written, again)
        self._sweep_tombstones(sorted(by_collection))
        return [rejected.get(id(op)) or ("applied" if id(op) in applied_any else "stale") for op in ops]

    def _write_one(self, collection: str, newest: dict[str, WriteOp]) -> tuple[list[WriteOp], dict[int, IndexRejected]]:
        applied: list[WriteOp] = []
        rejected: dict[int, IndexRejected] = {}
        lock_lost = False
        with self._guard.locked(collection, newest) as held:
            current = self._guard.versions(collection, list(newest))
            todo = [op for pid, op in newest.items() if current[pid] is None or op.version > current[pid][0]]  # type: ignore[index]
            self._same += [op for pid, op in newest.items() if current[pid] is not None and op.version == current[pid][0]]  # type: ignore[index]
            if not todo:
                return [], {}
            if held.takeovers:  # the previous holder's write may land after ours: keep ours to redo
                kept = {op.product_id: (op.version, op.rows) for op in todo if op.product_id in held.takeovers and op.kind == "upsert"}
                self._guard.journal(collection, kept)
            try:
                self._apply(collection, held, todo, applied, rejected)
            except LockLost:
                lock_lost = True
            finally:  # what landed is recorded even when a later part failed transiently
                recorded = {op.product_id: (op.version, op.kind) for op in applied}
                refused = self._guard.record(collection, recorded, token=held.token)  # fenced: only while our lock holds
                self._note_tombstones(collection, {p: v for p, v in recorded.items() if p not in refused})
        landed = {id(op) for op in applied}
        lost = [op for op in todo if id(op) not in rejected and (op.product_id in refused or (lock_lost and id(op) not in landed))]
        if not lost:
            return applied, rejected
        log.warning("lock expired during the write of %d product(s) in %s (e.g. %r): repairing", len(lost), collection, lost[0].product_id)
        return [op for op in applied if op.product_id not in refused] + self._repair(collection, lost), rejected

    def _apply(self, collection: str, held: Held, ops: list[WriteOp], applied: list[WriteOp], rejected: dict[int, IndexRejected]) -> None:
        """Write ``ops``; if Milvus refuses the data, bisect so only the refused ops fail.

        One bad row fails the whole call it is in; halving finds it in log2(n) extra calls per
        bad op, instead of n single-row calls. Transient errors are raised, not split.
        """
        rows = [r for op in ops if op.kind == "upsert" for r in op.rows]
        dels = [k for op in ops for k in op.delete_keys(self._max_images)]
        try:
            self._fenced_call(collection, held, self._index.upsert, rows)
            self._fenced_call(collection, held, self._index.delete, dels)
        except IndexRejected as e:
            if len(ops) == 1:
                log.warning("Milvus refused %s v%d: %s", ops[0].product_id, ops[0].version, e.reason)
                rejected[id(ops[0])] = IndexRejected(f"product {ops[0].product_id} v{ops[0].version}: {e.reason}")
                return
            mid = len(ops) // 2
            self._apply(collection, held, ops[:mid], applied, rejected)
            self._apply(collection, held, ops[mid:], applied, rejected)
            return
        applied.extend(ops)

    def _fenced_call(self, collection: str, held: Held, call: Any, arg: list[Any]) -> None:
        """One Milvus write, only while our locks hold: renewed first (each call's timeout fits
        in the TTL). A call that fails other than by a refusal may still land later: the
        in-flight markers are then kept (``unsettled``), so the next writer journals its rows."""
        if not arg:
            return
        if self._guard.renew(collection, held):
            raise LockLost()
        held.unsettled = True
        try:
            call(collection, arg)
        except IndexRejected:
            held.unsettled = False
            raise
        held.unsettled = False

    def _note_tombstones(self, collection: str, recorded: dict[str, tuple[int, str]]) -> None:
        if self._tombstones is None or not recorded:
            return
        try:
            self._tombstones.note(collection, recorded)
        except redis.RedisError:  # not noted: that tombstone is kept for ever, which is safe
            log.debug("tombstone times not noted", exc_info=True)

    def _sweep_tombstones(self, collections: list[str]) -> None:
        """At most once a minute per process: cheap, and enough to keep Redis bounded."""
        if self._tombstones is None or time.monotonic() - self._swept_at < TOMBSTONE_SWEEP_S:
            return
        self._swept_at = time.monotonic()
        for c in collections:
            try:
                n = self._tombstones.sweep(c)
            except redis.RedisError:
                log.debug("tombstone sweep skipped", exc_info=True)
                return
            if n:
                log.info("swept %d expired tombstones in %s", n, c)

    def _repair(self, collection: str, lost: list[WriteOp]) -> list[WriteOp]:
        """Our lock expired while our write was in flight: another writer may have written in
        between, and our write may have landed over theirs. Under a fresh lock, whichever is
        newest (ours, or the recorded one) is written again; returns our ops that won.

        Milvus was slower than the lock TTL just now, so each attempt holds its lock twice as
        long as the one before (a repair that cannot finish would leave the index wrong).
        """
        ttl = self._guard.lock_ttl_ms
        for attempt in range(1, REPAIR_ATTEMPTS + 1):
            ttl = min(2 * ttl, MAX_REPAIR_LOCK_MS)
            try:
                return self._repair_once(collection, lost, ttl)
            except LockLost:
                log.warning("repair attempt %d in %s outlived its %.0f s lock; trying again", attempt, collection, ttl / 1000)
        raise StateUnavailable(f"could not repair {len(lost)} product(s) in {collection}: Milvus slower than a {ttl / 1000:.0f} s lock")

    def _repair_once(self, collection: str, lost: list[WriteOp], ttl_ms: int) -> list[WriteOp]:
        newest = {op.product_id: op for op in lost}
        with self._guard.locked(collection, newest, wait_s=self._guard.lock_ttl_ms / 1000 * 4, ttl_ms=ttl_ms) as held:
            current = self._guard.versions(collection, list(newest))
            mine = [op for pid, op in newest.items() if current[pid] is None or op.version >= current[pid][0]]  # type: ignore[index]
            redo = list(mine)
            for pid, rec in current.items():
                if pid in {op.product_id for op in mine} or rec is None:
                    continue
                version, kind = rec
                if kind == "delete":
                    redo.append(WriteOp(pid, version, "delete"))
                    continue
                kept = self._guard.journaled(collection, pid)
                if kept is None or kept[0] != version:
                    log.error(
                        "cannot repair %r in %s: the rows of v%d were not journaled; the next event for it fixes it",
                        pid,
                        collection,
                        version,
                    )
                    continue
                redo.append(WriteOp(pid, version, "upsert", rows=kept[1]))
            rows = [r for op in redo if op.kind == "upsert" for r in op.rows]
            dels = [k for op in redo for k in op.delete_keys(self._max_images)]
            held.unsettled = True  # until the repair is recorded, a later taker journals its rows
            for call, arg in ((self._index.upsert, rows), (self._index.delete, dels)):
                if arg:
                    if self._guard.renew(collection, held):
                        raise LockLost()
                    call(collection, arg)
            ours = {
                op.product_id: (op.version, op.kind)
                for op in mine
                if current[op.product_id] is None or op.version > current[op.product_id][0]
            }  # type: ignore[index]
            if self._guard.renew(collection, held) or self._guard.record(collection, ours, token=held.token):
                raise LockLost()
            held.unsettled = False
            self._note_tombstones(collection, ours)
        log.warning("repaired %d product(s) in %s: %d ours, %d another writer's", len(redo), collection, len(mine), len(redo) - len(mine))
        return mine

    def requeue(self, product_id: str, published_at_ms: int | None) -> None:
        """A redelivered event whose version is already recorded: queue the product for
        detection again (its worker may have died before the hand-off); never raises."""
        self._after_write([], [WriteOp(product_id, 0, "upsert", published_at_ms=published_at_ms)])

    def _after_write(self, written: list[WriteOp], again: list[WriteOp]) -> None:
        """One pipelined call: freshness samples, and the live products to check for double
        listings queued; then the detector gets their rows. Never raises: the write landed."""
        now = int(time.time() * 1000)
        lat = [now - op.published_at_ms for op in written if op.published_at_ms]
        live = _newest([op for op in written if op.collection is None])
        since = {op.product_id: op.published_at_ms or now for op in [*again, *live.values()]}
        versions = {pid: op.version for pid, op in live.items()}
        pipe = self._state.pipeline(transaction=False)
        if lat:
            pipe.lpush(FRESHNESS_KEY, *lat)
            pipe.ltrim(FRESHNESS_KEY, 0, 99_999)
        queued = False
        try:
            if self._handoff is not None and since:
                self._handoff.queue_into(pipe, since, versions)
            if len(pipe):
                pipe.execute()
            queued = True
        except redis.RedisError:
            if self._handoff is None or not since:
                log.debug("freshness not recorded", exc_info=True)
            else:
                log.warning("written products not queued for duplicate detection: kept in memory", exc_info=True)
        if self._handoff is None or not since:
            return
        rows = {pid: (op.version, op.rows if op.kind == "upsert" else []) for pid, op in live.items()}
        try:
            self._handoff.note(since, rows, queued=queued)
        except Exception:  # noqa: BLE001 - detection must not fail a write that landed
            log.warning("duplicate detection not notified", exc_info=True)
