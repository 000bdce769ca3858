"""Reindex end to end: real servers, real workers, a new model, live traffic, an interruption."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from cardigan.cli import app as cli_app
from cardigan.ops.publish import Publisher
from cardigan.ops.reindex import ReindexState
from cardigan.ops.snapshot import SourceError, count_manifest, count_s3, manifest_items, s3_items
from cardigan.ops.status import collect_status
from cardigan.ops.verify import Expected
from cardigan.store.guard import VersionGuard
from cardigan.store.index import collection_name
from devkit.stack import free_port
from encoder import model_version_for
from tests.harness import ROOT, Namespace, WorkerProc, wait_until
from tests.test_index_e2e import converge, photo

pytestmark = pytest.mark.e2e


def model(ns: Namespace, seed: int) -> str:
    return model_version_for(ns.settings.encoder.model_copy(update={"seed": seed}))


def seed_env(seed: int) -> dict[str, str]:
    return {"CARDIGAN_ENCODER__SEED": str(seed)}


class Catalog:
    """Events and the final state they imply; images go straight to S3 (thread-safe client)."""

    def __init__(self, ns: Namespace) -> None:
        self.s3 = ns.s3()
        self.bucket = ns.settings.bucket
        self.versions: dict[str, int] = {}
        self.expected: dict[str, Expected | None] = {}
        self.latest: dict[str, dict[str, Any]] = {}  # the newest event of each product

    def add(self, pid: str, n: int, kind: str = "add") -> dict[str, Any]:
        v = self.versions.get(pid, 0) + 1
        self.versions[pid] = v
        base = zlib.crc32(pid.encode()) % 100_000 * 100
        uris = []
        for i in range(n):
            key = f"{pid}/v{v}/{i}.jpg"
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=photo(base + v * 10 + i))
            uris.append(f"s3://{self.bucket}/{key}")
        self.expected[pid] = Expected(v, n)
        images: list[dict[str, Any]] = [{"uri": u} for u in uris]
        if zlib.crc32(pid.encode()) % 2:  # half the products say where the item is
            images[0]["bbox"] = [4, 6, 90, 88]
        ev = {"type": kind, "product_id": pid, "version": v, "images": images, "attributes": {"category": "test"}}
        self.latest[pid] = ev
        return ev

    def delete(self, pid: str) -> dict[str, Any]:
        v = self.versions.get(pid, 0) + 1
        self.versions[pid] = v
        self.expected[pid] = None
        self.latest[pid] = {"type": "delete", "product_id": pid, "version": v}
        return self.latest[pid]

    def live(self) -> list[str]:
        return sorted(p for p, e in self.expected.items() if e is not None)

    def with_model(self, model_version: str) -> dict[str, Expected | None]:
        return {p: None if e is None else Expected(e.version, e.n_images, model_version) for p, e in self.expected.items()}


def initial_catalog(ns: Namespace, n: int = 30) -> Catalog:
    """``n`` products (1-3 images), a few modified, three deleted: tombstones to carry over."""
    cat = Catalog(ns)
    events = [cat.add(f"p-{i:02d}", 1 + i % 3) for i in range(n)]
    events += [cat.add(f"p-{i:02d}", 2, kind="modify") for i in range(0, n, 7)]
    events += [cat.delete(f"p-{i:02d}") for i in (3, 11, 19)]
    ns.publish(events)
    converge(ns, cat.expected)
    return cat


def reindex(ns: Namespace, *args: str, seed: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **ns.env, **seed_env(seed), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with log.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "cardigan.cli", "reindex", "--yes", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def reindex_here(ns: Namespace, *args: str, seed: int) -> Result:
    """The same command in this process (no interpreter start): for the runs not interrupted."""
    return CliRunner().invoke(cli_app, ["reindex", "--yes", *args], env={**ns.env, **seed_env(seed)})


def consume(ns: Namespace, worker: WorkerProc, queues: list[str], *, on: bool) -> None:
    """Start or stop a worker's consumers (remote control): a paused fleet without a restart."""
    control = ns.publisher().app.control
    for q in queues:
        dest = [f"{worker.name}@test"]
        if on:
            replies = control.add_consumer(q, exchange="cardigan", routing_key=q, destination=dest, reply=True, timeout=10)
        else:
            replies = control.cancel_consumer(q, destination=dest, reply=True, timeout=10)
        assert replies, f"{worker.name} did not answer the {'add' if on else 'cancel'}_consumer({q}) command"


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"reindex still running after {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def test_reindex_interrupted_resumes_without_duplicates(ns: Namespace) -> None:
    worker = ns.start_worker()
    cat = initial_catalog(ns)
    live_products = cat.live()
    assert len(live_products) == 27
    s = ns.settings
    alias = s.collection
    v1, v2, v3 = (collection_name(alias, n) for n in (1, 2, 3))
    consume(ns, worker, [s.bulk_queue], on=False)  # nobody on the bulk queue: the reindex fills its window (2 chunks) and waits

    r = ns.state()
    state = ReindexState(r, alias)
    log = ns.tmp / "reindex.log"
    proc = reindex(ns, "--chunk", "3", "--max-in-flight", "2", seed=0, log=log)
    wait_until(lambda: state.get().get("published") == "6" or proc.poll() is not None, 60, "two chunks published")
    assert proc.poll() is None, log.read_text()
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log) == 130, log.read_text()
    st = state.get()
    assert (st["phase"], st["published"], st["chunks"], st["cursor"]) == ("filling", "6", "2", live_products[5]), st
    assert "--resume" in log.read_text()
    assert sorted(r.smembers(f"cardigan:write_targets:{alias}")) == [v1, v2]

    # a live write that reached only the old collection (a worker that read the write targets
    # just before the reindex added the new one): the catch-up pass must carry it over
    index = ns.index()
    rows = index.get_product("p-00", 8, collection=v1)
    assert [int(row["version"]) for row in rows] == [2, 2]
    index.upsert(v1, [{**row, "version": 3} for row in rows])
    VersionGuard(r).record(v1, {"p-00": (3, "upsert")})
    cat.versions["p-00"], cat.expected["p-00"] = 3, Expected(3, 2)

    # resuming with another model is refused: the collection would mix two models
    res = reindex_here(ns, "--resume", seed=5)
    assert res.exit_code == 1 and "CARDIGAN_ENCODER" in res.output, res.output

    consume(ns, worker, [s.bulk_queue], on=True)
    res = reindex_here(ns, "--resume", "--chunk", "3", "--max-in-flight", "2", seed=0)
    assert res.exit_code == 0, res.output[-3000:]
    assert "verified: 27 products" in res.output and "caught up 1 products" in res.output, res.output

    st = state.get()
    # every product published exactly once, every chunk counted once, one product caught up
    assert st["phase"] == "done", st
    assert (int(st["published"]), int(st["repaired"]), int(st["done"])) == (27, 1, 28), st
    assert int(st["chunks"]) == math.ceil(27 / 3) + 1, st
    assert int(st["tombstones"]) == 3, st
    assert index.live_collection() == v2
    assert index.collections() == [v2]  # the old one was dropped
    assert sorted(r.smembers(f"cardigan:write_targets:{alias}")) == [v2]
    converge(ns, cat.with_model(model(ns, 0)))
    assert index.count() == sum(e.n_images for e in cat.expected.values() if e)
    # rebuilt from the index, every image is cropped as its event said (the bbox travels along)
    for pid in cat.live():
        want = [img.get("bbox") for img in cat.latest[pid]["images"]]
        assert [row["crop"]["bbox"] for row in index.get_product(pid, 8)] == want, pid

    # an aborted reindex leaves the live collection alone; its late chunks are skipped
    consume(ns, worker, [s.bulk_queue], on=False)
    proc = reindex(ns, "--chunk", "3", "--max-in-flight", "1", seed=0, log=log)
    wait_until(lambda: state.get().get("published") == "3" or proc.poll() is not None, 60, "a chunk published")
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log) == 130, log.read_text()[-3000:]
    res = reindex_here(ns, "--abort", seed=0)
    assert res.exit_code == 0 and f"dropped {v3}" in res.output, res.output
    assert state.get()["phase"] == "aborted"
    assert sorted(r.smembers(f"cardigan:write_targets:{alias}")) == [v2]
    consume(ns, worker, [s.bulk_queue], on=True)
    wait_until(ns.drained, 60, "the aborted run's chunk to be consumed")
    assert index.collections() == [v2] and index.live_collection() == v2
    assert "not a write target any more" in worker.log_text()
    assert v3 not in index.client.list_collections()

    # from a manifest (the catalog's own export): a bad line is reported, the rest rebuilt;
    # the aborted run's name is not reused
    manifest = ns.tmp / "catalog.jsonl"
    lines = [json.dumps(cat.latest[p]) for p in sorted(cat.latest)]
    lines.insert(4, '{"type": "modify", "product_id": "bad id", "version": 1}')
    manifest.write_text("\n".join(lines) + "\n")
    res = reindex_here(ns, "--manifest", str(manifest), "--chunk", "8", seed=0)
    assert res.exit_code == 0, res.output[-3000:]
    assert "line 5: product_id" in res.output, res.output
    st = state.get()
    assert (st["phase"], st["source"], st["published"], st["rejected"], st["total"]) == ("done", "manifest", "30", "1", "31"), st
    v4 = collection_name(alias, 4)
    assert index.live_collection() == v4 and index.collections() == [v4]
    converge(ns, cat.with_model(model(ns, 0)))


@pytest.mark.real_milvus
def test_reindex_under_live_traffic_new_model_switches_once(ns: Namespace) -> None:
    s = ns.settings
    port = free_port()
    # the old fleet (model seed 0) and, started beside it but idle, the new one (seed 1)
    old_fleet = ns.start_worker(extra_env=seed_env(0), wait=False)
    new_fleet = ns.start_worker(extra_env={**seed_env(1), "CARDIGAN_METRICS_PORT": str(port)}, wait=False)
    for w in (old_fleet, new_fleet):
        wait_until(lambda w=w: f"{w.name}@test ready." in w.log_text() or not w.alive(), 180, f"worker {w.name} ready")
        assert w.alive(), w.log_text()[-3000:]
    consume(ns, new_fleet, [s.queue, s.bulk_queue], on=False)
    cat = initial_catalog(ns)
    alias = s.collection
    old, new = collection_name(alias, 1), collection_name(alias, 2)
    new_model = model(ns, 1)
    # roll the fleet to the new model first (docs/operations.md): live writes then carry it too
    consume(ns, new_fleet, [s.queue, s.bulk_queue], on=True)
    old_fleet.stop()

    index = ns.index()
    query = index.get_product("p-00", 8)[0]["embedding"]
    pub = Publisher(ns.settings)
    r = ns.state()
    stop = threading.Event()
    seen: list[str] = []
    errors: list[str] = []
    searches = [0, 0]  # total, empty
    published = [0]

    def search_loop() -> None:
        ix = ns_index
        while not stop.is_set():
            try:
                hits = ix.search([query], 5)[0]
                live = ix.live_collection()
            except Exception as e:  # noqa: BLE001 - any error is what this test looks for
                errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.05)
                continue
            searches[0] += 1
            searches[1] += not hits
            if not seen or seen[-1] != live:
                seen.append(str(live))
            time.sleep(0.02)

    def publish_loop() -> None:
        rng = random.Random(7)
        n_new = 0
        while not stop.is_set():
            live = cat.live()
            roll = rng.random()
            if roll < 0.45:
                ev = cat.add(rng.choice(live), rng.randint(1, 3), kind="modify")
            elif roll < 0.75:
                ev = cat.add(f"n-{n_new:03d}", rng.randint(1, 2))
                n_new += 1
            else:
                ev = cat.delete(rng.choice(live))
            pub.publish(ev)
            published[0] += 1
            time.sleep(0.1)

    ns_index = ns.index()
    threads = [threading.Thread(target=search_loop, daemon=True), threading.Thread(target=publish_loop, daemon=True)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        res = reindex_here(ns, "--chunk", "3", "--max-in-flight", "2", seed=1)
        assert res.exit_code == 0, res.output[-3000:]
        time.sleep(1.0)  # a little traffic after the switch too
    finally:
        stop.set()
        for t in threads:
            t.join(10)

    assert not errors, errors[:5]
    assert searches[0] > 20 and searches[1] == 0, searches
    assert seen == [old, new], seen  # the alias switched once, searches never saw a half-built index
    assert published[0] > 20
    converge(ns, cat.with_model(new_model))  # the alias (the new collection) holds the final state
    assert index.collections() == [new]
    st = collect_status(ns.settings, pub.app, inspect=False)
    assert st["write_targets"] == [new] and st["live_collection"] == new
    assert st["reindex"]["phase"] == "done" and st["reindex"]["model_version"] == new_model, st["reindex"]
    assert st["reindex"]["done"] == st["reindex"]["published"] + st["reindex"]["repaired"]
    assert int(r.hlen(f"cardigan:ver:{new}")) == len(cat.expected)

    # the worker's Prometheus endpoint counted both queues' work
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("cardigan_")}
    bulk = sum(v for k, v in metrics.items() if k.startswith("cardigan_events_total{") and f'queue="{s.bulk_queue}"' in k)
    live_applied = sum(
        v for k, v in metrics.items() if k.startswith("cardigan_events_total{") and f'queue="{s.queue}"' in k and 'outcome="applied"' in k
    )
    assert bulk == st["reindex"]["done"], (bulk, st["reindex"])
    assert live_applied > 0
    assert metrics["cardigan_publish_to_searchable_seconds_count"] > 0
    assert metrics["cardigan_embed_batch_size_count"] > 0 and metrics["cardigan_write_batch_seconds_count"] > 0
    assert any(k.startswith("cardigan_worker_info{") and new_model in k for k in metrics)


# -- snapshot sources --------------------------------------------------------------------------


def test_s3_prefix_snapshot_groups_products_in_key_order_and_resumes(ns: Namespace) -> None:
    s3, bucket = ns.s3(), ns.settings.bucket
    keys = ["snap/a/1.jpg", "snap/a/0.JPG", "snap/a/2.jpg", "snap/a-b/0.jpg", "snap/a./x.jpeg", "snap/a0/0.jpg"]
    keys += ["snap/bad id/0.jpg", "snap/readme.txt", "snap/c/notes.txt", "other/z/0.jpg"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"jpeg")
    uri = f"s3://{bucket}/snap"  # the trailing slash is optional
    items = list(s3_items(s3, uri, after=None, max_images=2, max_id_len=128))
    # key order ('-' < '.' < '/' < '0'); readme.txt and a folder without images are no products
    assert [it.event.product_id if it.event else None for it in items] == ["a-b", "a.", "a", "a0", None]
    assert items[-1].rejected and "not a valid product id" in items[-1].rejected
    a = items[2].event
    assert a is not None and a.type == "modify"
    assert [img.uri for img in a.images] == [f"s3://{bucket}/snap/a/0.JPG", f"s3://{bucket}/snap/a/1.jpg"]  # at most max_images
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="snap/a/")["Contents"]
    assert a.version == max(int(o["LastModified"].timestamp() * 1000) for o in listed[:2])
    # resuming after a product yields exactly the ones after it
    rest = list(s3_items(s3, uri, after=items[2].cursor, max_images=2, max_id_len=128))
    assert [it.cursor for it in rest] == [it.cursor for it in items[3:]]
    assert count_s3(s3, uri + "/") == 5
    with pytest.raises(SourceError, match="s3://bucket/prefix/"):
        list(s3_items(s3, f"{bucket}/snap", after=None, max_images=2, max_id_len=128))


def test_manifest_snapshot_reports_bad_lines_and_resumes(tmp_path: Path) -> None:
    good = {"type": "add", "product_id": "m-1", "version": 3, "images": [{"uri": "s3://bkt/m-1/0.jpg", "bbox": [1, 2, 30, 40]}]}
    path = tmp_path / "m.jsonl"
    lines = [
        json.dumps(good),
        "",
        "{not json",
        json.dumps({**good, "images": []}),
        json.dumps({"type": "delete", "product_id": "m-2", "version": 9}),
    ]
    path.write_text("\n".join(lines) + "\n")
    items = list(manifest_items(path, after=None, max_images=8, max_id_len=128))
    assert [it.cursor for it in items] == ["1", "3", "4", "5"]
    assert items[1].rejected and items[1].rejected.startswith("line 3: ") and "malformed JSON" in items[1].rejected
    assert items[2].rejected and items[2].rejected.startswith("line 4: images")
    assert items[0].event is not None and items[0].event.images[0].bbox == (1, 2, 30, 40)  # a manifest keeps the boxes
    assert items[3].event is not None and items[3].event.type == "delete"
    assert [it.cursor for it in manifest_items(path, after="3", max_images=8, max_id_len=128)] == ["4", "5"]
    assert count_manifest(path) == 4
