"""``cardigan train`` on the user's own catalog: manifest, index and S3-prefix sources, real photos.

The photos are real photographs (scikit-image's ``data`` module, cut into products by
:mod:`devkit.photo_catalog`), fetched the way workers fetch them: from the moto S3 server over
HTTP, from the index a real worker filled from real events, or from a local folder. Training
starts from the ImageNet mobilenet_v2 trunk (the default) at 64 px, runs 40 steps, and held-out
recall must go up.
"""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

# Before torch loads: idle OpenMP threads sleep instead of spinning (see tests/test_train.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from cardigan.event import Event  # noqa: E402
from cardigan.ops.trainset import (  # noqa: E402
    CatalogPhoto,
    CatalogProduct,
    SourceStats,
    index_events,
    latest_states,
    load_catalog,
    prepare_photo,
    split_heldout,
)
from config.settings import EncoderSettings, Settings, patched_env  # noqa: E402
from devkit.photo_catalog import PhotoProduct, events, photo_products, write_catalog  # noqa: E402
from encoder.checkpoint import file_sha256  # noqa: E402
from encoder.train import TrainReport, build_net, hit_rates, make_heldout_set  # noqa: E402
from encoder.train import train_triplets as train_with
from tests.harness import Namespace, wait_until  # noqa: E402

# the workers' decode → crop → resize, as `cardigan train` passes it (encoder/ imports nothing from cardigan)
train_triplets = functools.partial(train_with, prepare=prepare_photo)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
PRETRAINED = EncoderSettings(backbone="mobilenet_v2", weights="IMAGENET1K_V1", image_size=SIZE, device="cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def real() -> list[PhotoProduct]:
    """68 products (17 real photographs × 4 regions), 3 shots each, 96 px."""
    return photo_products(grid=2, views=3, size=96, seed=0)


def _train(products: list[CatalogProduct]) -> tuple[TrainReport, dict[int, float], dict[int, float]]:
    """40 steps from the ImageNet trunk; (report, recall on the training products' own photos
    before, after): leave one out, each photo must find its product through another of its photos."""
    train, held = split_heldout(products, 0.3, seed=1)
    report = train_triplets(PRETRAINED, train, heldout=held, steps=40, batch=16, lr=1e-3, seed=3, log_every=0, console=_quiet())
    seen = make_heldout_set(train, prepare_photo, SIZE, 40_000_000)
    assert report.net is not None
    return report, hit_rates(build_net(PRETRAINED), seen, torch.device("cpu")), hit_rates(report.net, seen, torch.device("cpu"))


def _learned(result: tuple[TrainReport, dict[int, float], dict[int, float]]) -> None:
    report, seen_before, seen_after = result
    assert report.heldout_products >= 15 and report.products >= 40
    assert sum(report.losses[-5:]) < 0.75 * sum(report.losses[:5]), report.losses
    # The catalog's own products: their photos find each other better than the ImageNet trunk did.
    # (Measured: recall@1 74% -> 77%, @5 90% -> 94% on 47 products: a small step, 40 steps is short.)
    assert seen_after[1] > seen_before[1] and seen_after[5] > seen_before[5], (seen_before, seen_after)
    # Held-out products: the trunk already finds 5 in 6 at 64 px, and 40 steps on 47 products do not
    # reliably add to that; they must not cost much. Measured: -3 to +8 points of recall@1 with other
    # seeds and splits on earlier machines; on an AVX2-only one (torch picks other kernels, so the
    # steps land elsewhere) -3.1 to -6.3 with seeds 3-6, always 84 % before. A crop that breaks a
    # category is caught by its own tests (tests/test_crop.py: scattered pieces), not by this margin.
    before, after = report.hit_before, report.hit_after
    assert after[1] >= before[1] - 0.08 and after[5] >= before[5] - 0.05, (before, after)


# --------------------------------------------------------------------------- no servers


def test_latest_state_wins_and_deletes_drop_the_product() -> None:
    def ev(kind: str, pid: str, version: int, n: int = 1) -> Event:
        return Event.model_validate(
            {
                "type": kind,
                "product_id": pid,
                "version": version,
                "images": [{"uri": f"s3://bkt/{pid}/{version}/{i}.jpg"} for i in range(n)],
            }
        )

    stats = SourceStats()
    got = latest_states(
        [ev("add", "a", 2, 2), ev("modify", "a", 1, 3), ev("add", "b", 1), ev("delete", "b", 5, 0), ev("add", "c", 1)], stats
    )
    assert [(e.product_id, e.version, len(e.images)) for e in got] == [("a", 2, 2), ("c", 1, 1)]
    assert stats.events == 5 and stats.deleted == 1


def test_heldout_split_is_stable_and_keeps_single_photo_products_for_training() -> None:
    photo = CatalogPhoto(b"x", None)
    products = [CatalogProduct(f"p{i}", [photo] * (1 + i % 2)) for i in range(200)]
    train, held = split_heldout(products, 0.25, seed=7)
    assert split_heldout(products, 0.25, seed=7) == (train, held)
    assert all(len(p.images) > 1 for p in held) and 30 <= len(held) <= 70
    assert len(train) + len(held) == 200
    with pytest.raises(ValueError, match="--heldout-share"):
        split_heldout(products, 1.0, seed=7)


def test_same_seed_same_checkpoint_and_a_resumed_run_equals_the_straight_one(real: list[PhotoProduct], tmp_path: Path) -> None:
    """Pretrained start (the default path: frozen BatchNorm statistics, a gentler trunk rate)."""
    products = [CatalogProduct(p.product_id, list(p.images), p.category) for p in real[:12]]  # type: ignore[arg-type]
    kw = {"steps": 4, "batch": 4, "seed": 5, "log_every": 0, "console": _quiet(), "save_every": 2}
    a = train_triplets(PRETRAINED, products, out=tmp_path / "a.pt", state=tmp_path / "a.state", **kw)  # type: ignore[arg-type]
    b = train_triplets(PRETRAINED, products, out=tmp_path / "b.pt", state=tmp_path / "b.state", **kw)  # type: ignore[arg-type]
    assert a.checkpoint_sha256 == b.checkpoint_sha256 == file_sha256(tmp_path / "a.pt")
    paused = train_triplets(PRETRAINED, products, out=tmp_path / "c.pt", state=tmp_path / "c.state", stop_after=2, **kw)  # type: ignore[arg-type]
    assert paused.stopped_by == "paused" and paused.steps == 2 and paused.checkpoint is None and not (tmp_path / "c.pt").exists()
    resumed = train_triplets(PRETRAINED, products, out=tmp_path / "c.pt", state=tmp_path / "c.state", resume=True, **kw)  # type: ignore[arg-type]
    assert resumed.resumed_from == 2 and resumed.steps == 4 and resumed.losses == a.losses
    assert resumed.checkpoint_sha256 == a.checkpoint_sha256
    other = train_triplets(PRETRAINED, products, steps=4, batch=4, seed=6, log_every=0, console=_quiet())
    assert other.losses != a.losses
    # a state of other data or options is refused, not silently continued
    with pytest.raises(ValueError, match="other data, settings or options"):
        train_triplets(PRETRAINED, products[:-1], state=tmp_path / "c.state", resume=True, **{**kw, "save_every": 0})  # type: ignore[arg-type]


def test_cli_trains_from_a_manifest_of_local_files_pauses_and_resumes(real: list[PhotoProduct], tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "photos", real[:16])
    with manifest.open("a") as f:
        f.write('{"type": "add", "product_id": "bad id", "version": 1}\n')
    env = {
        **os.environ,
        "CARDIGAN_LOCAL_ROOT": str(tmp_path / "photos"),
        "CARDIGAN_ENCODER__DEVICE": "cpu",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "enc.pt"
    args = [sys.executable, "-m", "cardigan.cli", "train", "--manifest", str(manifest), "--out", str(out)]
    args += ["--steps", "4", "--batch", "4", "--image-size", str(SIZE), "--heldout-share", "0.3"]

    def run(*extra: str) -> str:
        proc = subprocess.run([*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    first = run("--stop-after", "2")
    assert "paused after step 2 of 4" in first and not out.exists()
    assert "line 17" in first and "product_id" in first  # the bad line, named, not fatal
    second = run("--resume")
    assert "resumed from" in second and "4 steps of 4 products" in second and "recall@1" in second
    assert out.is_file() and f"ckpt{file_sha256(out)[:12]}" in second
    assert "CARDIGAN_ENCODER__BACKBONE=mobilenet_v2" in second and "cardigan reindex" in second  # the pretrained default


def test_manifest_of_local_files(real: list[PhotoProduct], tmp_path: Path) -> None:
    manifest = write_catalog(tmp_path / "photos", real)
    settings = Settings(local_root=tmp_path / "photos")
    products, stats = load_catalog(settings, manifest=manifest, console=_quiet())
    assert stats.products == len(real) and stats.photos == 3 * len(real) and not stats.failed
    assert {p.category for p in products} == {p.category for p in real}
    assert [p.product_id for p in products] == sorted(p.product_id for p in real)


# --------------------------------------------------------------------------- real servers


@pytest.mark.e2e
def test_manifest_from_s3_with_the_workers_limits(real: list[PhotoProduct], ns: Namespace, tmp_path: Path) -> None:
    prefix = f"train-{uuid.uuid4().hex[:8]}/"  # the stack's bucket is shared with other tests: a prefix of our own
    uris = {(p.product_id, n): ns.put_image(f"{prefix}{p.product_id}/{n}.jpg", img.data) for p in real for n, img in enumerate(p.images)}
    evs = events(real, uris)
    evs[0]["images"].append({"uri": f"s3://{ns.settings.bucket}/{prefix}nope.jpg"})  # type: ignore[union-attr]
    evs[1]["images"].append({"uri": "s3://someone-elses-bucket/x.jpg"})  # type: ignore[union-attr]
    gone = {"type": "add", "product_id": "photo-gone", "version": 1, "images": [{"uri": uris[(real[2].product_id, 0)]}]}
    evs += [gone, {"type": "delete", "product_id": "photo-gone", "version": 2}]
    manifest = tmp_path / "events.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in evs))
    with patched_env(ns.env):  # S3 credentials, as the CLI gets them
        products, stats = load_catalog(ns.settings, manifest=manifest, console=_quiet())
    assert stats.failed == {"missing_image": 1, "forbidden_uri": 1}, stats.failed_examples
    assert stats.deleted == 1 and stats.products == len(real)
    assert "photo-gone" not in {p.product_id for p in products}
    assert all(len(p.images) == 3 for p in products)
    _learned(_train(products))

    # the S3-prefix layout: <prefix><product_id>/<name>.jpg, same products
    with patched_env(ns.env):
        by_prefix, s3_stats = load_catalog(ns.settings, s3_prefix=f"s3://{ns.settings.bucket}/{prefix}", console=_quiet())
    assert s3_stats.products == len(real) and all(len(p.images) == 3 for p in by_prefix)
    assert sorted(p.product_id for p in by_prefix) == sorted(p.product_id for p in real)


@pytest.mark.e2e
def test_from_the_index_a_worker_filled_from_real_events(real: list[PhotoProduct], ns: Namespace) -> None:
    uris = {(p.product_id, n): ns.put_image(f"idx/{p.product_id}/{n}.jpg", img.data) for p in real for n, img in enumerate(p.images)}
    evs = events(real, uris)
    bboxed = evs[0]["images"][0]  # type: ignore[index]
    bboxed["bbox"] = [0, 0, 80, 80]
    ns.start_worker()
    ns.publish(evs)
    index = ns.index()
    wait_until(lambda: ns.drained() and index.count() == 3 * len(real), 180, "the worker to index every photo")

    # paged: a query iterator with pages smaller than the catalog
    stats = SourceStats()
    rows = list(index_events(index, stats, index.live_collection(), page=50))
    assert len(rows) == len(real) and all(len(e.images) == 3 for e in rows)
    first = next(e for e in rows if e.product_id == real[0].product_id)
    assert first.images[0].bbox == (0, 0, 80, 80) and first.attributes == {"category": real[0].category}

    with patched_env(ns.env):
        products, stats = load_catalog(ns.settings, from_index=True, console=_quiet())
    assert stats.products == len(real) and not stats.failed
    assert {p.product_id: p.category for p in products} == {p.product_id: p.category for p in real}
    assert products[[p.product_id for p in products].index(real[0].product_id)].images[0].bbox == (0, 0, 80, 80)
    _learned(_train(products))
