"""The one command line of a worker process, for the CLI, the demo, the bench and the tests.

A threads pool (one model, many events in flight), JSON-only Celery app ``config.celery_app``,
no gossip or mingle (they cost a round trip per worker and buy nothing here).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

CELERY = (sys.executable, "-m", "celery")


def celery_worker_argv(
    *,
    queues: Sequence[str],
    concurrency: int,
    prefetch: int,
    node: str,
    loglevel: str = "INFO",
    task_events: bool = False,
    launcher: Sequence[str] = CELERY,
) -> list[str]:
    """``launcher`` runs celery's main (the bench wraps it in a CPU profiler); ``task_events`` is -E (Flower)."""
    return [
        *launcher, "-A", "config.celery_app", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--prefetch-multiplier", str(prefetch),
        "-Q", ",".join(queues), "-n", node,
        "--without-gossip", "--without-mingle", *(["-E"] if task_events else []), "-l", loglevel,
    ]  # fmt: skip
