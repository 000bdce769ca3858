"""The one poll loop: call a check until it says yes or the time is up.

The demo, the bench, the embedded stack and the tests all wait on something (workers ready, a
queue drained, a server answering); each keeps its own error message, and this keeps the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(
    check: Callable[[], object], timeout: float, interval: float = 0.05, *, backoff: float = 1.0, max_interval: float | None = None
) -> bool:
    """Call ``check`` until it returns truthy (True) or ``timeout`` seconds pass (False).

    ``check`` runs at least once, the last time after the deadline. ``backoff`` > 1 grows the
    sleep by that factor per round, up to ``max_interval``.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay *= backoff
        if max_interval is not None:
            delay = min(delay, max_interval)
