"""Dynamic micro-batching inside one worker process.

Each Celery task stays one event (its own ack, retries and Flower line); the tasks running in
the process's threads submit items here, and one thread turns whatever is waiting — up to
``max_items``, or what arrived within ``max_wait_s`` of the first — into one call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    busy_s: float = 0.0


class MicroBatcher(Generic[T, R]):
    """Calls ``fn(items) -> results`` (same length, same order) on gathered batches.

    ``isolate_failures``: when a whole batch fails, retry its items one by one so one bad item
    fails only its own future (one corrupt image must not fail its neighbours' events). Off for
    calls where a failure is about the dependency (Milvus down), not the item.
    """

    def __init__(
        self, fn: Callable[[list[T]], list[R]], *, max_items: int, max_wait_s: float, name: str, isolate_failures: bool = True
    ) -> None:
        self._fn = fn
        self._max_items = max_items
        self._max_wait = max_wait_s
        self._isolate = isolate_failures
        self._q: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats = BatchStats()
        self.name = name

    def start(self) -> MicroBatcher[T, R]:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)

    def submit(self, item: T) -> Future[R]:
        fut: Future[R] = Future()
        self._q.put((item, fut))
        return fut

    def _gather(self, first: tuple[T, Future[R]]) -> tuple[list[tuple[T, Future[R]]], bool]:
        batch = [first]
        deadline = time.monotonic() + self._max_wait
        while len(batch) < self._max_items:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)  # type: ignore[arg-type]
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)  # type: ignore[arg-type]
            self._call(batch)

    def _call(self, batch: list[tuple[T, Future[R]]]) -> None:
        items = [it for it, _ in batch]
        t0 = time.perf_counter()
        try:
            results = self._fn(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - every failure must reach a future
            if self._isolate and len(batch) > 1:
                log.warning("%s: batch of %d failed (%s); retrying one by one", self.name, len(batch), exc)
                for one in batch:
                    self._call([one])
                return
            for _, fut in batch:
                fut.set_exception(exc)
            return
        finally:
            self.stats.busy_s += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.items += len(items)
        for (_, fut), res in zip(batch, results):
            if isinstance(res, BaseException):  # ``fn`` failed this item alone (the writer's refused rows)
                fut.set_exception(res)
            else:
                fut.set_result(res)
