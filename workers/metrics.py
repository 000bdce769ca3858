"""Prometheus metrics of one worker process, on ``settings.metrics_port`` (+ process index).

Tasks and the pipeline carry no metrics code: outcomes, retries and dead letters come from
Celery's task signals; batch sizes and embed/write time come from the micro-batchers' own
statistics, read at scrape time. The endpoint serves one process: with the threads pool
(what `cardigan worker` runs) that is the whole worker; process i of ``cardigan worker -p N``
(node ``cardigan<i>@host``) listens on ``metrics_port + i``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from celery.signals import task_failure, task_retry, task_success
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from config.settings import Settings

log = logging.getLogger(__name__)

EVENTS = Counter(
    "cardigan_events_total",
    "Events finished, by queue, event type and outcome (applied, stale, dead, skipped)",
    ["queue", "type", "outcome"],
)
DEAD_LETTERS = Counter(
    "cardigan_dead_letters_total", "Events stored as dead letters (permanent errors, retries exhausted, poison)", ["queue"]
)
DEAD_LETTERS_DROPPED = Counter(
    "cardigan_dead_letters_dropped_total", "Dead letters dropped by the cap (CARDIGAN_WORKER__DEAD_LETTER_MAX) or the retention"
)
RETRIES = Counter("cardigan_retries_total", "Retries scheduled after a transient error, by error kind", ["queue", "kind"])
TASK_ERRORS = Counter("cardigan_task_errors_total", "Tasks that raised instead of returning an outcome (a bug, or Redis down)", ["task"])
FRESHNESS = Histogram(
    "cardigan_publish_to_searchable_seconds",
    "From publish to vectors written in Milvus, for applied live events",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
)

_started: set[int] = set()
_lock = threading.Lock()
_VALID_TYPES = ("add", "modify", "delete")


def _queue(sender: Any) -> str:
    info = getattr(getattr(sender, "request", None), "delivery_info", None) or {}
    return str(info.get("routing_key") or "unknown")


def _event_type(event: Any) -> str:
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if kind in _VALID_TYPES else "invalid"


def count_outcomes(queue: str, outcomes: dict[str, int]) -> None:
    """A bulk chunk's outcomes, ``{"<type>:<outcome>": n}`` (also called before a partial retry)."""
    for key, n in outcomes.items():
        kind, _, outcome = str(key).partition(":")
        EVENTS.labels(queue, kind, outcome or "unknown").inc(n)
        if outcome == "dead":
            DEAD_LETTERS.labels(queue).inc(n)


@task_success.connect(weak=False)
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if not isinstance(result, dict):
        return
    queue = _queue(sender)
    if result.get("bulk"):
        count_outcomes(queue, result.get("outcomes") or {})
        return
    args = getattr(sender.request, "args", None) or []
    event = args[0] if args else None
    outcome = str(result.get("outcome", "unknown"))
    EVENTS.labels(queue, str(result.get("type") or _event_type(event)), outcome).inc()
    if outcome == "dead":
        DEAD_LETTERS.labels(queue).inc()
    elif outcome == "applied" and isinstance(event, dict) and isinstance(event.get("published_at_ms"), int):
        FRESHNESS.observe(max(0.0, time.time() - event["published_at_ms"] / 1000))


@task_retry.connect(weak=False)
def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    RETRIES.labels(_queue(sender), str(getattr(reason, "kind", type(reason).__name__))).inc()


@task_failure.connect(weak=False)
def _on_failure(sender: Any = None, **_: Any) -> None:
    TASK_ERRORS.labels(str(getattr(sender, "name", "unknown"))).inc()


class PipelineCollector(Collector):
    """This process's batchers, read when Prometheus scrapes (nothing before the model loads)."""

    def describe(self) -> list[Metric]:
        return []  # registering must not call collect(): the pipeline does not exist yet

    def collect(self) -> Iterator[Metric]:
        from workers import runtime

        p = runtime.current_pipeline()
        if p is None:
            return
        for name, batcher, unit in (("embed", p.embedder, "images"), ("write", p.write_batcher, "product writes")):
            st = batcher.stats
            yield SummaryMetricFamily(
                f"cardigan_{name}_batch_size", f"{unit.capitalize()} per {name} batch", count_value=st.batches, sum_value=st.items
            )
            yield SummaryMetricFamily(
                f"cardigan_{name}_batch_seconds", f"Time per {name} batch ({name} latency)", count_value=st.batches, sum_value=st.busy_s
            )
        yield from _detector_metrics(p)
        info = GaugeMetricFamily(
            "cardigan_worker_info", "The model this process embeds with and its alias", labels=["model_version", "alias", "device"]
        )
        info.add_metric([p.encoder.model_version, p.settings.collection, str(p.encoder.device)], 1)
        yield info


def _detector_metrics(p: Any) -> Iterator[Metric]:
    """Double-listing detection in this process (workers/detector.py), plus the alias's open
    pairs and pending checks from the state Redis (two O(1) reads)."""
    d = getattr(p, "detector", None)
    if d is None:
        return
    st = d.stats
    for name, help_, value in (
        ("pairs_found", "Double-listing pairs this process recorded", st.pairs_added),
        ("pairs_dropped", "Pairs this process dropped (a modify or delete no longer matches)", st.pairs_dropped),
        ("groups_new", "New double-listing groups this process opened", st.new_groups),
        ("products_checked", "Products checked for double listings", st.products),
        ("failures", "Detection batches that failed (retried after duplicates.retry_s)", st.failures),
        ("searches", "Range-search calls of detection", st.searches),
        ("products_read_back", "Checked products whose rows were read from Milvus (not held from the write)", st.reads),
    ):
        yield CounterMetricFamily(f"cardigan_duplicates_{name}", help_, value=value)
    yield SummaryMetricFamily(
        "cardigan_duplicates_lag_seconds",
        "From publish to the product checked for double listings",
        count_value=st.lag_count,
        sum_value=st.lag_sum_s,
    )
    yield SummaryMetricFamily("cardigan_duplicates_batch_seconds", "Time per detection batch", count_value=st.batches, sum_value=st.busy_s)
    try:
        open_, pending = d.store.count(), d.store.pending()
    except Exception:  # noqa: BLE001 - Redis down: the counters above still scrape
        return
    yield GaugeMetricFamily("cardigan_duplicates_pairs_open", "Double-listing pairs recorded for the alias", value=open_)
    yield GaugeMetricFamily("cardigan_duplicates_pending", "Products waiting for a double-listing check", value=pending)


REGISTRY.register(PipelineCollector())


def process_index(nodename: str) -> int:
    """``cardigan3@host`` → 3 (the node names `cardigan worker` gives); anything else → 0."""
    m = re.match(r"^cardigan(\d+)@", nodename or "")
    return int(m.group(1)) if m else 0


def start(settings: Settings, nodename: str = "") -> int | None:
    """Serve /metrics on ``metrics_port + process index`` when the port is set; once per process."""
    if settings.metrics_port <= 0:
        return None
    port = settings.metrics_port + process_index(nodename)
    with _lock:
        if port in _started:
            return port
        try:
            start_http_server(port, addr=settings.metrics_host)
        except OSError as e:
            log.error("metrics endpoint not started: port %d: %s (set CARDIGAN_METRICS_PORT to a free port, or 0)", port, e)
            return None
        _started.add(port)
    log.info("Prometheus metrics on %s:%d/metrics", settings.metrics_host, port)
    return port
