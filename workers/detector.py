"""The double-listing detector of one worker process: a thread, off the indexing path.

The writer hands it the products it just wrote (``note``: a dict update, no I/O, so indexing
never waits on detection); the thread moves them to the shared pending set in Redis, claims a
batch from it (any process's), checks the batch with one read and one range search, and marks
it done. A failed batch stays in the pending set and is claimed again after ``retry_s``; a
failure to reach Redis keeps the noted products in memory until it is back. Nothing here can
fail an event: the event was acked when its vectors were written.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cardigan.duplicates.detect import Detector
from cardigan.duplicates.pairs import Pair, PairStore
from cardigan.duplicates.score import Scoring
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
        self._noted: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duplicates", daemon=True)

    def start(self) -> DetectorLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._flush()  # best effort: what was noted reaches the shared pending set

    def note(self, since_ms: dict[str, int]) -> None:
        """Products whose vectors were just written or deleted (called by the writer)."""
        with self._lock:
            for pid, ms in since_ms.items():
                self._noted[pid] = min(ms, self._noted.get(pid, ms))

    def _flush(self) -> bool:
        with self._lock:
            noted, self._noted = self._noted, {}
        if not noted:
            return True
        try:
            self.store.enqueue(noted)
            return True
        except Exception as e:  # noqa: BLE001 - Redis down: keep them, try again next round
            with self._lock:
                for pid, ms in noted.items():
                    self._noted[pid] = min(ms, self._noted.get(pid, ms))
            log.warning("could not queue %d product(s) for duplicate detection: %s", len(noted), e)
            return False

    def run_once(self) -> int:
        """One round: flush, claim, check, mark done; returns products checked (0: idle)."""
        if not self._flush():
            raise ConnectionError("state store unreachable")
        pids, token = self.store.claim(self.cfg.batch_size, self.cfg.retry_s)
        if not pids:
            return 0
        res = self.detector.check(pids)
        lags = self.store.done(pids, token)
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
        self.store.add_counts(checked=res.products, pairs_added=res.added, pairs_dropped=res.dropped, groups_new=len(res.new_groups))
        for p in res.new_groups:
            self._announce(p)
        return res.products

    def _announce(self, p: Pair) -> None:
        if self.publish is None:
            return
        doc = {"event": "duplicate_group", "alias": self.store.alias, "members": [p.a, p.b], "best": json.loads(p.to_json())}
        try:
            self.publish(json.dumps(doc))
        except Exception as e:  # noqa: BLE001 - the pair is recorded; the announcement is best effort
            log.warning("new duplicate group %s/%s not announced: %s", p.a, p.b, e)

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
            if busy < self.cfg.batch_size:  # not saturated: let the next batch gather for a poll
                self._stop.wait(self.cfg.poll_ms / 1000)


def build_detector(settings: Settings, index: Index, state: redis.Redis) -> DetectorLoop:
    """The loop for one worker process (its own clients are the pipeline's: thread-safe)."""
    d = settings.duplicates
    store = PairStore(state, settings.collection, lag_samples=d.lag_samples)
    detector = Detector(index, store, threshold=d.threshold, max_images=settings.limits.max_images, hits_per_image=d.hits_per_image, scoring=Scoring.from_settings(d))
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
