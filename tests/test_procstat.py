"""The one /proc reader and the one percentile."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from cardigan import procstat


def test_percentile_is_nearest_rank() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert procstat.percentile(xs, 50) == 3.0
    assert procstat.percentile(xs, 99) == 5.0
    assert procstat.percentile(xs, 0) == 1.0
    assert procstat.percentile(list(range(1, 101)), 99) == 99  # a measured value, not an interpolation
    assert procstat.percentile([], 50) != procstat.percentile([], 50)  # nan


def test_proc_stat_names_a_process_and_sees_it_go() -> None:
    me = procstat.proc_stat(os.getpid())
    assert me is not None and not me.gone and me.start_ticks > 0
    child = subprocess.Popen([sys.executable, "-c", "sum(range(3_000_000))"])
    child.wait()
    assert procstat.proc_stat(child.pid) is None  # reaped: gone
    assert procstat.rss_mb(os.getpid()) and procstat.rss_mb(os.getpid()) > 10


def test_thread_cpu_groups_by_thread_name() -> None:
    done = threading.Event()

    def spin() -> None:
        x = 0
        while not done.is_set():
            x += 1

    t = threading.Thread(target=spin, name="busy-1")
    t.start()
    groups: dict[str, float] = {}
    try:
        for _ in range(50):  # up to 5 s on a loaded machine
            threading.Event().wait(0.1)
            groups = procstat.thread_cpu(lambda name: "busy" if name and name.startswith("busy") else "rest")
            if groups.get("busy", 0) > 0.05:
                break
    finally:
        done.set()
        t.join()
    assert groups.get("busy", 0) > 0.05, groups
