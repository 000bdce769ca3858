"""The one retry decision (tasks.policy), without servers: the same function decides for live and bulk tasks."""

from __future__ import annotations

import redis

from cardigan.errors import InternalError, InvalidEvent, PoisonMessage, RetriesExhausted, StateUnavailable
from config.settings import WorkerSettings
from tasks.policy import Deliveries, after_error, poison_reason, retry_delay_s

W = WorkerSettings(max_retries=3, max_deliveries=2, retry_backoff_s=1.0, retry_backoff_max_s=5.0)


def test_permanent_error_is_a_dead_letter_at_once() -> None:
    err = InvalidEvent("images[0].uri: not an s3:// URI", field="images[0].uri")
    v = after_error(err, attempt=1, w=W)
    assert not v.retry and v.error is err and not v.bug


def test_transient_error_retries_until_max_retries_then_gives_up() -> None:
    err = StateUnavailable("redis down")
    for attempt in range(1, W.max_retries + 1):
        v = after_error(err, attempt, W)
        assert v.retry and v.error is None and v.reason == "redis down"
    v = after_error(err, W.max_retries + 1, W)
    assert not v.retry and isinstance(v.error, RetriesExhausted)
    assert v.error.reason == f"gave up after {W.max_retries + 1} attempts: redis down"


def test_unwrapped_redis_error_is_transient() -> None:
    v = after_error(redis.ConnectionError("refused"), 1, W)
    assert v.retry and v.reason == "state store: ConnectionError: refused"


def test_unexpected_exception_is_a_bug_kept_for_replay() -> None:
    v = after_error(KeyError("x"), 1, W)
    assert not v.retry and v.bug and isinstance(v.error, InternalError)
    assert "KeyError" in v.error.reason


def test_poison_after_max_deliveries_deaths() -> None:
    assert poison_reason(Deliveries(starts=1, settled=0), W) is None
    assert poison_reason(Deliveries(starts=2, settled=0), W) is None  # one death: run again
    reason = poison_reason(Deliveries(starts=3, settled=0), W)  # two deaths
    assert reason is not None and reason.startswith("delivered 3 times without finishing")
    assert PoisonMessage(reason).kind == "poison"
    # retries we scheduled are not deaths
    assert poison_reason(Deliveries(starts=4, settled=3), W) is None


def test_poison_net_for_ids_delivered_in_parallel() -> None:
    n = W.max_retries + W.max_deliveries + 2
    assert poison_reason(Deliveries(starts=n, settled=n - 1), W) == f"delivered {n} times without an outcome"
    assert poison_reason(Deliveries(starts=n - 1, settled=n - 2), W) is None


def test_bulk_names_the_chunk() -> None:
    reason = poison_reason(Deliveries(starts=3, settled=0), W, what="bulk chunk ")
    assert reason is not None and reason.startswith("bulk chunk delivered 3 times")


def test_retry_delay_is_full_jitter_under_the_cap() -> None:
    for retries in range(10):
        delays = [retry_delay_s(retries, W) for _ in range(200)]
        assert all(0 <= d <= min(W.retry_backoff_max_s, W.retry_backoff_s * 2**retries) for d in delays)
    assert max(retry_delay_s(10, W) for _ in range(200)) > 1.0  # grows past the base, up to the cap


def test_one_worker_launcher() -> None:
    """CLI, demo, bench and tests start workers with the same celery argv (workers.launch)."""
    import sys

    from cardigan.cli import worker_argv
    from config.settings import Settings
    from workers.launch import celery_worker_argv

    s = Settings()
    cli = worker_argv(s, 1, queues=["a", "b"], concurrency=4, loglevel="INFO")
    assert cli == celery_worker_argv(
        queues=["a", "b"], concurrency=4, prefetch=s.worker.prefetch_multiplier, node="cardigan1@%h", task_events=True
    )
    assert cli[:3] == [sys.executable, "-m", "celery"] and "-E" in cli and cli[cli.index("-Q") + 1] == "a,b"
    profiled = celery_worker_argv(queues=["a"], concurrency=1, prefetch=1, node="x@h", launcher=("py", "-c", "code"))
    assert profiled[:3] == ["py", "-c", "code"] and "-E" not in profiled
