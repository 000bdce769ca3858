"""The backfill: check every product of the alias once (a catalog indexed before detection).

Products are read in primary-key order (``pk > cursor``, pages of ids only) and checked in
batches by the same Detector the workers run; the cursor (the last primary key done) is kept in
Redis after every batch, so an interrupted scan resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from cardigan.duplicates.detect import Detector
from cardigan.keys import DUP_SCAN_KEY
from cardigan.store.index import Index, escape_filter_string


def scan_state(r: redis.Redis, alias: str) -> dict[str, Any] | None:
    raw = r.get(DUP_SCAN_KEY.format(alias=alias))
    return json.loads(raw) if raw else None  # type: ignore[arg-type]


def _pages(index: Index, cursor: str, page: int) -> Iterator[list[dict[str, Any]]]:
    """Rows (pk, product_id) after ``cursor``, ``page`` at a time, in pk order: a plain query
    with a limit returns any matching rows on a server; the query iterator pages by pk."""
    flt = f"pk > {escape_filter_string(cursor)}" if cursor else ""
    it = index.client.query_iterator(
        index.alias, batch_size=page, filter=flt, output_fields=["pk", "product_id"], consistency_level="Strong"
    )
    try:
        while rows := it.next():
            yield sorted(rows, key=lambda r: r["pk"])
    finally:
        it.close()


def scan(
    detector: Detector,
    r: redis.Redis,
    *,
    batch: int = 64,
    restart: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Check every product after the saved cursor; returns the final scan state.

    ``on_progress(rows_done, pairs_found_so_far)`` after each batch (for a progress bar)."""
    index = detector.index
    key = DUP_SCAN_KEY.format(alias=index.alias)
    st = None if restart else scan_state(r, index.alias)
    if st is None or st.get("done"):
        st = {"cursor": "", "rows": 0, "products": 0, "added": 0, "dropped": 0, "started": time.time(), "done": False}
    page = max(batch * 4, 256)
    pending: list[str] = []
    last_pk = st["cursor"]
    for rows in _pages(index, st["cursor"], page):
        for row in rows:
            pid = str(row["product_id"])
            # a product's keys are pid#0..pid#K-1, adjacent in pk order: check it once
            if not pending or pending[-1] != pid:
                if len(pending) >= batch:
                    _check(detector, pending, st)
                    st["cursor"] = last_pk
                    r.set(key, json.dumps(st))
                    if on_progress:
                        on_progress(st["rows"], st["added"])
                    pending = []
                pending.append(pid)
            st["rows"] += 1
            last_pk = str(row["pk"])
    if pending:
        _check(detector, pending, st)
    st.update(cursor=last_pk, done=True, finished=time.time())
    r.set(key, json.dumps(st))
    if on_progress:
        on_progress(st["rows"], st["added"])
    return st


def _check(detector: Detector, pids: list[str], st: dict[str, Any]) -> None:
    res = detector.check(pids)
    st["products"] += res.products
    st["added"] += res.added
    st["dropped"] += res.dropped
