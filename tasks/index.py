"""The tasks a producer sends: one event each (live), or a list of events (bulk, reindex)."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from cardigan.keys import INDEX_TASK
from tasks.policy import run_event


@shared_task(name=INDEX_TASK, bind=True, max_retries=None)
def index_event(self: Task, event: Any) -> dict[str, Any]:
    """Add, modify or delete one product (the broker message format is in docs/message-format.md)."""
    return run_event(self, event)
