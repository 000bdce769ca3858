"""What Linux's /proc says about a process or this process's threads, and the one percentile.

The bench, the demo, the embedded stack and the search service each read /proc (CPU seconds per
stage, resident memory, whether a pid is still the process that was started) and summarise
latencies; one reader and one percentile keep their numbers comparable.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` that callers use."""

    state: str  # R, S, D, Z (zombie), X (dead) …
    start_ticks: int  # start time in clock ticks since boot: with the pid, names one process
    cpu_s: float  # user + system CPU seconds, its threads and reaped children included

    @property
    def gone(self) -> bool:
        return self.state in ("Z", "X")


def _fields(path: str) -> list[str] | None:
    try:
        stat = Path(path).read_text()
    except (OSError, ValueError):
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'


def proc_stat(pid: int) -> ProcStat | None:
    """A process's state, start time and CPU seconds; None if it is gone."""
    f = _fields(f"/proc/{pid}/stat")
    if f is None:
        return None
    return ProcStat(f[0], int(f[19]), sum(int(x) for x in f[11:15]) / TICK)


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used (0 if gone): on a shared machine, per-image CPU is steadier than wall time."""
    st = proc_stat(pid)
    return st.cpu_s if st else 0.0


def rss_mb(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB; None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def thread_cpu(group_of: Callable[[str | None], str]) -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by ``group_of(thread name)``.

    Threads Python does not know (torch's intra-op pool, gRPC's) are passed as ``None``.
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        f = _fields(f"/proc/self/task/{tid}/stat")
        if f is None:
            continue  # the thread ended
        group = group_of(names.get(int(tid)))
        out[group] = out.get(group, 0.0) + (int(f[11]) + int(f[12])) / TICK
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0-100): every reported value is one that was measured."""
    if not values:
        return float("nan")
    xs = sorted(values)
    return float(xs[max(0, math.ceil(q / 100 * len(xs)) - 1)])
