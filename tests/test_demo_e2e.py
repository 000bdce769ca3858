"""``cardigan demo`` at reduced size: it runs end to end, and its verification can fail."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from cardigan.ops.verify import Expected
from devkit.demo import DemoOptions, DemoResult, print_result, run_demo
from devkit.stack import Stack

pytestmark = pytest.mark.e2e

SMALL = {"products": 12, "workers": 1, "image_size": 64, "concurrency": 8, "queries": 3}
# training before the demo, shrunk to seconds (the real demo trains for 60 steps on 150 products)
TINY_TRAINING = {"train_products": 6, "train_heldout": 4, "train_steps": 2}
# the fast encoder for the run that tests other things than the default's meaning
RANDOM_SMALL = {"backbone": "mobilenet_v3_small", "weights": "random"}


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _nothing_runs(res: DemoResult) -> None:
    assert all(_gone(p) for p in res.worker_pids), "demo workers left running"
    st = Stack(res.out / "stack").status()
    assert not any(s["running"] for s in st.values()), st


def _readme_keep_flow(out: Path, res: DemoResult) -> None:
    """The README's keep flow, as written, in a shell whose PATH lacks the venv."""
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin) or "/usr/bin:/bin"
    env = {"PATH": path, "HOME": str(out), "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "COLUMNS": "200", "NO_COLOR": "1"}
    script = f"cd {out.parent} && source {out / 'demo.env'} && cardigan status && cardigan stack status"
    sh = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert sh.returncode == 0, sh.stdout + sh.stderr
    online = next(line for line in sh.stdout.splitlines() if "workers online" in line)
    assert "alias demo" in sh.stderr and "none" not in online, sh.stdout + sh.stderr  # the kept workers answer
    assert f"stack {out / 'stack'}" in sh.stdout.replace("\n", "") and sh.stdout.count("healthy") == 3, sh.stdout


def test_demo_runs_end_to_end_and_verifies(tmp_path: Path) -> None:
    console, buf = _console()
    res = run_demo(DemoOptions(out=tmp_path / "out", eval_products=6, **SMALL, **TINY_TRAINING), console)
    print_result(res, console)
    text = buf.getvalue()
    assert res.ok, text
    v = res.verify
    assert v.products_live + v.products_deleted == 12 and v.products_deleted >= 1
    assert v.vectors_found == v.vectors_expected > v.products_live  # some products have several photos
    assert "verified: " in text and "events/s" in text and "p99" in text
    assert "double listings (threshold" in text and "planted pairs" in text  # found vs planted, after the queries
    assert res.events > 12 and res.events_per_s > 0 and res.images_per_s > 0
    assert res.latency_ms["n"] >= v.products_live and 0 < res.latency_ms["p50"] <= res.latency_ms["p99"]
    assert res.dead_letters == []
    # the outputs exist and hold the queries: 3 street photos plus one "similar items" row
    with Image.open(res.png) as png:
        assert png.format == "PNG" and png.height > 4 * 128
    html = res.html.read_text()
    assert html.count("<section>") == 4 and "data:image/jpeg;base64," in html
    assert "3 queries scored" in html and "1 row without a right answer" in html  # the similar-items row is not scored
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["ok"] is True and summary["events"] == res.events
    # hit rates are scored over a street photo of every live product, not only the 3 shown
    assert res.queries_scored == v.products_live == summary["queries_scored"]
    assert res.hit_at_1 is not None and res.hit_at_k is not None and 0 <= res.hit_at_1 <= res.hit_at_k <= 1
    assert f"of {v.products_live} new street photos" in text
    assert res.image_size == 64 and "-64-" in res.model_version
    # ImageNet weights by default, fine-tuned first; the workers loaded the checkpoint
    assert res.training is not None and not res.training["reused"] and not res.random_weights
    assert res.training["backbone"] == "mobilenet_v2" and res.training["steps"] == 2
    assert f"ckpt{res.training['checkpoint_sha256'][:12]}" in res.model_version
    assert "trained for " in text and "synthetic products (hit@5 " in text and "RANDOM weights" not in text
    assert summary["training"]["products"] == 6
    # cardigan eval at the end: the pretrained start and the fine-tuned encoder, on both sets
    rows = {(r["set"], r["encoder"]) for r in summary["evaluation"]}
    assert rows == {
        (s, e) for s in ("street2shop", "neardup") for e in ("mobilenet_v2:IMAGENET1K_V1", "mobilenet_v2:IMAGENET1K_V1 + 2 steps")
    }
    assert all(0 <= r["recall@1"] <= r["recall@5"] <= 1 for r in summary["evaluation"]) and "cardigan eval: retrieval quality" in text
    _nothing_runs(res)
    assert sorted(res.stopped_services) == ["milvus", "moto", "valkey"]


def test_demo_second_run_starts_clean_and_wrong_expectation_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_demo(DemoOptions(out=out, keep=True, seed=0, evaluate=False, **SMALL, **TINY_TRAINING, **RANDOM_SMALL), _console()[0])
    assert first.ok and first.kept_env is not None
    assert not any(_gone(p) for p in first.worker_pids), "--keep should leave the workers running"
    _readme_keep_flow(out, first)

    tampered: dict[str, str] = {}

    def tamper(expected: dict[str, Expected | None]) -> None:
        live = sorted(p for p, e in expected.items() if e is not None)
        gone_pid, bumped = live[0], live[1]
        expected[gone_pid] = None  # claims a live product was deleted
        e = expected[bumped]
        assert e is not None
        expected[bumped] = Expected(e.version + 1, e.n_images, e.model_version)  # claims a newer version
        tampered.update(deleted=gone_pid, bumped=bumped)

    # another seed: other products change, so leftovers of the first run would show as mismatches
    console, buf = _console()
    second = run_demo(
        DemoOptions(out=out, seed=1, verify_timeout_s=2, tamper=tamper, evaluate=False, **SMALL, **TINY_TRAINING, **RANDOM_SMALL), console
    )
    print_result(second, console)
    text = buf.getvalue()
    assert not second.ok
    mism = second.verify.mismatches
    assert len(mism) == 2, mism  # exactly the two lies, nothing left over from the first run
    assert any(m.startswith(f"{tampered['deleted']}: deleted, but") for m in mism), mism
    assert any(m.startswith(f"{tampered['bumped']}: expected version") for m in mism), mism
    assert "MISMATCH (2 products differ)" in text and tampered["deleted"] in text
    # the checkpoint the first run trained is reused (same settings and budget), not retrained
    assert first.training is not None and second.training is not None and second.training["reused"]
    assert second.model_version == first.model_version and "reused " in text
    assert json.loads((out / "summary.json").read_text())["ok"] is False
    # the first run's workers were replaced, and the stack it kept is stopped now
    assert all(_gone(p) for p in first.worker_pids)
    _nothing_runs(second)
