"""The bulk task: several events per message (reindex snapshots, bulk loads), on the bulk queue.

One message per chunk keeps the broker light when millions of products are replayed; inside
the task every event still goes through the same pipeline (validate, fetch, crop, embed,
guarded write), concurrently, so the process's micro-batcher fills its batches. The policy is
the live one's, per event: a permanent failure dead-letters that event only; transient
failures retry just the events that failed; a chunk that keeps killing its worker is
dead-lettered whole. ``collection`` pins the writes to one collection (a reindex's new one).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from celery import Task, shared_task

from cardigan.errors import InternalError, PoisonMessage, StateUnavailable, TransientError
from cardigan.keys import BULK_TASK
from cardigan.ops.reindex import ReindexState
from tasks.policy import after_error, count_delivery, dead_letter, never_lost, poison_reason, retry_delay_s, settle_for_retry
from workers import metrics, runtime

log = logging.getLogger(__name__)

TASK_NAME = BULK_TASK
_MAX_THREADS = 16  # events of one chunk in flight at once (the batcher gathers across chunks)


@shared_task(name=TASK_NAME, bind=True, max_retries=None)
def index_bulk(
    self: Task, events: list[Any], collection: str | None = None, run: str | None = None, chunk: int | None = None, size: int | None = None
) -> dict[str, Any]:
    """Index a list of events; ``collection`` pins them to one collection (a reindex snapshot).

    ``run``/``chunk``/``size`` report progress to the reindex that sent it (``size``: events
    the chunk had when published; a retry carries only the ones that failed).
    """
    return never_lost(self, run_bulk, self, events, collection=collection, run=run, chunk=chunk, size=size)


def _event_type(event: Any) -> str:
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if kind in ("add", "modify", "delete") else "invalid"


def run_bulk(
    task: Task, events: list[Any], *, collection: str | None, run: str | None, chunk: int | None, size: int | None
) -> dict[str, Any]:
    """Run each event through the pipeline under the retry policy; report outcomes per type."""
    s = runtime.settings()
    kw = {"collection": collection, "run": run, "chunk": chunk, "size": size}
    outcomes: dict[str, int] = {}

    def count(event: Any, outcome: str) -> None:
        key = f"{_event_type(event)}:{outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1

    def finish() -> dict[str, Any]:
        if run is not None and chunk is not None:
            ReindexState(runtime.state(), s.collection).chunk_done(run, chunk, size or len(events))
        return {"bulk": True, "collection": collection, "chunk": chunk, "outcomes": outcomes}

    try:
        seen = count_delivery(task)
    except redis.RedisError as e:
        raise task.retry(exc=e, countdown=retry_delay_s(0, s.worker), max_retries=None) from e
    attempt = seen.starts  # ours, not the sender's `retries` header
    retries = attempt - 1
    if not isinstance(events, list):
        dead_letter(task, events, InternalError("a bulk task's first argument must be a list of events"), attempt)
        count(events, "dead")
        return finish()
    poison = poison_reason(seen, s.worker, what="bulk chunk ")
    if poison is not None:
        err = PoisonMessage(poison)
        for ev in events:
            dead_letter(task, ev, err, attempt)
            count(ev, "dead")
        return finish()
    try:
        pipe = runtime.pipeline()
        if collection is not None and collection not in pipe.writer.targets():
            # the reindex that sent it was aborted (or already switched): its target is gone
            log.warning("bulk chunk %s for %s skipped: not a write target any more", chunk, collection)
            for ev in events:
                count(ev, "skipped")
            return {"bulk": True, "collection": collection, "chunk": chunk, "outcomes": outcomes}
    except (TransientError, redis.RedisError) as e:  # Milvus or Redis down: the whole chunk waits
        settle_for_retry(task)
        raise task.retry(exc=e, countdown=retry_delay_s(retries, s.worker)) from e

    with ThreadPoolExecutor(max(1, min(len(events), _MAX_THREADS)), thread_name_prefix="bulk") as pool:
        futures = [pool.submit(pipe.handle, ev, collection=collection) for ev in events]
    failed: list[tuple[Any, TransientError]] = []
    for ev, fut in zip(events, futures):
        try:
            res = fut.result()
            count(ev, res.outcome)
        except Exception as e:  # noqa: BLE001 - after_error decides, as for a live event
            verdict = after_error(e, attempt, s.worker)
            if verdict.bug:
                log.exception("unexpected error in a bulk event", exc_info=e)
            if verdict.retry:
                failed.append((ev, e if isinstance(e, TransientError) else StateUnavailable(verdict.reason)))
            else:
                assert verdict.error is not None
                dead_letter(task, ev, verdict.error, attempt)
                count(ev, "dead")
    if failed:  # only while attempt <= max_retries: after that, after_error dead-letters each
        first = failed[0][1]
        log.info(
            "%d of %d bulk events failed transiently (%s), retry %d/%d",
            len(failed),
            len(events),
            first.reason,
            retries + 1,
            s.worker.max_retries,
        )
        metrics.count_outcomes(
            (task.request.delivery_info or {}).get("routing_key") or "unknown", outcomes
        )  # the retry carries only the failed
        countdown = retry_delay_s(retries, s.worker)
        settle_for_retry(task)
        raise task.retry(args=[[ev for ev, _ in failed]], kwargs={**kw, "size": size or len(events)}, countdown=countdown, exc=first)
    return finish()
