"""``cardigan train``: train the encoder on a synthetic catalog and write a checkpoint.

No pretrained weights can be downloaded on our machines, so a random encoder ranks products
near chance. A minute of triplet training (:mod:`encoder.train`) on a synthetic catalog of
its own (ids ``train-…``, a seed of its own: never the products a demo searches) makes street
photos find their products. The checkpoint is what workers load with
``CARDIGAN_ENCODER__WEIGHTS=<path>``.

:func:`trained_checkpoint` is the demo's entry: it trains once per set of choices and reuses
the checkpoint it cached the first time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before torch is first imported (this module loads with the CLI): idle OpenMP threads must
# sleep, not spin. On a busy 2-core machine, spinning made a training step 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from config.settings import EncoderSettings, load_settings  # noqa: E402

if TYPE_CHECKING:
    from encoder.train import TrainReport

DEFAULT_TRAIN_SIZE = 96  # crops trained on: the net is size-agnostic, and small crops train ~4x faster than 224
TRAIN_SEED = 1000  # the training catalog's seed: not the demo's (0), and ids train-… are not demo-…
RECIPE = 1  # bump when the recipe changes, so cached demo checkpoints are retrained


@dataclass(frozen=True)
class TrainPlan:
    """What to train on and for how long; the defaults are ``cardigan train``'s."""

    products: int = 150
    heldout: int = 100
    steps: int = 1000
    time_budget_s: float | None = 90.0
    train_size: int | None = DEFAULT_TRAIN_SIZE  # None: the serving size
    batch: int = 32  # measured: batches of 16 (twice the steps) learned less, and less reliably
    lr: float = 5e-3
    margin: float = 0.2
    seed: int = TRAIN_SEED
    street_photos: int = 1


def train_synthetic(settings: EncoderSettings, plan: TrainPlan, out: Path, console: Console) -> TrainReport:
    """Render the training catalog, train, write the checkpoint to ``out``."""
    from encoder.train import synthetic_training_set, train_triplets

    with console.status(f"rendering {plan.products} + {plan.heldout} synthetic training products (seed {plan.seed})…"):
        products, heldout = synthetic_training_set(
            plan.products, heldout=plan.heldout, seed=plan.seed, street_photos=plan.street_photos, workers=os.cpu_count() or 1
        )
    return train_triplets(
        settings,
        products,
        heldout=heldout,
        steps=plan.steps,
        batch=plan.batch,
        lr=plan.lr,
        margin=plan.margin,
        seed=plan.seed,
        time_budget_s=plan.time_budget_s,
        out=out,
        train_size=min(plan.train_size, settings.image_size) if plan.train_size else None,
        console=console,
    )


def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.0%}"


def hits_table(report: TrainReport) -> Table:
    """hit@k on held-out products, before and after training, next to chance."""
    n = report.heldout_products
    table = Table(title=f"street photo → catalog, {n} held-out products (image size {report.image_size})")
    for col in ("", "before", "after", "chance"):
        table.add_column(col, justify="right")
    for k in sorted(report.hit_before):
        table.add_row(f"hit@{k}", _pct(report.hit_before[k]), _pct(report.hit_after.get(k)), _pct(min(1.0, k / n) if n else None))
    return table


def training_line(info: dict[str, Any]) -> str:
    """The demo's line: ``trained for Xs on N synthetic products (hit@5 a → b …)``."""
    b, a = info.get("hit_before", {}), info.get("hit_after", {})
    hits = f"hit@5 {_pct(b.get('5'))} → {_pct(a.get('5'))}, hit@1 {_pct(b.get('1'))} → {_pct(a.get('1'))}"
    return (
        f"trained for {info['train_s']:.0f}s on {info['products']} synthetic products "
        f"({hits} on {info['heldout_products']} held-out; {info['steps']} steps at {info['train_size']}px)"
    )


def report_info(report: TrainReport) -> dict[str, Any]:
    """The report as JSON-able data (no tensors, no net), for caches and summaries."""
    # not asdict(): it would deep-copy the net
    data = {f.name: getattr(report, f.name) for f in fields(report) if f.name not in ("net", "losses", "active")}
    data["checkpoint"] = str(report.checkpoint) if report.checkpoint else None
    data["hit_before"] = {str(k): v for k, v in report.hit_before.items()}
    data["hit_after"] = {str(k): v for k, v in report.hit_after.items()}
    data["final_loss"] = report.losses[-1] if report.losses else None
    return data


def _cache_key(settings: EncoderSettings, plan: TrainPlan) -> str:
    from encoder import model_version_for

    # model_version_for names the starting weights (random seed, pretrained file or checkpoint hash).
    ident = {"start": model_version_for(settings), "plan": asdict(plan), "recipe": RECIPE}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def trained_checkpoint(settings: EncoderSettings, plan: TrainPlan, cache_dir: Path, console: Console) -> tuple[Path, dict[str, Any], bool]:
    """A checkpoint trained from ``settings`` with ``plan``: (path, report info, reused?).

    Cached in ``cache_dir`` under a key of the starting weights and the plan, so a second
    demo run with the same choices starts at once. Note that a budget-limited run's steps
    depend on the machine's speed: a retrained checkpoint can differ from the cached one.
    """
    key = _cache_key(settings, plan)
    path = cache_dir / f"encoder-{key}.pt"
    meta = cache_dir / f"encoder-{key}.json"
    if path.is_file() and meta.is_file():
        from encoder.checkpoint import file_sha256

        try:
            info = dict(json.loads(meta.read_text()))
        except ValueError:
            info = {}
        if info.get("checkpoint_sha256") == file_sha256(path):
            return path, info, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = train_synthetic(settings, plan, path, console)
    info = report_info(report)
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return path, info, False


def train(
    products: int = typer.Option(150, "--products", "-n", min=2, max=100_000, help="synthetic products to train on"),
    heldout: int = typer.Option(100, "--heldout", min=0, max=10_000, help="further products, never trained on, to measure hit@k"),
    steps: int = typer.Option(1000, "--steps", "-s", min=0, help="optimisation steps (at most; see --time-budget)"),
    out: Path = typer.Option(..., "--out", "-o", dir_okay=False, help="checkpoint to write (load it with CARDIGAN_ENCODER__WEIGHTS=PATH)"),
    image_size: int | None = typer.Option(
        None, "--image-size", min=32, max=1024, help="size workers embed at (default: settings); hit@k is measured there"
    ),
    train_size: int | None = typer.Option(
        DEFAULT_TRAIN_SIZE, "--train-size", min=32, max=1024, help="crop size to train on (at most --image-size; smaller trains faster)"
    ),
    time_budget: float | None = typer.Option(90.0, "--time-budget", min=1, help="seconds of optimisation at most"),
    batch: int = typer.Option(32, "--batch", min=2, help="products per step (two photos each)"),
    lr: float = typer.Option(5e-3, "--lr", min=0),
    margin: float = typer.Option(0.2, "--margin", min=0, help="g in max(0, g + D(q,p) - D(q,n))"),
    seed: int = typer.Option(TRAIN_SEED, "--seed", help="training catalog and run seed (the demo's catalog uses 0)"),
) -> None:
    """Train the encoder with a triplet hinge loss on a synthetic catalog; report hit@k before and after."""
    console = Console()
    try:
        settings = load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one, not a traceback
        console.print(f"[red]configuration error:[/] {e}")
        raise typer.Exit(2) from None
    enc = settings.encoder if image_size is None else settings.encoder.model_copy(update={"image_size": image_size})
    plan = TrainPlan(
        products=products,
        heldout=heldout,
        steps=steps,
        time_budget_s=time_budget,
        train_size=train_size,
        batch=batch,
        lr=lr,
        margin=margin,
        seed=seed,
    )
    try:
        report = train_synthetic(enc, plan, out.absolute(), console)
    except ValueError as e:  # unknown backbone, weights that do not fit, too few products
        console.print(f"[red]training failed:[/] {e}")
        raise typer.Exit(2) from None
    if heldout:
        console.print(hits_table(report))
    console.print(
        f"{report.steps} steps of {report.batch} products x 2 photos (stopped by {report.stopped_by}), {report.train_size}px crops, "
        f"final loss {report.losses[-1] if report.losses else float('nan'):.4f}; "
        f"prepare {report.prep_s:.1f}s, train {report.train_s:.1f}s, evaluate {report.eval_s:.1f}s, total {report.total_s:.1f}s"
    )
    console.print(f"checkpoint: {report.checkpoint} (model version {report.model_version})")
    console.print(f"use it: export CARDIGAN_ENCODER__WEIGHTS={report.checkpoint} CARDIGAN_ENCODER__IMAGE_SIZE={report.image_size}")


def register(app: typer.Typer) -> None:
    """``cardigan train``."""
    app.command("train")(train)
