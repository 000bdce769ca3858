"""Issue 11 (round two), the parts below the worker: envelope checks, attribute limits shared by
the publisher and the worker, Milvus error classification, the writer's split of a refused batch
(real Milvus Lite server), bounded Redis (dead-letter cap and retention, tombstone retention,
the memory line), decode memory in bytes, the bucket allow-list and the fetch deadline.
"""

from __future__ import annotations

import http.server
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from PIL import Image
from pymilvus import MilvusException
from pymilvus.exceptions import DataNotMatchException

from cardigan.errors import FetchUnavailable, ForbiddenURI, ImageTooLarge, IndexRejected, IndexUnavailable, InvalidEvent
from cardigan.event import MAX_ATTRIBUTES_BYTES, MAX_ATTRIBUTES_DEPTH, parse_event
from cardigan.imaging.decode import decode
from cardigan.imaging.fetch import Fetcher, make_s3_client
from cardigan.ops.publish import Publisher
from cardigan.ops.status import format_memory, redis_memory
from cardigan.store.deadletter import DeadLetters
from cardigan.store.guard import VersionGuard, make_redis
from cardigan.store.index import Index, classify
from cardigan.store.tombstones import Tombstones
from config.settings import Settings
from devkit.stack import StackInfo
from workers.envelope import BadEnvelope, ExpiredMessage, check_embed, check_envelope, check_task_id
from workers.writer import IndexWriter, WriteOp

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
NOWHERE = "redis://127.0.0.1:1/0"


# -- 1. the envelope -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "error", "field", "words"),
    [
        ({"retries": None}, BadEnvelope, "retries", "must be an integer, got None"),
        ({"retries": -5}, BadEnvelope, "retries", "between 0 and"),
        ({"retries": 10**30}, BadEnvelope, "retries", "between 0 and"),
        ({"retries": "3"}, BadEnvelope, "retries", "must be an integer"),
        ({"retries": True}, BadEnvelope, "retries", "must be an integer"),
        ({"eta": "2999-01-01T00:00:00+00:00"}, BadEnvelope, "eta", "more than 3600 s ahead"),
        ({"eta": "9999-12-31T23:59:59-14:00"}, BadEnvelope, "eta", ""),  # past year 9999 in UTC
        ({"eta": "tomorrow"}, BadEnvelope, "eta", "not an ISO 8601 date-time"),
        ({"eta": 12345}, BadEnvelope, "eta", "ISO 8601 date-time string or null"),
        ({"expires": "2020-01-01T00:00:00Z"}, ExpiredMessage, "expires", "expired at 2020-01-01"),
        ({"expires": "not-a-date"}, BadEnvelope, "expires", "not an ISO 8601"),
        ({"timelimit": "forever"}, BadEnvelope, "timelimit", "[soft, hard]"),
        ({"timelimit": [1, float("nan")]}, BadEnvelope, "timelimit", "[soft, hard]"),
    ],
)
def test_bad_envelope_fields_are_named(fields: dict[str, Any], error: type[Exception], field: str, words: str) -> None:
    with pytest.raises(error) as e:
        check_envelope({"retries": 0, "eta": None, "expires": None, **fields}, max_eta_s=3600, now=NOW)
    assert e.value.field == field and words in e.value.reason  # type: ignore[attr-defined]


def test_sane_envelopes_pass() -> None:
    soon = (NOW + timedelta(seconds=30)).isoformat()
    later = (NOW + timedelta(hours=2)).isoformat()
    check_envelope({"retries": 0, "eta": None, "expires": None}, max_eta_s=3600, now=NOW)
    check_envelope({"retries": 7, "eta": soon, "expires": later, "timelimit": [None, None]}, max_eta_s=3600, now=NOW)
    check_envelope({}, max_eta_s=3600, now=NOW)  # protocol 1 may leave them out
    assert check_task_id("5e1c6d4e-0b7c-4bd5-8f3a-2f1e9d1c0a11")
    check_embed({"callbacks": None, "errbacks": None, "chain": None, "chord": None})


def test_task_ids_and_workflows() -> None:
    for bad in ("x" * 300, "a\nb", "", None, 7):
        with pytest.raises(BadEnvelope):
            check_task_id(bad)
    with pytest.raises(BadEnvelope, match="workflows are not accepted \\(chain\\)") as e:
        check_embed({"chain": [{"task": "celery.accumulate"}]})
    assert e.value.field == "embed"


# -- 2. attribute limits, the same in the publisher and the worker -------------------------------


def _event(attributes: Any) -> dict[str, Any]:
    return {"type": "add", "product_id": "sku-1", "version": 1, "images": [{"uri": "s3://catalog/a.jpg"}], "attributes": attributes}


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        ({"price": float("nan")}, "at price: nan is not a finite number"),
        ({"sizes": [1, {"w": float("inf")}]}, "at sizes[1].w: inf is not a finite number"),
        ({"name": "caf\ud800"}, "at name: contains a lone surrogate"),
        ({"\udc00": 1}, "a key contains a lone surrogate"),
        ({"blob": "x" * MAX_ATTRIBUTES_BYTES}, f"over the Milvus JSON field limit of {MAX_ATTRIBUTES_BYTES} bytes"),
        ({"n": 2**64}, "at n: integer outside the 64-bit range"),
        (
            {"deep": json.loads("[" * (MAX_ATTRIBUTES_DEPTH + 1) + "]" * (MAX_ATTRIBUTES_DEPTH + 1))},
            f"nested deeper than {MAX_ATTRIBUTES_DEPTH}",
        ),
    ],
)
def test_attributes_milvus_cannot_store_are_refused_by_publisher_and_worker(attributes: Any, words: str) -> None:
    raw = _event(attributes)
    with pytest.raises(InvalidEvent) as worker_side:
        parse_event(raw, max_images=8)
    with pytest.raises(InvalidEvent) as publisher_side:
        Publisher(Settings(broker_url=NOWHERE)).publish(raw)
    for e in (worker_side.value, publisher_side.value):
        assert e.field == "attributes" and words in e.reason, e.reason


def test_attributes_at_the_limits_pass() -> None:
    depth = MAX_ATTRIBUTES_DEPTH - 1
    nested = json.loads("[" * depth + "1" + "]" * depth)
    fits = {"blob": "é" * ((MAX_ATTRIBUTES_BYTES - 200) // 2), "n": 2**63 - 1, "f": 1.5, "deep": nested, "none": None}
    assert parse_event(_event(fits), max_images=8).attributes == fits


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://Catalog/a.jpg", "invalid bucket name 'Catalog'"),
        ("s3://my_bucket/a.jpg", "invalid bucket name"),
        ("s3://ab/a.jpg", "invalid bucket name"),
        ("s3://a..b/a.jpg", "invalid bucket name"),
        ("s3://catalog/caf\ud800.jpg", "valid string"),  # pydantic refuses lone surrogates in str fields
    ],
)
def test_invalid_s3_locations_are_invalid_events(uri: str, words: str) -> None:
    with pytest.raises(InvalidEvent) as e:
        parse_event({**_event({}), "images": [{"uri": uri}]}, max_images=8)
    assert e.value.field == "images[0].uri" and words in e.value.reason


# -- 2. Milvus errors: permanent or transient ----------------------------------------------------


def test_milvus_errors_are_classified() -> None:
    assert isinstance(classify("upsert", "c", MilvusException(code=1100, message="json too large")), IndexRejected)
    assert isinstance(classify("upsert", "c", MilvusException(code=1101, message="missing")), IndexRejected)
    assert isinstance(classify("upsert", "c", DataNotMatchException(message="bad type")), IndexRejected)
    assert isinstance(classify("upsert", "c", UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")), IndexRejected)
    for transient in (
        MilvusException(code=2, message="service unavailable"),
        MilvusException(code=8, message="rate limit exceeded"),
        MilvusException(code=65535, message="unexpected"),
        MilvusException(code=100, message="collection not found"),  # a reindex raced us: try again
        grpc.RpcError(),
        TimeoutError("deadline"),
    ):
        assert isinstance(classify("upsert", "c", transient), IndexUnavailable), transient


@pytest.fixture
def redis_db(stack: StackInfo) -> Any:
    r = make_redis(stack.broker_url.rsplit("/", 1)[0] + "/12")
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def index(stack: StackInfo) -> Iterator[Index]:
    ix = Index(stack.milvus_uri, alias=f"t_split_{random.randrange(1 << 30)}")
    yield ix
    for c in ix.collections():
        ix.drop(c)
    ix.close()


def _op(pid: str, version: int = 1, **row: Any) -> WriteOp:
    base = {
        "pk": f"{pid}#0", "product_id": pid, "image_index": 0, "image_uri": f"s3://catalog/{pid}.jpg", "crop": {"bbox": None},
        "version": version, "model_version": "test", "attributes": {"k": pid}, "embedding": [random.random() for _ in range(512)],
    }  # fmt: skip
    return WriteOp(pid, version, "upsert", [{**base, **row}])


def test_one_refused_row_fails_its_own_event_and_the_batch_lands(index: Index, redis_db: Any) -> None:
    live = index.ensure()
    guard = VersionGuard(redis_db)
    writer = IndexWriter(index, guard, redis_db, max_images=4, live=live)
    ops = [_op(f"ok-{i}") for i in range(9)]
    ops.insert(2, _op("bad-surrogate", attributes={"k": "\ud800"}))  # refused by pymilvus before sending
    ops.insert(7, _op("bad-long-uri", image_uri="s3://catalog/" + "k" * 1200))  # refused by the server (max_length)
    with pytest.raises(IndexRejected):  # each alone is refused, and classified permanent
        index.upsert(live, ops[2].rows)
    with pytest.raises(IndexRejected):
        index.upsert(live, ops[7].rows)
    out = writer.write_batch(ops)
    by_pid = dict(zip([op.product_id for op in ops], out, strict=True))
    assert isinstance(by_pid.pop("bad-surrogate"), IndexRejected)
    assert isinstance(by_pid.pop("bad-long-uri"), IndexRejected)
    assert set(by_pid.values()) == {"applied"}
    assert index.count(live) == 9
    assert {r["product_id"] for r in index.get([f"ok-{i}#0" for i in range(9)], ["product_id"], live)} == {f"ok-{i}" for i in range(9)}
    recorded = guard.versions(live, [op.product_id for op in ops])
    assert recorded["bad-surrogate"] is None and recorded["bad-long-uri"] is None and recorded["ok-8"] == (1, "upsert")


# -- 6. bounded Redis ----------------------------------------------------------------------------


def test_dead_letters_are_capped_and_expire_and_drops_are_counted(redis_db: Any) -> None:
    drops: list[int] = []
    dl = DeadLetters(redis_db, max_letters=3, retention_s=3600, on_drop=drops.append)
    ids = [dl.add(reason=f"r{i}", kind="invalid_event", event={"product_id": f"p{i}"}).id for i in range(5)]
    assert dl.count() == 3 and dl.dropped() == 2 and sum(drops) == 2
    assert [d.id for d in dl.list()] == ids[2:]  # the oldest went
    assert dl.trim(now=time.time() + 3601) == 3 and dl.count() == 0 and dl.dropped() == 5
    big = dl.add(reason="big", kind="invalid_event", event={"blob": "x" * 200_000})
    assert len(json.dumps(dl.get(big.id).event)) < 70_000  # type: ignore[union-attr]


def test_tombstones_refuse_stale_replays_for_the_retention_then_go(index: Index, redis_db: Any) -> None:
    live = index.ensure()
    guard = VersionGuard(redis_db)
    tombs = Tombstones(redis_db, retention_s=600)
    writer = IndexWriter(index, guard, redis_db, max_images=4, live=live, tombstones=tombs)
    assert writer.write_batch([_op("p", 3)]) == ["applied"]
    assert writer.write_batch([WriteOp("p", 5, "delete"), WriteOp("never-seen", 2, "delete")]) == ["applied", "applied"]
    assert tombs.count(live) == 2
    t0 = time.time()
    assert tombs.sweep(live, now=t0 + 599) == 0  # within the retention: kept
    assert writer.write_batch([_op("p", 4)]) == ["stale"]  # a stale replay is refused
    assert writer.write_batch([_op("revived", 1)]) == ["applied"]
    writer.write_batch([WriteOp("revived", 2, "delete")])
    writer.write_batch([_op("revived", 3)])  # re-created: its record is not a tombstone any more
    assert tombs.sweep(live, now=t0 + 3600) == 2  # p and never-seen; revived's live record stays
    assert guard.versions(live, ["p", "never-seen", "revived"]) == {"p": None, "never-seen": None, "revived": (3, "upsert")}
    assert tombs.count(live) == 0
    # documented consequence: after the retention an older replay is applied again
    assert writer.write_batch([_op("p", 4)]) == ["applied"]


def test_redis_memory_status_line(redis_db: Any) -> None:
    m = redis_memory(redis_db)
    assert m["used_bytes"] > 0 and m["policy"]
    line = format_memory(m)
    assert "MiB used" in line and f"policy {m['policy']}" in line
    assert "(50.0%)" in format_memory({**m, "used_bytes": 2**29, "maxmemory_bytes": 2**30, "used_fraction": 0.5})


# -- memory: decode in bytes ---------------------------------------------------------------------


def _tiff(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def test_pixel_mode_counts_float_tiff_refused_before_decoding() -> None:
    size = (2000, 2000)  # 4 Mpx: far under the pixel limit
    small_float = _tiff("F", size)
    assert len(small_float) < 200_000  # a few hundred kB that would need ~180 MB on the way to RGB
    with pytest.raises(ImageTooLarge, match=r"mode F needs about 17\d MiB to decode, over the limit of 100 MiB") as e:
        decode(small_float, max_pixels=40_000_000, max_bytes=100 * 2**20, field="images[0]")
    assert e.value.field == "images[0]"
    rgb = decode(_tiff("RGB", size), max_pixels=40_000_000, max_bytes=100 * 2**20)  # same pixels, 4 B each: fine
    assert rgb.image.size == size


# -- 3. the bucket allow-list and the fetch deadline ---------------------------------------------


@pytest.fixture
def aws_env(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in stack_env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)


def test_bucket_allow_list_and_invalid_locations_are_permanent(stack: StackInfo, aws_env: None) -> None:
    assert Settings(bucket="catalog").allowed_buckets == {"catalog"}
    assert Settings(bucket="catalog", s3_buckets="a-1, b-2").allowed_buckets == {"a-1", "b-2"}  # type: ignore[arg-type]
    s3 = make_s3_client(stack.s3_endpoint_url, "us-east-1")
    s3.put_object(Bucket=stack.bucket, Key="allow/a.jpg", Body=b"jpeg")
    f = Fetcher(s3, max_bytes=1000, local_root=None, buckets=frozenset({stack.bucket}))
    assert f.fetch(f"s3://{stack.bucket}/allow/a.jpg") == b"jpeg"
    with pytest.raises(ForbiddenURI, match="bucket 'other-bucket' is not allowed") as e:
        f.fetch("s3://other-bucket/a.jpg", field="images[0].uri")
    assert e.value.field == "images[0].uri"
    anywhere = Fetcher(s3, max_bytes=1000, local_root=None)  # tools: no list
    with pytest.raises(ForbiddenURI, match="invalid S3 location"):  # was a retried signing error
        anywhere.fetch("s3://bad|bucket/a.jpg")


class _Trickle(http.server.BaseHTTPRequestHandler):
    """An S3 that sends a 200 and then one byte every 50 ms: no single read ever times out."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def log_message(self, *args: Any) -> None:
        pass


def test_fetch_has_an_overall_deadline(aws_env: None) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s3 = make_s3_client(f"http://127.0.0.1:{srv.server_address[1]}", "us-east-1")
        f = Fetcher(s3, max_bytes=10_000, local_root=None, deadline_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(FetchUnavailable, match="took longer than 1 s"):
            f.fetch("s3://catalog/slow.jpg")
        assert time.monotonic() - t0 < 30  # not the 50 s the body takes
    finally:
        srv.shutdown()
        srv.server_close()


def test_index_ensure_raises_our_error_when_milvus_is_gone(stack: StackInfo) -> None:
    """A worker starting as Milvus goes away gets IndexUnavailable (it retries), not a pymilvus type."""
    ix = Index(stack.milvus_uri, alias=f"t_gone_{random.randrange(1 << 30)}")
    ix.client.close()  # the connection is gone, as after a server restart mid-start
    with pytest.raises(IndexUnavailable, match="Milvus ensure on t_gone_"):
        ix.ensure()
