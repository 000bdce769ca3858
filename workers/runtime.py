"""Worker lifecycle: build the pipeline once per process, after fork, never at import.

Prefork children build it in ``worker_process_init`` (CUDA cannot survive a fork); the threads
and solo pools build it in ``worker_init``. If a dependency is down at start, the first task
builds it instead (and retries while it cannot).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import redis
from celery import current_app
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from cardigan.errors import CardiganError, StateUnavailable
from cardigan.keys import EX_CONFIG
from cardigan.store.deadletter import DeadLetters
from cardigan.store.guard import make_redis
from config.settings import Settings
from workers import metrics
from workers.pipeline import Pipeline

log = logging.getLogger(__name__)

_lock = threading.Lock()
_pipeline: Pipeline | None = None
_state: redis.Redis | None = None


def settings() -> Settings:
    """The settings the Celery app was created with."""
    return current_app.cardigan_settings  # type: ignore[attr-defined,no-any-return]


def state() -> redis.Redis:
    """The state store client (dead letters, delivery counts); cheap, no model needed."""
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = make_redis(settings().effective_state_url)
    return _state


def dead_letters() -> DeadLetters:
    """The dead-letter store, capped and with retention; drops show in the worker's metrics."""
    w = settings().worker
    return DeadLetters(
        state(), max_letters=w.dead_letter_max, retention_s=w.dead_letter_retention_s, on_drop=metrics.DEAD_LETTERS_DROPPED.inc
    )


def current_pipeline() -> Pipeline | None:
    """This process's pipeline if it was built (metrics read it; they must not build it)."""
    return _pipeline


def pipeline() -> Pipeline:
    """This process's pipeline, built on first need."""
    global _pipeline
    if _pipeline is None:
        with _lock:
            if _pipeline is None:
                try:
                    _pipeline = Pipeline(settings())
                except CardiganError:
                    raise
                except redis.RedisError as e:
                    raise StateUnavailable(f"state store unreachable at worker start: {e}") from e
    return _pipeline


def _start(**_: Any) -> None:
    try:
        pipeline()
    except CardiganError as e:  # a dependency is down: tasks retry until it is back
        log.error("pipeline not ready at start (%s); the first task will try again", e.reason)
    except (ValueError, FileNotFoundError) as e:  # unknown backbone, bad weights path…: fail fast
        log.critical("worker cannot start: %s", e)
        logging.shutdown()
        os._exit(EX_CONFIG)


def _stop(**_: Any) -> None:
    global _pipeline
    with _lock:
        if _pipeline is not None:
            _pipeline.close()
            _pipeline = None


@worker_init.connect
def _on_worker_init(sender: Any = None, **kw: Any) -> None:
    metrics.start(settings(), str(getattr(sender, "hostname", "") or ""))  # no-op unless metrics_port > 0
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "prefork" not in str(name):
        _start()


worker_process_init.connect(_start, weak=False)
worker_process_shutdown.connect(_stop, weak=False)
worker_shutdown.connect(_stop, weak=False)
