"""The double-listing detector of one worker process: a thread, off the indexing path.

The writer queues the products it just wrote in the shared pending set itself, in the Redis
pipeline it sends after every write and before the events are acked (``queue_into``): a worker
killed after that loses nothing, and one killed before it gets its events redelivered. It also
hands this thread the rows it wrote (``note``: a dict update, no I/O), so when this process
claims one of its own products at the version it wrote, the check needs no read-back from
Milvus. The thread claims a batch from the pending set (any process's), checks it with one
range search (plus one read for the products whose rows it does not hold), and marks it done. A
failed batch stays in the pending set and is claimed again after ``retry_s``; products the
writer could not queue (Redis down) are kept in memory until it is back. Nothing here can fail
an event: the event was acked when its vectors were written.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from cardigan.duplicates.detect import Detector
from cardigan.duplicates.groups import Group
from cardigan.duplicates.pairs import PairStore
from cardigan.store.index import Index
from config.settings import DuplicateSettings, Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


@dataclass
class DetectorStats:
    """Cumulative, read by workers/metrics.py at scrape time and by the bench."""

    batches: int = 0
    products: int = 0
    vectors: int = 0
    pairs_added: int = 0
    pairs_dropped: int = 0
    new_groups: int = 0
    failures: int = 0
    busy_s: float = 0.0
    lag_count: int = 0
    lag_sum_s: float = 0.0
    reads: int = 0  # products whose rows were read back from Milvus (not held in memory)
    searches: int = 0  # range-search calls


class DetectorLoop:
    """Drains the pending set in batches; ``publish`` gets one JSON document per new group."""

    def __init__(
        self, detector: Detector, store: PairStore, cfg: DuplicateSettings, *, publish: Callable[[str], None] | None = None
    ) -> None:
        self.detector = detector
        self.store = store
        self.cfg = cfg
        self.publish = publish
        self.stats = DetectorStats()
        self._noted: dict[str, int] = {}  # products the writer could not queue (Redis down)
        self._noted_versions: dict[str, int] = {}
        # product -> (version, rows) as this process wrote them, oldest first (bounded)
        self._rows: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wait_s: float | None = None  # until the pending batch is ready (None: nothing pending)
        self._thread = threading.Thread(target=self._run, name="duplicates", daemon=True)

    def start(self) -> DetectorLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._flush()  # best effort: what was noted reaches the shared pending set

    def queue_into(self, pipe: redis.client.Pipeline, since_ms: dict[str, int], versions: dict[str, int]) -> None:
        """Add the queueing of written products to the writer's own pipeline (no extra round trip)."""
        self.store.queue_into(pipe, since_ms, versions)

    def note(
        self, since_ms: dict[str, int], rows: dict[str, tuple[int, list[dict[str, Any]]]] | None = None, *, queued: bool = False
    ) -> None:
        """Products whose vectors were just written or deleted (called by the writer, no I/O).

        ``rows``: product -> (version, its rows; [] when deleted) as written, kept so a check of
        that version needs no read-back; ``queued``: already in the pending set (otherwise this
        thread queues them)."""
        with self._lock:
            for pid, (version, written) in (rows or {}).items():
                self._rows.pop(pid, None)  # re-inserted last: the oldest entries go first
                self._rows[pid] = (version, [_compact(r) for r in written])
                if not queued:
                    self._noted_versions[pid] = max(version, self._noted_versions.get(pid, version))
            while len(self._rows) > self.cfg.cached_products:
                self._rows.pop(next(iter(self._rows)))
            if not queued:
                for pid, ms in since_ms.items():
                    self._noted[pid] = min(ms, self._noted.get(pid, ms))

    def _known(self, claimed: dict[str, int | None]) -> dict[str, list[dict[str, Any]]]:
        """The claimed products whose rows this process holds at the claimed version."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self._lock:
            for pid, version in claimed.items():
                held = self._rows.get(pid)
                if held is None or version is None:
                    continue
                if held[0] == version:
                    out[pid] = held[1]
                elif held[0] < version:  # another worker wrote it since: ours will never match
                    del self._rows[pid]
        return out

    def _forget(self, known: dict[str, list[dict[str, Any]]]) -> None:
        with self._lock:
            for pid, rows in known.items():
                if pid in self._rows and self._rows[pid][1] is rows:
                    del self._rows[pid]

    def _flush(self) -> bool:
        with self._lock:
            noted, self._noted = self._noted, {}
            versions, self._noted_versions = self._noted_versions, {}
        if not noted:
            return True
        try:
            self.store.enqueue(noted, versions)
            return True
        except Exception as e:  # noqa: BLE001 - Redis down: keep them, try again next round
            with self._lock:
                for pid, ms in noted.items():
                    self._noted[pid] = min(ms, self._noted.get(pid, ms))
                for pid, v in versions.items():
                    self._noted_versions[pid] = max(v, self._noted_versions.get(pid, v))
            log.warning("could not queue %d product(s) for duplicate detection: %s", len(noted), e)
            return False

    def run_once(self) -> int:
        """One round: flush, claim, check, mark done; returns products checked (0: none ready)."""
        if not self._flush():
            raise ConnectionError("state store unreachable")
        cpu0 = time.thread_time()
        claimed, token, self._wait_s = self.store.claim_versions(self.cfg.batch_size, self.cfg.retry_s, self.cfg.linger_ms)
        if not claimed:
            return 0
        known = self._known(claimed)
        pids = list(claimed)
        res = self.detector.check(pids, known)
        counts = {
            "checked": res.products, "pairs_added": res.added, "pairs_dropped": res.dropped, "groups_new": len(res.new_groups),
            "batches": 1, "searches": res.searches, "read_back": res.read,
            "thread_cpu_us": int((time.thread_time() - cpu0) * 1e6),  # this thread's own, not gRPC's
        }  # fmt: skip
        lags = self.store.done(pids, token, **counts)
        self._forget(known)
        st = self.stats
        st.batches += 1
        st.products += res.products
        st.vectors += res.vectors
        st.pairs_added += res.added
        st.pairs_dropped += res.dropped
        st.new_groups += len(res.new_groups)
        st.busy_s += res.seconds
        st.lag_count += len(lags)
        st.lag_sum_s += sum(lags) / 1000
        st.reads += res.read
        st.searches += res.searches
        for g in res.new_groups:
            self._announce(g)
        return res.products

    def _announce(self, g: Group) -> None:
        """One message per new group (PairStore.replace says which are new), with all its members."""
        if self.publish is None:
            return
        doc = {
            "event": "duplicate_group",
            "alias": self.store.alias,
            "id": g.id,
            "members": list(g.members),
            "best": json.loads(g.best.to_json()),
        }
        try:
            self.publish(json.dumps(doc))
        except Exception as e:  # noqa: BLE001 - the pairs are recorded; the announcement is best effort
            log.warning("new duplicate group %s not announced: %s", g.id, e)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                busy = self.run_once()
                backoff = 0.0
            except Exception as e:  # noqa: BLE001 - counted, retried: detection never stops indexing
                self.stats.failures += 1
                try:
                    self.store.add_counts(failures=1)
                except Exception:  # noqa: BLE001
                    pass
                backoff = min(MAX_BACKOFF_S, max(0.5, backoff * 2))
                log.warning("duplicate detection failed (retrying in %.1f s): %s", backoff, e)
                self._stop.wait(backoff)
                continue
            if not busy:  # nothing ready: wait until the pending batch is (or for a poll, when none is)
                self._stop.wait(self.cfg.poll_ms / 1000 if self._wait_s is None else min(self._wait_s, self.cfg.poll_ms / 1000))


def build_detector(settings: Settings, index: Index, state: redis.Redis) -> DetectorLoop:
    """The loop for one worker process (its own clients are the pipeline's: thread-safe)."""
    d = settings.duplicates
    store = PairStore(state, settings.collection, lag_samples=d.lag_samples)
    detector = Detector.from_settings(index, store, d, max_images=settings.limits.max_images)
    return DetectorLoop(detector, store, d, publish=_queue_publisher(settings) if d.events_queue else None)


def _queue_publisher(settings: Settings) -> Callable[[str], None]:
    """One JSON message per new group on ``duplicates.events_queue`` (kombu: Redis or AMQP)."""
    from kombu import Connection

    name = settings.duplicates.events_queue

    def publish(doc: str) -> None:
        with Connection(settings.broker_url) as conn:
            q = conn.SimpleQueue(name, serializer="json")
            try:
                q.put(json.loads(doc))
            finally:
                q.close()

    return publish


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """A written row as held in memory: its embedding as float32, as Milvus stores it (a list of
    Python floats takes 8x the memory)."""
    return {**row, "embedding": np.asarray(row["embedding"], dtype=np.float32)}
