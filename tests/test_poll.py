"""The one poll loop the demo, bench, stack and tests wait with."""

from __future__ import annotations

import time

from cardigan.poll import poll


def test_poll_returns_as_soon_as_the_check_says_yes() -> None:
    calls: list[float] = []

    def third_time() -> bool:
        calls.append(time.monotonic())
        return len(calls) == 3

    assert poll(third_time, timeout=5, interval=0.01) is True
    assert len(calls) == 3


def test_poll_gives_up_after_the_timeout_having_checked_once_more() -> None:
    calls: list[float] = []
    t0 = time.monotonic()
    assert poll(lambda: calls.append(time.monotonic()), timeout=0.2, interval=0.05) is False
    assert calls[-1] - t0 >= 0.2  # the last look is after the deadline
    assert time.monotonic() - t0 < 2


def test_poll_backoff_grows_the_sleep_up_to_its_cap() -> None:
    calls: list[float] = []
    poll(lambda: calls.append(time.monotonic()) or len(calls) == 5, timeout=10, interval=0.005, backoff=10, max_interval=0.2)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]  # sleeps 0.005, 0.05, 0.2 (capped), 0.2
    assert gaps[2] >= 0.2 and gaps[3] >= 0.2  # a sleep is never shorter than asked: it grew
    assert gaps[3] < 1.5  # and the cap held (not 5 s)
