"""Batching is correct: a batch embeds like one by one, lands on the right keys, fails per item.

Correctness only; speed is `cardigan bench`'s job (docs/performance.md), never a test's.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from cardigan.event import primary_key
from cardigan.imaging.crop import preprocess
from cardigan.ops.verify import Expected
from cardigan.procstat import rss_mb
from config.settings import EncoderSettings
from devkit.bench import ceiling
from devkit.catalog import render_product
from encoder import Encoder, build_encoder
from tests.harness import Namespace, wait_until
from tests.test_index_e2e import converge
from workers.batcher import MicroBatcher
from workers.pipeline import STATS_KEY

SIZE = 64
ATOL = 1e-4  # a forward pass of 1 and of 16 images may pick different kernels: not bit-equal
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return build_encoder(EncoderSettings(backbone="mobilenet_v3_small", weights="random", image_size=SIZE, device="cpu")).load()


def crops(n: int, seed: int = 7) -> list[torch.Tensor]:
    """Distinct normalised model inputs, from real synthetic product photos."""
    out = []
    for i in range(n):
        img = render_product(f"crop-{seed}-{i}", 0, 1, seed).images[0]
        out.append(preprocess(img.data, img.bbox, size=SIZE, max_pixels=10_000_000)[0])
    return out


def embedder(encoder: Encoder, *, isolate: bool = True, max_items: int = 64) -> MicroBatcher[torch.Tensor, np.ndarray]:
    """The worker's embed stage (Pipeline._embed): stack what was gathered, one forward pass."""
    return MicroBatcher(
        lambda ts: list(encoder.embed(torch.stack(ts))), max_items=max_items, max_wait_s=0.05, name="embed-test", isolate_failures=isolate
    )


def submit_first(batcher: MicroBatcher[torch.Tensor, np.ndarray], items: list[torch.Tensor]) -> list[Future[np.ndarray]]:
    """Queue every item, then start the batcher: the batches it gathers are deterministic."""
    futures = [batcher.submit(t) for t in items]
    batcher.start()
    return futures


# --------------------------------------------------------------------------- unit: MicroBatcher + Encoder


def test_a_batch_embeds_like_one_by_one(encoder: Encoder) -> None:
    items = crops(12)
    alone = [encoder.embed(t[None])[0] for t in items]
    b = embedder(encoder, max_items=5)
    try:
        got = [f.result(60) for f in submit_first(b, items)]
    finally:
        b.stop()
    # batches of 5, 5 and 2: every position in a batch, and a short last batch
    assert (b.stats.items, b.stats.batches) == (12, 3), b.stats
    for i, (g, a) in enumerate(zip(got, alone)):
        np.testing.assert_allclose(g, a, atol=ATOL, err_msg=f"item {i}")
    # and each future got its own item's vector, not a neighbour's
    sims = np.stack(got) @ np.stack(alone).T
    assert (sims.argmax(axis=1) == np.arange(12)).all()
    assert sims[~np.eye(12, dtype=bool)].max() < 0.999


def test_one_bad_item_fails_only_its_own_future(encoder: Encoder) -> None:
    items = crops(6)
    bad = torch.zeros(3, SIZE // 2, SIZE // 2)  # wrong size: torch.stack of the batch fails
    mixed = items[:3] + [bad] + items[3:]
    b = embedder(encoder)
    try:
        futures = submit_first(b, mixed)
        results = [(f.exception(60), None if f.exception(60) else f.result()) for f in futures]
    finally:
        b.stop()
    errors = [e for e, _ in results if e is not None]
    assert len(errors) == 1 and isinstance(errors[0], ValueError) and "embed() takes" in str(errors[0]), errors
    assert results[3][0] is errors[0], "the failure belongs to the bad item's future"
    good = [r for e, r in results if e is None]
    for got, t in zip(good, items):
        np.testing.assert_allclose(got, encoder.embed(t[None])[0], atol=ATOL)


def test_without_isolation_the_whole_batch_fails(encoder: Encoder) -> None:
    # The write stage runs this way on purpose (a Milvus failure is not one event's fault);
    # this shows isolation is what protects the neighbours in the embed stage.
    items = crops(3) + [torch.zeros(3, SIZE // 2, SIZE // 2)]
    b = embedder(encoder, isolate=False)
    try:
        errors = [f.exception(60) for f in submit_first(b, items)]
    finally:
        b.stop()
    assert all(isinstance(e, RuntimeError) and "stack expects each tensor to be equal size" in str(e) for e in errors), errors


def test_batcher_keeps_order_and_never_exceeds_max_items() -> None:
    seen: list[int] = []

    def fn(xs: list[int]) -> list[int]:
        seen.append(len(xs))
        time.sleep(0.01)
        return [x * 10 for x in xs]

    b: MicroBatcher[int, int] = MicroBatcher(fn, max_items=4, max_wait_s=0.05, name="t").start()
    try:
        futures = [b.submit(i) for i in range(15)]
        assert [f.result(10) for f in futures] == [i * 10 for i in range(15)]
    finally:
        b.stop()
    assert max(seen) <= 4 and sum(seen) == 15 and len(seen) < 15


def test_bench_helpers() -> None:
    from devkit import bench
    from workers import writer

    # the bench reads what the workers write, under the same keys (cardigan.keys)
    assert bench.STATS_KEY is STATS_KEY and bench.FRESHNESS_KEY is writer.FRESHNESS_KEY
    # each pipeline stage's threads map to their stage (Pipeline names them; Celery's pool too)
    assert [bench._thread_group(n) for n in ("fetch_3", "embed", "write", "ThreadPoolExecutor-0_7", "MainThread", None)] == [
        "fetch+decode",
        "embed",
        "write",
        "tasks",
        "consumer",
        "intra-op",
    ]
    assert ceiling(100, 100, "cpu") == pytest.approx(50)  # shared cores: times add
    assert ceiling(100, 300, "cuda") == 100  # overlapped: the slower stage sets the pace
    me = rss_mb(__import__("os").getpid())
    assert me is not None and me > 10
    assert rss_mb(2**22 + 12345) is None


# --------------------------------------------------------------------------- e2e: the real worker


def _product_event(ns: Namespace, pid: str, n_images: int, seed: int) -> tuple[dict, list[tuple[bytes, list[int] | None]]]:
    prod = render_product(pid, 0, n_images, seed)
    refs, raw = [], []
    for img in prod.images:
        ref = {"uri": ns.put_image(f"batching/{pid}/{img.key}", img.data)}
        bbox = list(img.bbox) if img.bbox else None
        if bbox:
            ref["bbox"] = bbox
        refs.append(ref)
        raw.append((img.data, bbox))
    ev = {"type": "add", "product_id": pid, "version": 1, "images": refs, "attributes": {"category": prod.category}}
    return ev, raw


def _batch_stats(ns: Namespace) -> dict:
    docs = [json.loads(v) for v in ns.state().hgetall(STATS_KEY.format(alias=ns.settings.collection)).values()]
    return {k: sum(d["embed"][k] for d in docs) for k in ("batches", "items")}


# a long batch wait: products published together meet in the same forward passes
MIXING_ENV = {"CARDIGAN_ENCODER__BATCH_WAIT_MS": "300", "CARDIGAN_WORKER__CONCURRENCY": "16"}


@pytest.mark.e2e
def test_e2e_mixed_batch_writes_each_product_to_its_own_keys(ns: Namespace) -> None:
    s = ns.settings
    products = {f"mix-{p}": _product_event(ns, f"mix-{p}", 1 + p % 3, seed=p) for p in range(8)}
    n_images = sum(len(raw) for _, raw in products.values())
    ns.start_worker(extra_env=MIXING_ENV)
    ns.publish([ev for ev, _ in products.values()])
    converge(ns, {pid: Expected(1, len(raw)) for pid, (_, raw) in products.items()})

    # the worker really mixed tasks: fewer forward passes than images
    wait_until(lambda: _batch_stats(ns)["items"] >= n_images, 10, "the worker's batch statistics")
    stats = _batch_stats(ns)
    assert stats["items"] == n_images and stats["batches"] < n_images, stats

    # every stored vector is the embedding of that product's own image i, computed here alone
    enc = build_encoder(s.encoder).load()
    expected = {
        primary_key(pid, i): enc.embed(preprocess(data, bbox, size=s.encoder.image_size, max_pixels=s.limits.max_image_pixels)[0][None])[0]
        for pid, (_, raw) in products.items()
        for i, (data, bbox) in enumerate(raw)
    }
    stored = {r["pk"]: np.asarray(r["embedding"], np.float32) for pid in products for r in ns.index().get_product(pid, s.limits.max_images)}
    assert set(stored) == set(expected)
    keys = sorted(expected)
    sims = np.stack([stored[k] for k in keys]) @ np.stack([expected[k] for k in keys]).T
    for k in keys:
        np.testing.assert_allclose(stored[k], expected[k], atol=ATOL, err_msg=k)
    # and no vector sits on a neighbour's key: each matches its own image best
    assert (sims.argmax(axis=1) == np.arange(len(keys))).all()


@pytest.mark.e2e
def test_e2e_corrupt_image_fails_only_its_own_event(ns: Namespace) -> None:
    s = ns.settings
    good = {f"ok-{p}": _product_event(ns, f"ok-{p}", 2, seed=100 + p) for p in range(6)}
    bad_ev, _ = _product_event(ns, "broken-1", 2, seed=200)
    # image 1 of this event is a JPEG cut short: its header parses, its pixels do not exist
    whole = render_product("broken-1", 0, 2, 200).images[1].data
    bad_ev["images"][1]["uri"] = ns.put_image("batching/broken-1/cut.jpg", whole[: len(whole) // 3])
    bad_ev["images"][1].pop("bbox", None)
    events = [ev for ev, _ in good.values()]
    events.insert(3, bad_ev)
    w = ns.start_worker(extra_env=MIXING_ENV)
    ns.publish(events)
    converge(ns, {**{pid: Expected(1, 2) for pid in good}, "broken-1": None})

    dead = ns.dead().list()
    assert [(d.product_id, d.kind) for d in dead] == [("broken-1", "corrupt_image")], [(d.product_id, d.reason) for d in dead]
    assert "images[1]" in dead[0].reason
    # its good image 0 was not written either: an event is all or nothing
    assert ns.index().get_product("broken-1", s.limits.max_images) == []
    wait_until(lambda: _batch_stats(ns)["items"] >= 12, 10, "the worker's batch statistics")
    stats = _batch_stats(ns)
    assert stats["batches"] < stats["items"], f"the good events should have shared batches: {stats}"
    assert w.alive()


# The keys `cardigan bench --json` printed before the result became a typed object (captured
# from the dict literal it replaced): cardigan/cli/bench.py, devkit/gpu_check.py and people's
# scripts read them.
BENCH_KEYS = (
    "images_per_s events_per_s runtime images_per_s_torch speedup_vs_torch naive_images_per_s speedup_vs_naive "
    "forward_only_images_per_s forward_only_images_per_s_torch decode_only_images_per_s forward_only_torch_threads "
    "ceiling_images_per_s_before ceiling_images_per_s_after ceiling_images_per_s ratio_to_ceiling freshness_p50_ms "
    "freshness_p99_ms batch_size_mean rss_mb_start rss_mb_end device model image_size events images seconds "
    "naive_events_per_s naive_batch_size_mean write_batch_mean model_busy_pct cpu_ms_per_image "
    "cpu_ms_per_image_milvus cpu_ms_per_image_publisher cpu_ms_per_image_worker "
    "worker_cpu_ms_per_image_by_stage naive_cpu_ms_per_image naive_worker_cpu_ms_per_image_by_stage "
    "forward_only_cpu_ms_per_image decode_only_cpu_ms_per_image cpu_ratio_to_ceiling freshness_rate_events_per_s "
    "freshness_samples workers concurrency batch_size batch_wait_ms fetch_threads prefetch_multiplier torch_threads s3 milvus "
    "cpu_count load_avg_start load_avg_end duplicates_lag_p50_ms duplicates_lag_p99_ms"
).split()


def test_bench_result_prints_the_same_keys() -> None:
    """The typed bench result flattens to the keys (and order) of the dict it replaced."""
    import json
    from dataclasses import fields

    from devkit.bench import BenchResult

    values: dict[str, object] = {f.name: 1.0 for f in fields(BenchResult)}
    values["cpu_ms_per_image_by_group"] = {"worker": 2.0, "publisher": 3.0, "milvus": 4.0}
    values["sections"] = {"duplicates_lag_p50_ms": 5.0, "duplicates_lag_p99_ms": 6.0}
    res = BenchResult(**values)  # type: ignore[arg-type]
    d = res.as_dict()
    assert list(d) == BENCH_KEYS
    assert d["cpu_ms_per_image_worker"] == 2.0 and d["duplicates_lag_p99_ms"] == 6.0
    assert json.loads(res.to_json()) == d
