"""Snapshot sources for a reindex: the products to rebuild, one event each, resumable.

Three sources, each an iterator of :class:`Item` in a stable order with a cursor to resume
after any item: the live collection (primary-key order, which is product-id order), a
JSON-lines manifest (line numbers) and an S3 prefix (key order; a product's keys are one
contiguous range).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cardigan.errors import InvalidEvent, PermanentError
from cardigan.event import Event, is_product_id, parse_event, primary_key
from cardigan.store.guard import VersionGuard
from cardigan.store.index import Index


class SourceError(PermanentError):
    """The snapshot source cannot be read as given; the message says how to name it."""

    kind = "reindex_source"


@dataclass
class Item:
    """One product of a snapshot: its event, or why there is none; ``cursor`` resumes after it."""

    cursor: str
    event: Event | None
    rejected: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    kind: Literal["index", "manifest", "s3"]
    arg: str = ""

    def describe(self) -> str:
        return {"index": "the live collection", "manifest": f"manifest {self.arg}", "s3": f"images under {self.arg}"}[self.kind]


def events_from_collection(index: Index, guard: VersionGuard, collection: str, pids: list[str], max_images: int) -> dict[str, Event | None]:
    """Each product's current state in ``collection`` as an event at its version.

    The guard is read before the rows: rows at the recorded version are then complete. None
    means a write is in flight (rows and record disagree): the catch-up pass takes it later.
    """
    recs = guard.versions(collection, pids)
    keys = [primary_key(p, i) for p in pids for i in range(max_images)]
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in index.get(keys, ["product_id", "image_index", "image_uri", "crop", "version", "attributes"], collection):
        rows.setdefault(row["product_id"], []).append(row)
    out: dict[str, Event | None] = {}
    for pid in pids:
        rec, got = recs[pid], sorted(rows.get(pid, []), key=lambda r: int(r["image_index"]))
        if rec is not None and rec[1] == "delete":
            out[pid] = Event(type="delete", product_id=pid, version=rec[0])
            continue
        if not got:
            out[pid] = None
            continue
        top = max(int(r["version"]) for r in got)
        cur = [r for r in got if int(r["version"]) == top]
        if (rec is not None and rec[0] != top) or [int(r["image_index"]) for r in cur] != list(range(len(cur))):
            out[pid] = None
            continue
        images = [_image(r) for r in cur]
        out[pid] = Event.model_validate(
            {"type": "modify", "product_id": pid, "version": top, "images": images, "attributes": cur[0].get("attributes") or {}}
        )
    return out


def index_items(index: Index, guard: VersionGuard, live: str, *, after: str | None, max_images: int, batch: int = 100) -> Iterator[Item]:
    """Every product of the live collection, in primary-key order (= product id order)."""
    pending: list[str] = []
    last = None
    for row in index.iter_rows(live, batch=1000, fields=["pk", "product_id"]):
        pid = str(row["product_id"])
        if pid == last or (after is not None and pid <= after):
            continue  # a product's rows are consecutive; a resume skips what was published
        last = pid
        pending.append(pid)
        if len(pending) >= batch:
            events = events_from_collection(index, guard, live, pending, max_images)
            yield from (Item(p, events[p]) for p in pending)
            pending = []
    if pending:
        events = events_from_collection(index, guard, live, pending, max_images)
        yield from (Item(p, events[p]) for p in pending)


def manifest_items(path: Path, *, after: str | None, max_images: int, max_id_len: int) -> Iterator[Item]:
    """Events from a JSON-lines file; the cursor is the line number."""
    start = int(after) if after else 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if n <= start or not line.strip():
                continue
            try:
                ev = parse_event(line.strip(), max_images=max_images, max_id_len=max_id_len)
            except InvalidEvent as e:
                yield Item(str(n), None, rejected=f"line {n}: {e.reason}")
                continue
            yield Item(str(n), ev)


def count_manifest(path: Path) -> int:
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


IMAGE_SUFFIXES = (".jpg", ".jpeg")


def parse_s3_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` → ``(bucket, "prefix/")``."""
    if not uri.startswith("s3://"):
        raise SourceError(f"--s3-prefix must look like s3://bucket/prefix/, got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise SourceError(f"--s3-prefix {uri!r} has no bucket")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _s3_products(s3: Any, bucket: str, prefix: str, after: str | None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(product_id, objects)`` in key order: a product's keys are one contiguous range."""
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if after:
        kw["StartAfter"] = after
    cur: str | None = None
    objs: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(**kw):
        for obj in page.get("Contents", []):
            rest = obj["Key"][len(prefix) :]
            pid, slash, name = rest.partition("/")
            if not slash or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if pid != cur:
                if cur is not None:
                    yield cur, objs
                cur, objs = pid, []
            objs.append(obj)
    if cur is not None:
        yield cur, objs


def s3_items(s3: Any, uri: str, *, after: str | None, max_images: int, max_id_len: int) -> Iterator[Item]:
    """One product per ``<prefix><product_id>/<name>.jpg``; version = newest LastModified (ms).

    The cursor is ``<prefix><product_id>0``: '0' follows '/', so resuming after it skips
    exactly this product's keys.
    """
    bucket, prefix = parse_s3_prefix(uri)
    for pid, objs in _s3_products(s3, bucket, prefix, after):
        cursor = f"{prefix}{pid}0"
        if not is_product_id(pid, max_id_len):
            yield Item(cursor, None, rejected=f"s3://{bucket}/{prefix}{pid}/: {pid!r} is not a valid product id")
            continue
        objs = sorted(objs, key=lambda o: o["Key"])[:max_images]
        version = max(int(o["LastModified"].timestamp() * 1000) for o in objs)
        images = [{"uri": f"s3://{bucket}/{o['Key']}"} for o in objs]
        yield Item(cursor, Event.model_validate({"type": "modify", "product_id": pid, "version": version, "images": images}))


def count_s3(s3: Any, uri: str) -> int:
    bucket, prefix = parse_s3_prefix(uri)
    return sum(1 for _ in _s3_products(s3, bucket, prefix, None))


def wire(ev: Event) -> dict[str, Any]:
    """The event as a bulk task carries it (no publish time: snapshots are not freshness)."""
    body = ev.model_dump(mode="json", exclude_none=True)
    body.pop("published_at_ms", None)
    for img in body.get("images", []):
        if img.get("bbox") is None:
            img.pop("bbox", None)
    return body


def _image(row: dict[str, Any]) -> dict[str, Any]:
    """An event image from a stored row, with the bbox the original event gave."""
    bbox = (row.get("crop") or {}).get("bbox")
    return {"uri": row["image_uri"], **({"bbox": bbox} if bbox else {})}
