"""The retry policy, in one place.

Permanent errors become dead letters at once; transient ones retry with exponential backoff
and full jitter until ``max_retries``, then become dead letters; a message that keeps killing
its worker (counted per delivery) becomes a dead letter instead of looping forever.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from cardigan.errors import InternalError, PermanentError, PoisonMessage, RetriesExhausted, TransientError
from config.settings import WorkerSettings
from workers import runtime

log = logging.getLogger(__name__)

# One hash per message id: "starts" (deliveries begun) and "settled" (deliveries that ended in a
# retry we scheduled). Deleted when the message ends in an outcome, so a reused id starts afresh
# and Redis holds one small hash per message in flight, not one per message ever seen; the TTL
# only covers a worker that dies between the outcome and the delete.
_DELIVERIES = "cardigan:deliveries:{id}"
DELIVERY_TTL_S = 2 * 24 * 3600


@dataclass(frozen=True)
class Deliveries:
    """What the worker, not the sender, knows about one message id."""

    starts: int  # deliveries begun, this one included
    settled: int  # of those, how many ended in a retry we scheduled

    @property
    def died(self) -> int:
        """Earlier deliveries that neither finished nor retried: their worker died holding them."""
        return max(0, self.starts - 1 - self.settled)


def backoff_s(retries: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's 'full jitter')."""
    return random.uniform(0, min(cap, base * 2 ** min(retries, 32)))


def retry_delay_s(retries: int, w: WorkerSettings) -> float:
    """The countdown of a retry after ``retries`` earlier ones, from the worker settings."""
    return backoff_s(retries, w.retry_backoff_s, w.retry_backoff_max_s)


def poison_reason(seen: Deliveries, w: WorkerSettings, *, what: str = "") -> str | None:
    """Before running: why this message must become a dead letter unrun, or None to run it.

    A message whose worker died ``max_deliveries`` times is poison; an id delivered more often
    than retries and deaths allow (a net for ids delivered in parallel) is too.
    """
    if seen.died >= w.max_deliveries:
        return f"{what}delivered {seen.died + 1} times without finishing: the worker died each time (out of memory, native crash)"
    if seen.starts > w.max_retries + w.max_deliveries + 1:
        return f"{what}delivered {seen.starts} times without an outcome"
    return None


@dataclass(frozen=True)
class Verdict:
    """What to do with one event whose run raised: retry it, or dead-letter it with ``error``."""

    retry: bool
    error: PermanentError | None = None  # the dead letter's error when not retrying
    reason: str = ""  # the transient reason, for the log line of a retry
    bug: bool = False  # an unexpected exception: log its traceback


def after_error(err: BaseException, attempt: int, w: WorkerSettings) -> Verdict:
    """The one retry decision, for live and bulk tasks: permanent errors are dead letters at once,
    transient ones (and Redis client errors nobody wrapped) retry until ``max_retries``, anything
    else is a bug kept for replay."""
    if isinstance(err, PermanentError):
        return Verdict(retry=False, error=err)
    if isinstance(err, TransientError | redis.RedisError):
        reason = err.reason if isinstance(err, TransientError) else f"state store: {type(err).__name__}: {err}"
        if attempt > w.max_retries:
            return Verdict(retry=False, error=RetriesExhausted(f"gave up after {attempt} attempts: {reason}"), reason=reason)
        return Verdict(retry=True, reason=reason)
    return Verdict(retry=False, error=InternalError(f"{type(err).__name__}: {err}"), bug=True)


def _key(task: Task) -> str:
    return _DELIVERIES.format(id=task.request.id)


def count_delivery(task: Task) -> Deliveries:
    """Count this delivery of the message; survives worker death, ignores the ``retries`` header."""
    key = _key(task)
    pipe = runtime.state().pipeline(transaction=True)
    pipe.hincrby(key, "starts", 1)
    pipe.hget(key, "settled")
    pipe.expire(key, DELIVERY_TTL_S)
    starts, settled, _ = pipe.execute()
    return Deliveries(int(starts), int(settled or 0))


def settle_for_retry(task: Task) -> None:
    """This delivery ends in a retry we schedule (not a death). Best effort: the retry is often
    caused by the state Redis itself, and raising here would requeue at once with no backoff."""
    try:
        runtime.state().hincrby(_key(task), "settled", 1)
    except redis.RedisError:
        log.warning("retry of %s not recorded in its delivery counter (state store unavailable)", task.request.id)


def forget_deliveries(task: Task) -> None:
    """The message ended in an outcome: its counter goes (best effort; the TTL is the net)."""
    try:
        runtime.state().delete(_key(task))
    except redis.RedisError:
        log.debug("delivery counter of %s not deleted", task.request.id, exc_info=True)


def dead_letter(task: Task, event: Any, err: PermanentError, attempts: int) -> dict[str, Any]:
    dl = runtime.dead_letters().add(
        reason=err.reason,
        kind=err.kind,
        event=event,
        field=err.field,
        attempts=attempts,
        task_id=task.request.id,
        queue=(task.request.delivery_info or {}).get("routing_key"),
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
        result = fn(*args, **kw)
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
    forget_deliveries(task)  # an outcome is recorded: the message is acked next
    return result


def _run_event(task: Task, event: Any) -> dict[str, Any]:
    s = runtime.settings()
    try:
        seen = count_delivery(task)
    except redis.RedisError as e:
        raise task.retry(exc=e, countdown=retry_delay_s(0, s.worker)) from e
    attempt = seen.starts  # ours: the sender's `retries` header is never used for counting
    poison = poison_reason(seen, s.worker)
    if poison is not None:
        return dead_letter(task, event, PoisonMessage(poison), attempt)
    try:
        return runtime.pipeline().handle(event).as_dict()
    except Exception as e:  # noqa: BLE001 - after_error decides; a bug is kept for replay, never dropped
        verdict = after_error(e, attempt, s.worker)
        if verdict.bug:
            log.exception("unexpected error")
        if not verdict.retry:
            assert verdict.error is not None
            return dead_letter(task, event, verdict.error, attempt)
        log.info("transient failure (%s), retry %d/%d", verdict.reason, attempt, s.worker.max_retries)
        settle_for_retry(task)
        raise task.retry(exc=e, countdown=retry_delay_s(attempt - 1, s.worker)) from e
