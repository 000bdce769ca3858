"""Encoder training: the triplet loss, learning, the checkpoint workers load, determinism, the CLI.

A tiny synthetic catalog at 64 px on the CPU: seconds, not minutes.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

# Before torch loads (when this module is the first to load it): idle OpenMP threads sleep
# instead of spinning, which on a busy 2-core machine made training steps several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from cardigan.ops.trainset import prepare_photo  # noqa: E402
from config.settings import EncoderSettings  # noqa: E402
from devkit.catalog import SyntheticProduct, generate_catalog  # noqa: E402
from encoder import build_encoder  # noqa: E402
from encoder.checkpoint import file_sha256, read_checkpoint  # noqa: E402
from encoder.train import TrainReport, build_net, make_eval_set, synthetic_training_set, triplet_loss  # noqa: E402
from encoder.train import train_triplets as train_with

# the workers' decode → crop → resize, as `cardigan train` passes it (encoder/ imports nothing from cardigan)
train_triplets = functools.partial(train_with, prepare=prepare_photo)

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
SETTINGS = EncoderSettings(backbone="mobilenet_v3_small", weights="random", image_size=SIZE, device="cpu", seed=0)
pytestmark = pytest.mark.usefixtures("torch_rng_isolated", "one_torch_thread")  # tests/conftest.py


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


@pytest.fixture(scope="module")
def catalog() -> list[SyntheticProduct]:
    return generate_catalog(10, seed=5, prefix="t")


@pytest.fixture(scope="module")
def trained(catalog: list[SyntheticProduct], tmp_path_factory: pytest.TempPathFactory) -> TrainReport:
    out = tmp_path_factory.mktemp("ckpt") / "enc.pt"
    return train_triplets(
        SETTINGS, catalog[:6], heldout=catalog[6:], steps=30, batch=6, lr=5e-3, seed=3, out=out, log_every=0, console=_quiet()
    )


def test_triplet_loss_is_the_hinge_on_the_mined_negative() -> None:
    # Two products, two photos each: rows 0 and 2 are product 0, rows 1 and 3 product 1.
    a = torch.tensor([1.0, 0.0])
    emb = torch.stack([a, torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6]), torch.tensor([0.0, 1.0])])
    labels = torch.tensor([0, 1, 0, 1])
    dist = torch.cdist(emb, emb)
    margin = 0.5
    loss, active = triplet_loss(emb, labels, margin, "hardest")
    expected = torch.stack([(margin + dist[i, (i + 2) % 4] - dist[i, labels != labels[i]].min()).clamp_min(0) for i in range(4)])
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert active == pytest.approx(float((expected > 0).float().mean()))
    # Semi-hard: the closest negative farther than the positive (row 1: not the hardest one).
    semi, _ = triplet_loss(emb, labels, margin, "semihard")
    rows = []
    for i in range(4):
        d_ap, negs = dist[i, (i + 2) % 4], dist[i, labels != labels[i]]
        d_an = negs[negs > d_ap].min() if (negs > d_ap).any() else negs.max()
        rows.append((margin + d_ap - d_an).clamp_min(0))
    assert semi.item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-5)
    assert semi.item() < loss.item()
    # Far apart products give no loss at all, and gradients flow when they do not.
    far = torch.stack([a, -a, a, -a])
    assert triplet_loss(far, labels, 0.2)[0].item() == 0.0
    emb.requires_grad_(True)
    triplet_loss(emb, labels, margin, "all")[0].backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(emb, labels, margin, "nope")  # type: ignore[arg-type]


def test_negatives_come_from_the_anchors_category_when_the_batch_has_one() -> None:
    # Three products: 0 and 1 are cardigans, 2 a shoe. Rows i and i+3 are one product's photos.
    emb = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.9, 0.0, 0.44], [0.99, 0.14, 0.0], [0.5, 0.86, 0.0], [0.88, 0.1, 0.46]]), dim=1
    )
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cats = torch.tensor([7, 7, 3, 7, 7, 3])
    dist = torch.cdist(emb, emb)
    margin = 0.5
    loss, _ = triplet_loss(emb, labels, margin, "hardest", cats)
    # anchor 0's hardest negative overall is the shoe (row 2); within its category, product 1
    assert dist[0, 2] < dist[0, 1]
    expected = []
    for i in range(6):
        same = (cats == cats[i]) & (labels != labels[i])
        pool = same if same.any() else labels != labels[i]
        expected.append((margin + dist[i, (i + 3) % 6] - dist[i][pool].min()).clamp_min(0))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert loss.item() != pytest.approx(triplet_loss(emb, labels, margin, "hardest")[0].item(), abs=1e-4)
    # -1: no category, every other product is a candidate
    none = torch.full((6,), -1)
    assert triplet_loss(emb, labels, margin, "hardest", none)[0].item() == pytest.approx(
        triplet_loss(emb, labels, margin, "hardest")[0].item()
    )


def test_training_lowers_the_loss(trained: TrainReport) -> None:
    losses = trained.losses
    assert trained.steps == len(losses) == 30 and trained.stopped_by == "steps"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses
    assert set(trained.hit_before) == set(trained.hit_after) == {1, 5}
    assert trained.heldout_products == 4 and trained.photos == sum(len(p.images) for p in generate_catalog(10, seed=5, prefix="t")[:6])


def test_checkpoint_loads_in_the_encoder_and_embeds_like_the_trained_net(trained: TrainReport, catalog: list[SyntheticProduct]) -> None:
    path = trained.checkpoint
    assert path is not None and path.is_file()
    digest = file_sha256(path)
    assert trained.checkpoint_sha256 == digest
    enc = build_encoder(SETTINGS.model_copy(update={"weights": str(path)})).load()
    assert not enc.random_weights
    assert digest[:12] in enc.model_version and enc.model_version == trained.model_version
    # Self-contained: BatchNorm statistics travel in the file, re-measured on training photos
    # (they differ from the noise-calibrated ones of the untrained net).
    state, _ = read_checkpoint(path)
    untrained = build_net(SETTINGS).state_dict()
    stats = [k for k in state if k.endswith("running_mean")]
    assert stats and any(not torch.equal(state[k], untrained[k]) for k in stats)
    # The worker's encoder and the trained net give the same vectors for the same crops.
    ev = make_eval_set(catalog[6:], prepare_photo, SIZE, 40_000_000)
    assert trained.net is not None
    with torch.no_grad():
        expected = trained.net.eval()(ev.gallery)
    got = torch.from_numpy(enc.embed(ev.gallery))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, torch.from_numpy(build_encoder(SETTINGS).load().embed(ev.gallery)), atol=1e-3)


def test_same_seed_same_losses(catalog: list[SyntheticProduct]) -> None:
    def run(seed: int) -> list[float]:
        return train_triplets(SETTINGS, catalog[:5], steps=4, batch=4, seed=seed, log_every=0, console=_quiet()).losses

    first = run(7)
    assert run(7) == first
    assert run(8) != first  # the seed matters: other pairs, crops and dropout


def test_frozen_blocks_stay_as_built_and_the_rest_trains(catalog: list[SyntheticProduct]) -> None:
    report = train_triplets(SETTINGS, catalog[:5], steps=3, batch=4, seed=2, freeze=4, views=2, log_every=0, console=_quiet())
    assert report.net is not None and report.steps == 3
    built = dict(build_net(SETTINGS).named_parameters())
    trained = dict(report.net.named_parameters())
    frozen = [k for k in built if k.startswith(("trunk.0.", "trunk.1.", "trunk.2.", "trunk.3."))]
    assert frozen and all(torch.equal(trained[k], built[k]) for k in frozen)
    assert not torch.equal(trained["trunk.4.block.0.0.weight"], built["trunk.4.block.0.0.weight"])
    assert not torch.equal(trained["fc2.weight"], built["fc2.weight"])
    assert all(p.requires_grad for p in report.net.parameters())  # handed back whole, ready for anything
    with pytest.raises(ValueError, match="freeze must be 0..13"):
        train_triplets(SETTINGS, catalog[:5], steps=1, freeze=14, console=_quiet())


def test_time_budget_stops_training(catalog: list[SyntheticProduct]) -> None:
    report = train_triplets(SETTINGS, catalog[:4], steps=10_000, batch=4, seed=1, time_budget_s=0.5, log_every=0, console=_quiet())
    assert report.stopped_by == "time budget" and 0 < report.steps < 10_000
    with pytest.raises(ValueError, match="at least 2 products"):
        train_triplets(SETTINGS, catalog[:1], steps=1, console=_quiet())


def test_training_catalog_is_not_the_demos() -> None:
    products, heldout = synthetic_training_set(3, heldout=2, seed=1000, street_photos=1)
    assert [p.product_id for p in products] == ["train-0001", "train-0002", "train-0003"]
    assert [p.product_id for p in heldout] == ["train-0004", "train-0005"]
    demo_bytes = {img.data for p in generate_catalog(5, seed=0, prefix="demo") for img in p.images}
    train_bytes = {img.data for p in products for img in p.images}
    assert train_bytes.isdisjoint(demo_bytes)
    # every training product got its extra street photo (with the bbox a street photo carries)
    base = {p.product_id: len(p.images) for p in generate_catalog(5, seed=1000, prefix="train")}
    assert all(len(p.images) == base[p.product_id] + 1 and p.images[-1].bbox is not None for p in products)


def test_cli_trains_and_prints_hits(tmp_path: Path) -> None:
    out = tmp_path / "enc.pt"
    args = ["train", "--products", "4", "--heldout", "3", "--steps", "3", "--batch", "4", "--image-size", str(SIZE), "--out", str(out)]
    args += ["--backbone", "mobilenet_v3_small", "--weights", "random"]
    env = {**os.environ, "CARDIGAN_ENCODER__DEVICE": "cpu", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cardigan.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "recall@1" in text and "recall@5" in text and "3 held-out" in text
    assert "3 steps of 4 products x 2 photos (stopped by steps)" in text
    assert out.is_file() and f"ckpt{file_sha256(out)[:12]}" in text
    assert f"CARDIGAN_ENCODER__WEIGHTS={out}" in text
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cardigan.cli",
            "train",
            "--products",
            "2",
            "--heldout",
            "0",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x.pt"),
        ],
        cwd=ROOT,
        env={**env, "CARDIGAN_ENCODER__BACKBONE": "nope"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "Unknown backbone 'nope'" in bad.stdout
