"""End to end: real broker, real worker processes, Milvus Lite server over gRPC, S3 over HTTP."""

from __future__ import annotations

import io
import json
import random
import uuid
import zlib

import pytest
from PIL import Image, ImageDraw

from cardigan.event import primary_key
from cardigan.ops.verify import Expected, verify_index
from tests.harness import Namespace, wait_until

pytestmark = pytest.mark.e2e


def photo(seed: int, size: int = 96) -> bytes:
    """A product-like picture: a coloured shape on white, different for each seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(256) for _ in range(3))
    x0, y0 = rng.randrange(5, 30), rng.randrange(5, 30)
    d.rectangle([x0, y0, size - rng.randrange(5, 30), size - rng.randrange(5, 30)], fill=colour)
    for _ in range(6):
        c = tuple(rng.randrange(256) for _ in range(3))
        x, y = rng.randrange(size), rng.randrange(size)
        d.ellipse([x, y, x + 12, y + 12], fill=c)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def add(ns: Namespace, pid: str, version: int, n: int, *, kind: str = "add", seed: int = 0) -> dict:
    base = zlib.crc32(pid.encode()) * 1000 + seed * 100  # every product looks different
    uris = [ns.put_image(f"{pid}/v{version}/{i}.jpg", photo(base + version * 10 + i)) for i in range(n)]
    return {"type": kind, "product_id": pid, "version": version, "images": [{"uri": u} for u in uris], "attributes": {"category": "test"}}


def delete(pid: str, version: int) -> dict:
    return {"type": "delete", "product_id": pid, "version": version}


def converge(ns: Namespace, expected: dict[str, Expected | None], timeout: float = 120) -> None:
    """Wait until the broker has nothing left, then the index must equal ``expected``."""
    wait_until(ns.drained, timeout, "queues to drain")
    index = ns.index()
    max_images = ns.settings.limits.max_images
    last = None

    def ok() -> bool:
        nonlocal last
        last = verify_index(index, expected, max_images=max_images)
        return last.ok

    try:
        wait_until(ok, 20, "the index to match")
    except TimeoutError:
        pytest.fail("index differs from the expected state:\n" + "\n".join(last.mismatches[:20]))


@pytest.mark.real_milvus
def test_e2e_add_modify_delete(ns: Namespace) -> None:
    ns.start_worker()
    ns.publish([add(ns, "sku-1", 1, 3), add(ns, "sku-2", 1, 2)])
    converge(ns, {"sku-1": Expected(1, 3), "sku-2": Expected(1, 2)})

    # searchable: the product's own photo finds it first
    index = ns.index()
    rows = index.get_product("sku-1", 8)
    hits = index.search([rows[0]["embedding"]], 3, consistency="Strong")[0]
    assert hits[0]["product_id"] == "sku-1" and hits[0]["score"] > 0.99, [(h["pk"], h["score"]) for h in hits]
    assert "crop" not in hits[0] and hits[0]["image_uri"]  # a search does not carry the duplicate descriptors
    assert rows[0]["model_version"].startswith("mobilenet_v3_small")

    # modify replaces every vector: 3 images become 1
    ns.publish([add(ns, "sku-1", 2, 1, kind="modify")])
    converge(ns, {"sku-1": Expected(2, 1), "sku-2": Expected(1, 2)})
    assert [r["pk"] for r in index.get_product("sku-1", 8)] == [primary_key("sku-1", 0)]

    # delete removes them all
    ns.publish([delete("sku-2", 5)])
    converge(ns, {"sku-1": Expected(2, 1), "sku-2": None})
    assert index.count() == 1


def test_e2e_duplicates_and_out_of_order_converge(ns: Namespace) -> None:
    ns.start_worker()
    events, expected = [], {}
    for p in range(12):
        pid = f"ooo-{p}"
        versions = [add(ns, pid, v, 1 + (v + p) % 3, kind="add" if v == 1 else "modify") for v in (1, 2, 3)]
        if p % 3 == 0:
            versions.append(delete(pid, 4))
            expected[pid] = None
        else:
            expected[pid] = Expected(3, 1 + (3 + p) % 3)
        batch = versions + versions[:2]  # duplicates
        random.shuffle(batch)  # and any order
        events += batch
    # a stale modify that arrives after the delete must not resurrect the product
    events.append(add(ns, "ooo-0", 3, 2, kind="modify"))
    ns.publish(events)
    converge(ns, expected)


@pytest.mark.real_milvus
def test_e2e_concurrent_modify_and_delete_two_workers(ns: Namespace) -> None:
    ns.start_worker()
    ns.start_worker()
    expected: dict[str, Expected | None] = {}
    events = []
    for p in range(20):
        pid = f"race-{p}"
        mod = add(ns, pid, 7 if p % 2 else 9, 2, kind="modify")
        dele = delete(pid, 8)
        expected[pid] = Expected(9, 2) if p % 2 == 0 else None
        events += [mod, dele] if p % 3 else [dele, mod]
    ns.publish(events)
    converge(ns, expected)
    logs = [w.log_text() for w in ns.workers]
    assert all("succeeded" in t for t in logs), "both workers should have taken part"


def test_e2e_bad_events_are_dead_letters_and_worker_keeps_serving(ns: Namespace) -> None:
    w = ns.start_worker()
    good = add(ns, "good-1", 1, 2)
    missing = {
        "type": "add",
        "product_id": "bad-missing",
        "version": 1,
        "images": [{"uri": f"s3://{ns.settings.bucket}/nope/{uuid.uuid4().hex}.jpg"}],
    }
    corrupt = {
        "type": "add",
        "product_id": "bad-corrupt",
        "version": 1,
        "images": [{"uri": ns.put_image("bad/corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")}],
    }
    mixed = {
        "type": "add",
        "product_id": "bad-mixed",
        "version": 1,
        "images": [{"uri": ns.put_image("bad/ok.jpg", photo(5))}, {"uri": ns.put_image("bad/empty.jpg", b"")}],
    }
    ns.publish([good, missing, corrupt, mixed])
    # an invalid event sent by a producer that skipped validation (another language)
    pub = ns.publisher()
    pub.app.send_task(
        "cardigan.index_event",
        args=[{"type": "add", "product_id": 'x" or product_id != "', "version": 1, "images": []}],
        queue=ns.settings.queue,
    )
    converge(ns, {"good-1": Expected(1, 2), "bad-missing": None, "bad-corrupt": None, "bad-mixed": None})
    wait_until(lambda: ns.dead().count() == 4, 30, "4 dead letters")
    reasons = {d.product_id: (d.kind, d.reason) for d in ns.dead().list()}
    assert reasons["bad-missing"][0] == "missing_image" and "does not exist" in reasons["bad-missing"][1]
    assert reasons["bad-corrupt"][0] == "corrupt_image" and "images[0]" in reasons["bad-corrupt"][1]
    assert reasons["bad-mixed"][0] == "corrupt_image" and "images[1]" in reasons["bad-mixed"][1]
    assert reasons['x" or product_id != "'][0] == "invalid_event" and "product_id" in reasons['x" or product_id != "'][1]
    assert w.alive()
    # and it still serves
    ns.publish([add(ns, "good-2", 1, 1)])
    converge(ns, {"good-1": Expected(1, 2), "good-2": Expected(1, 1)})


def test_e2e_message_from_another_language(ns: Namespace) -> None:
    """A producer that speaks only AMQP/Redis + JSON: Celery protocol v2 built by hand."""
    from kombu import Connection

    ns.start_worker()
    ev = add(ns, "poly-1", 1, 1)
    task_id = str(uuid.uuid4())
    headers = {
        "lang": "go",
        "task": "cardigan.index_event",
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "catalog-go",
    }
    body = json.dumps([[ev], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    with Connection(ns.settings.broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            routing_key=ns.settings.queue,
            exchange="cardigan",
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            declare=[],
        )
    converge(ns, {"poly-1": Expected(1, 1)})


def _brokers() -> list[str]:
    """The embedded Valkey always; the machine's Redis and RabbitMQ too, when they run here."""
    from tests.conftest import local_broker_urls

    return ["embedded", *local_broker_urls()]


@pytest.mark.parametrize("broker", _brokers())
def test_e2e_broker_matrix(stack_env: dict[str, str], tmp_path, broker: str) -> None:
    """The same add/modify/delete run over each broker; state stays on the embedded Valkey."""
    from tests.harness import new_namespace

    overrides = {}
    if broker != "embedded":
        overrides = {"CARDIGAN_BROKER_URL": broker, "CARDIGAN_STATE_URL": stack_env["CARDIGAN_BROKER_URL"].rsplit("/", 1)[0] + "/15"}
    ns = new_namespace(stack_env, tmp_path, **overrides)
    try:
        ns.start_worker()
        ns.publish([add(ns, "mx-1", 1, 2), add(ns, "mx-2", 1, 1)])
        ns.publish([add(ns, "mx-1", 2, 1, kind="modify"), delete("mx-2", 2)])
        index = ns.index()
        expected = {"mx-1": Expected(2, 1), "mx-2": None}
        wait_until(lambda: verify_index(index, expected, max_images=8).ok, 90, f"convergence over {broker.split('@')[-1]}")
    finally:
        ns.stop_workers()
