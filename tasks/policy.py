"""The retry policy, in one place.

Permanent errors become dead letters at once; transient ones retry with exponential backoff
and full jitter until ``max_retries``, then become dead letters; a message that keeps killing
its worker (counted per delivery) becomes a dead letter instead of looping forever.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from cardigan.errors import InternalError, PermanentError, PoisonMessage, RetriesExhausted, TransientError
from workers import runtime

log = logging.getLogger(__name__)

_DELIVERIES = "cardigan:deliveries:{id}:{retry}"


def backoff_s(retries: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""
    return random.uniform(0, min(cap, base * 2**retries))


def count_delivery(task: Task) -> int:
    """How many times this exact message (id, retry) has been started; survives worker death."""
    key = _DELIVERIES.format(id=task.request.id, retry=task.request.retries)
    r = runtime.state()
    pipe = r.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 7 * 24 * 3600)
    return int(pipe.execute()[0])


def dead_letter(task: Task, event: Any, err: PermanentError, attempts: int) -> dict[str, Any]:
    dl = runtime.dead_letters().add(
        reason=err.reason, kind=err.kind, event=event, field=err.field, attempts=attempts,
        task_id=task.request.id, queue=(task.request.delivery_info or {}).get("routing_key"),
    )
    log.warning("dead letter %s for %s: %s", dl.id, dl.product_id or "?", dl.reason)
    return {"outcome": "dead", "dead_letter": dl.id, "reason": dl.reason}


def run_event(task: Task, event: Any) -> dict[str, Any]:
    """Run one event through the pipeline under the policy; return what happened.

    Every path either records an outcome (vectors written, or a dead letter) or hands the
    message back (a retry, or a requeue when not even a dead letter can be stored): the message
    is never acked with nothing recorded.
    """
    return never_lost(task, _run_event, task, event)


def never_lost(task: Task, fn: Callable[..., dict[str, Any]], *args: Any, **kw: Any) -> dict[str, Any]:
    """Run a task body; if it cannot record any outcome, requeue the message instead of acking it."""
    try:
        return fn(*args, **kw)
    except Retry:
        raise
    except Reject as r:
        if r.requeue:
            raise
        # Task.retry() turns a failed publish of the retry (broker down) into a reject without
        # requeue, which would drop the event: requeue it instead
        log.warning("could not schedule a retry of %s (%s); message requeued", task.request.id, r.reason)
        raise Reject(r.reason, requeue=True) from r
    except Exception as e:  # noqa: BLE001 - the state store or broker is down: give it back
        log.error("could not record the outcome of %s (%s: %s); message requeued", task.request.id, type(e).__name__, e)
        raise Reject(f"{type(e).__name__}: {e}", requeue=True) from e


def _run_event(task: Task, event: Any) -> dict[str, Any]:
    s = runtime.settings()
    retries = task.request.retries

    def retry(e: BaseException) -> Retry:
        return task.retry(exc=e, countdown=backoff_s(retries, s.worker.retry_backoff_s, s.worker.retry_backoff_max_s))

    try:
        deliveries = count_delivery(task)
    except redis.RedisError as e:
        raise retry(e) from e
    if deliveries > s.worker.max_deliveries:
        err = PoisonMessage(f"delivered {deliveries} times without finishing: the worker died each time (out of memory, native crash)")
        return dead_letter(task, event, err, retries + deliveries)
    try:
        return runtime.pipeline().handle(event).as_dict()
    except PermanentError as e:
        return dead_letter(task, event, e, retries + 1)
    except (TransientError, redis.RedisError) as e:  # a client error the pipeline did not wrap is still transient
        reason = e.reason if isinstance(e, TransientError) else f"state store: {type(e).__name__}: {e}"
        if retries >= s.worker.max_retries:
            return dead_letter(task, event, RetriesExhausted(f"gave up after {retries + 1} attempts: {reason}"), retries + 1)
        log.info("transient failure (%s), retry %d/%d", reason, retries + 1, s.worker.max_retries)
        raise retry(e) from e
    except Exception as e:  # a bug: keep the event for replay after the fix, never drop it
        log.exception("unexpected error")
        return dead_letter(task, event, InternalError(f"{type(e).__name__}: {e}"), retries + 1)
