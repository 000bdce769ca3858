"""The search service over HTTP: `cardigan serve` in its own process, real Milvus, S3 and index.

One server for the module (the model loads once, as in production); every bad request the
issue lists gets its 4xx naming the problem, and the good paths return what the index holds.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from PIL import Image

from devkit.catalog import query_photo
from tests.harness import ROOT, wait_until
from tests.serve_harness import DUPLICATE_THRESHOLD, MAX_BYTES, TOKEN, Served, served

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=pytest.mark.real_milvus)])
def sv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The service over Milvus Lite, then over the real server (filters, range reads, auth)."""
    env = request.getfixturevalue("server_stack_env" if request.param == "server" else "stack_env")
    with served(env, tmp_path_factory.mktemp("serve")) as s:
        yield s


def body(r: urllib3.BaseHTTPResponse) -> dict:
    return json.loads(r.data)


def expect_error(r: urllib3.BaseHTTPResponse, status: int, field: str | None, *words: str) -> dict:
    doc = body(r)
    assert r.status == status, (r.status, doc)
    assert doc["field"] == field, doc
    for w in words:
        assert w in doc["error"], (w, doc)
    return doc


def catalog_photo(sv: Served, i: int = 1) -> tuple[bytes, list[int] | None]:
    img = sv.catalog[i].images[0]
    return img.data, list(img.bbox) if img.bbox else None


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- good requests


def test_search_finds_the_product_of_its_own_photo(sv: Served) -> None:
    p = sv.catalog[2]
    data, bbox = catalog_photo(sv, 2)
    fields = {"file": ("shop.jpg", data, "image/jpeg"), "k": "5"}
    if bbox:
        fields["bbox"] = ",".join(map(str, bbox))
    r = sv.search(fields)
    doc = body(r)
    assert r.status == 200, doc
    hits = doc["results"]
    assert 1 <= len(hits) <= 5
    assert hits[0]["product_id"] == p.product_id and hits[0]["score"] > 0.99, hits[0]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len({h["product_id"] for h in hits}) == len(hits)  # one hit per product
    assert hits[0]["version"] == 1 and hits[0]["model_version"] == doc["query_model_version"]
    assert hits[0]["attributes"] == {"category": p.category}
    assert hits[0]["image_url"] == f"/v1/products/{p.product_id}/images/0"


def test_search_with_a_street_photo_and_a_drawn_box(sv: Served) -> None:
    q = query_photo(sv.catalog[3])
    fields = {"file": ("street.jpg", q.data, "image/jpeg"), "k": "3"}
    if q.bbox:
        fields["bbox"] = json.dumps(list(q.bbox))
    r = sv.search(fields)
    assert r.status == 200, r.data
    assert len(body(r)["results"]) == 3


def test_filter_on_category_returns_only_that_category(sv: Served) -> None:
    cats = {p.category for p in sv.catalog}
    data, _ = catalog_photo(sv)
    for cat in sorted(cats)[:2]:
        r = sv.search({"file": ("q.jpg", data, "image/jpeg"), "k": "20", "filter": json.dumps({"category": cat})})
        hits = body(r)["results"]
        assert r.status == 200 and hits
        assert {h["attributes"]["category"] for h in hits} == {cat}
        expected = {p.product_id for p in sv.catalog if p.category == cat} | ({"dup-1"} if sv.catalog[0].category == cat else set())
        assert {h["product_id"] for h in hits} == expected
    two = sorted(cats)[:2]
    r = sv.search({"file": ("q.jpg", data, "image/jpeg"), "k": "20", "filter": json.dumps({"category": two})})
    assert r.status == 200, body(r)
    assert {h["attributes"]["category"] for h in body(r)["results"]} == set(two)


def test_similar_items_exclude_the_product_and_find_its_double(sv: Served) -> None:
    first = sv.catalog[0].product_id
    r = sv.request("GET", f"/v1/products/{first}/similar?k=4")
    hits = body(r)["results"]
    assert r.status == 200 and len(hits) == 4
    assert first not in {h["product_id"] for h in hits}
    assert hits[0]["product_id"] == "dup-1" and hits[0]["score"] > 0.99


def test_near_duplicates_of_one_product_and_groups(sv: Served) -> None:
    first = sv.catalog[0].product_id
    r = sv.request("GET", "/v1/products/dup-1/duplicates")
    doc = body(r)
    assert r.status == 200 and [h["product_id"] for h in doc["results"]] == [first], doc
    assert doc["threshold"] == DUPLICATE_THRESHOLD
    r = sv.request("GET", "/v1/duplicates")
    doc = body(r)
    assert r.status == 200
    assert [[p["product_id"] for p in g["products"]] for g in doc["groups"]] == [sorted(["dup-1", first])]
    assert doc["pairs_recorded"] == 1 and doc["threshold"] == DUPLICATE_THRESHOLD


def test_duplicates_are_the_pairs_detection_recorded(sv: Served) -> None:
    """Both endpoints read the recorded pairs (no search): a pair recorded by hand shows up."""
    from cardigan.duplicates.pairs import Pair, PairStore
    from cardigan.store.guard import make_redis

    a, b = sv.catalog[4].product_id, sv.catalog[5].product_id
    store = PairStore(make_redis(sv.ns.settings.effective_state_url), sv.ns.settings.collection)
    store.replace({a: [Pair.of(a, b, 0.995, 1, 1, 0, 0)]})
    try:
        doc = body(sv.request("GET", f"/v1/products/{b}/duplicates"))
        assert [(h["product_id"], h["score"]) for h in doc["results"]] == [(a, 0.995)], doc
        groups = [[p["product_id"] for p in g["products"]] for g in body(sv.request("GET", "/v1/duplicates"))["groups"]]
        assert sorted([a, b]) in groups and len(groups) == 2
        store.replace({a: [Pair.of(a, b, 0.98, 1, 1, 0, 0)]})  # below serve.duplicate_threshold: not shown
        assert body(sv.request("GET", f"/v1/products/{b}/duplicates"))["results"] == []
    finally:
        store.remove_product(a)


def test_catalog_images_come_through_the_service(sv: Served) -> None:
    p = sv.catalog[1]
    r = sv.request("GET", f"/v1/products/{p.product_id}/images/0")
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.data == p.images[0].data


def test_health_ready_metrics_and_docs(sv: Served) -> None:
    assert body(sv.request("GET", "/healthz", auth=False)) == {"status": "ok"}
    ready = body(sv.request("GET", "/readyz", auth=False))
    assert ready["status"] == "ready" and ready["model_loaded"] and ready["live_collection"] == f"{sv.ns.settings.collection}_v1"
    m = sv.request("GET", "/metrics").data.decode()
    assert 'cardigan_serve_requests_total{route="/v1/search",status="200"}' in m
    assert "cardigan_serve_embed_items" in m
    assert 'cardigan_serve_thread_cpu_seconds{stage="model"}' in m and 'cardigan_serve_thread_cpu_seconds{stage="http"}' in m
    spec = body(sv.request("GET", "/openapi.json", auth=False))
    assert {"/v1/search", "/v1/products/{pid}/similar", "/v1/duplicates", "/v1/products/{pid}/duplicates", "/readyz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert sv.request("GET", "/docs", auth=False).status == 200
    page = sv.request("GET", "/", auth=False)
    assert page.status == 200 and b"/static/app.js" in page.data


# --------------------------------------------------------------------------- bad requests


def test_no_image(sv: Served) -> None:
    expect_error(sv.search({"k": "3"}), 400, "file", "no image")
    expect_error(sv.request("POST", "/v1/search", body=b"", headers={"Content-Type": "application/octet-stream"}), 400, "file", "no image")
    expect_error(sv.search({"file": ("empty.jpg", b"", "image/jpeg")}), 400, "file", "empty")
    expect_error(sv.search({"file": "just text"}), 400, "file", "file upload")


def test_not_an_image(sv: Served) -> None:
    expect_error(sv.search({"file": ("notes.txt", b"hello, this is text" * 10, "text/plain")}), 415, "file", "not an image")
    data, _ = catalog_photo(sv)
    expect_error(sv.search({"file": ("cut.jpg", data[: len(data) // 3], "image/jpeg")}), 400, "file", "truncated")


def test_too_large(sv: Served) -> None:
    big = b"\xff\xd8\xff" + b"\0" * (MAX_BYTES + 10)
    expect_error(sv.search({"file": ("big.jpg", big, "image/jpeg")}), 413, "file", "over the limit")
    huge = b"\xff\xd8\xff" + b"\0" * (MAX_BYTES + 200_000)  # past the body bound: refused from Content-Length
    expect_error(sv.search({"file": ("huge.jpg", huge, "image/jpeg")}), 413, "file", "over the limit")
    expect_error(sv.search({"file": ("wide.png", png(1500, 1000), "image/png")}), 413, "file", "1500x1000", "pixels")


@pytest.mark.parametrize(
    ("bbox", "words"),
    [
        ("1,2,3", ["4 numbers"]),
        ("a,b,c,d", ["4 numbers"]),
        ("50,50,10,10", ["inverted"]),
        ("10,10,10,40", ["zero area"]),
        ("5000,5000,6000,6000", ["outside the image"]),
    ],
)
def test_bad_bbox(sv: Served, bbox: str, words: list[str]) -> None:
    data, _ = catalog_photo(sv)
    r = sv.search({"file": ("q.jpg", data, "image/jpeg"), "bbox": bbox})
    doc = body(r)
    assert r.status == 400, doc
    assert doc["field"] in ("bbox", "file.bbox"), doc
    assert all(w in doc["error"] for w in words), doc


@pytest.mark.parametrize("k", ["0", "-1", "101", "ten", "1.5"])
def test_bad_k(sv: Served, k: str) -> None:
    data, _ = catalog_photo(sv)
    expect_error(sv.search({"file": ("q.jpg", data, "image/jpeg"), "k": k}), 400, "k")
    expect_error(sv.request("GET", f"/v1/products/{sv.catalog[0].product_id}/similar?k={k}"), 400, "k")


@pytest.mark.parametrize(
    "flt",
    [
        "category=dress",  # not JSON
        '["dress"]',  # not an object
        '{"cat egory": "dress"}',  # bad name
        '{"category": "x\\" or product_id != \\"y"}',  # an injection attempt
        '{"category": 3}',
        '{"category": []}',
    ],
)
def test_bad_filter(sv: Served, flt: str) -> None:
    data, _ = catalog_photo(sv)
    expect_error(sv.search({"file": ("q.jpg", data, "image/jpeg"), "filter": flt}), 400, "filter")


def test_unknown_and_invalid_products(sv: Served) -> None:
    for path in ("/v1/products/nope-404/similar", "/v1/products/nope-404/duplicates", "/v1/products/nope-404/images/0"):
        expect_error(sv.request("GET", path), 404, "product_id", "nope-404")
    expect_error(sv.request("GET", '/v1/products/a"b/similar'), 400, "product_id", "not a product id")
    expect_error(sv.request("GET", f"/v1/products/{'x' * 200}/similar"), 400, "product_id")
    expect_error(sv.request("GET", f"/v1/products/{sv.catalog[0].product_id}/images/99"), 400, "image_index")
    expect_error(sv.request("GET", f"/v1/products/{sv.catalog[0].product_id}/images/-1"), 400, "image_index")


def test_token_is_required(sv: Served) -> None:
    data, _ = catalog_photo(sv)
    r = sv.search({"file": ("q.jpg", data, "image/jpeg")}, auth=False)
    expect_error(r, 401, "authorization", "bearer token")
    assert r.headers["www-authenticate"] == "Bearer"
    r = sv.request("GET", "/v1/duplicates", auth=False, headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert sv.request("GET", "/metrics", auth=False).status == 401
    r = sv.request("GET", "/v1/duplicates", auth=False, headers={"Cookie": f"cardigan_token={TOKEN}"})
    assert r.status == 200
    # the page writes the cookie with encodeURIComponent (a base64 token has + / =)
    r = sv.request("GET", "/v1/duplicates", auth=False, headers={"Cookie": f"cardigan_token=%{ord(TOKEN[0]):02X}{TOKEN[1:]}"})
    assert r.status == 200


def in_flight(sv: Served) -> float:
    for line in sv.request("GET", "/metrics").data.decode().splitlines():
        if line.startswith('cardigan_serve_in_flight{kind="query"} '):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


def test_overload_answers_503_with_retry_after(sv: Served) -> None:
    """Hold the in-flight bound (4) with uploads that never finish; the next query is refused."""
    port = int(sv.base.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        for n in range(1, 5):
            s = socket.create_connection(("127.0.0.1", port))
            held.append(s)
            s.sendall(
                b"POST /v1/search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n"
            )
            wait_until(lambda n=n: in_flight(sv) == n, 30, f"{n} uploads in flight (now {in_flight(sv)})")
        data, _ = catalog_photo(sv)
        r = sv.search({"file": ("q.jpg", data, "image/jpeg")})
        expect_error(r, 503, None, "overloaded")
        assert r.headers["retry-after"] == "1"
    finally:
        for s in held:
            s.close()
    wait_until(lambda: sv.search({"file": ("q.jpg", catalog_photo(sv)[0], "image/jpeg")}).status == 200, 30, "service to accept again")
    assert "cardigan_serve_overloaded_total" in sv.request("GET", "/metrics").data.decode()


def test_reads_follow_the_alias_across_a_reindex_switch(sv: Served) -> None:
    """A blue/green switch to a collection without product 5: the running service stops finding it."""
    idx = sv.ns.index()
    old = idx.live_collection()
    assert old is not None
    gone = sv.catalog[5].product_id
    new = f"{sv.ns.settings.collection}_v2"
    idx.create_collection(new)
    rows = [
        r
        for r in idx.iter_rows(
            fields=["pk", "product_id", "image_index", "image_uri", "crop", "version", "model_version", "attributes", "embedding"]
        )
    ]
    idx.upsert(new, [r for r in rows if r["product_id"] != gone])
    idx.switch_alias(new)
    try:
        data, bbox = catalog_photo(sv, 5)
        fields = {"file": ("q.jpg", data, "image/jpeg"), "k": "20"}
        if bbox:
            fields["bbox"] = ",".join(map(str, bbox))

        def switched() -> bool:
            hits = body(sv.search(fields))["results"]
            return len(hits) == len(sv.events) - 1 and gone not in {h["product_id"] for h in hits}

        wait_until(switched, 30, "searches to read the new collection")
        assert body(sv.request("GET", "/readyz", auth=False))["live_collection"] == new
        expect_error(sv.request("GET", f"/v1/products/{gone}/similar"), 404, "product_id")
    finally:
        idx.switch_alias(old)


def test_serve_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "CARDIGAN_SERVE__TOKEN": ""}
    r = subprocess.run(
        [sys.executable, "-m", "cardigan.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr.decode()
    assert "CARDIGAN_SERVE__TOKEN" in r.stderr.decode()


def test_not_ready_while_milvus_is_unreachable(sv: Served, tmp_path: Path) -> None:
    """Up (healthz) but not ready (readyz 503 naming Milvus) when Milvus does not answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # closed again: nothing listens there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **sv.ns.env, "CARDIGAN_MILVUS_URI": f"http://127.0.0.1:{dead_port}", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardigan.cli", "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=30))
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return http.request("GET", base + "/healthz").status == 200
        except urllib3.exceptions.HTTPError:
            return False

    try:
        wait_until(up, 120, "cardigan serve to answer /healthz")
        r = http.request("GET", base + "/readyz")
        assert r.status == 503, r.data
        assert "Milvus" in body(r)["error"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
