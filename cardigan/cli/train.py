"""``cardigan train``: fine-tune the encoder on your catalog (or a synthetic one), write a checkpoint.

The deck's deep-ranking recipe: start from the ImageNet mobilenet_v2 trunk (offline weights,
:mod:`encoder.offline_weights`), learn with the triplet hinge loss where the photos of one
product are positives for each other and negatives are mined semi-hard, same category first
(:mod:`encoder.train`). Sources (:mod:`cardigan.ops.trainset`): ``--manifest events.jsonl``,
``--from-index`` (the URIs and crops stored with the vectors) and ``--s3-prefix``; with none,
a synthetic catalog of its own (ids ``train-…``, never the products a demo searches).

A run is a fixed number of steps (same seed, same checkpoint), saves its state every
``--save-every`` steps and continues with ``--resume``. The checkpoint is what workers load with
``CARDIGAN_ENCODER__WEIGHTS=<path>``; ``cardigan reindex`` rolls it out (docs/operations.md).

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

from cardigan.errors import CardiganError  # noqa: E402
from config.settings import EncoderSettings, load_settings  # noqa: E402

if TYPE_CHECKING:
    from cardigan.ops.trainset import SourceStats
    from encoder.train import TrainReport

DEFAULT_TRAIN_SIZE = 96  # crops trained on: the net is size-agnostic, and small crops train ~4x faster than 224
TRAIN_SEED = 1000  # the training catalog's seed: not the demo's (0), and ids train-… are not demo-…
RECIPE = 2  # bump when the recipe changes, so cached demo checkpoints are retrained


@dataclass(frozen=True)
class TrainPlan:
    """What to train on and for how long; the defaults are ``cardigan train``'s."""

    products: int = 150
    heldout: int = 100
    steps: int = 300
    time_budget_s: float | None = None  # a fixed number of steps: the result does not depend on load
    train_size: int | None = DEFAULT_TRAIN_SIZE  # None: the serving size
    batch: int = 32  # measured: batches of 16 (twice the steps) learned less, and less reliably
    lr: float = 5e-3
    margin: float = 0.2
    seed: int = TRAIN_SEED
    street_photos: int = 1


def train_synthetic(settings: EncoderSettings, plan: TrainPlan, out: Path, console: Console, **resumable: Any) -> TrainReport:
    """Render the training catalog, train, write the checkpoint to ``out``; ``resumable``:
    :func:`encoder.train.train_triplets`'s state, save_every, resume and stop_after."""
    from cardigan.ops.trainset import prepare_photo
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
        prepare=prepare_photo,
        **resumable,
    )


def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.0%}"


def hits_table(report: TrainReport) -> Table:
    """hit@k on held-out products, before and after training, next to chance."""
    n = report.heldout_products
    table = Table(title=f"query photo → catalog, {n} held-out products (image size {report.image_size})")
    for col in ("", "before", "after", "chance"):
        table.add_column(col, justify="right")
    for k in sorted(report.hit_before):
        table.add_row(f"recall@{k}", _pct(report.hit_before[k]), _pct(report.hit_after.get(k)), _pct(min(1.0, k / n) if n else None))
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


PRETRAINED_START = ("mobilenet_v2", "IMAGENET1K_V1")  # the deck's recipe: fine-tune an ImageNet trunk


def starting_encoder(settings: EncoderSettings, backbone: str | None, weights: str | None) -> EncoderSettings:
    """What training starts from: ``--backbone``/``--weights``, else the backbone and weights the
    settings name explicitly (env or file), else the pretrained mobilenet_v2 ImageNet trunk."""
    explicit = settings.model_fields_set & {"backbone", "weights"}
    update: dict[str, str] = {}
    if backbone is None and weights is None and not explicit:
        update = {"backbone": PRETRAINED_START[0], "weights": PRETRAINED_START[1]}
    if backbone is not None:
        update["backbone"] = backbone
    if weights is not None:
        update["weights"] = weights
    return settings.model_copy(update=update) if update else settings


def _print_sources(console: Console, stats: SourceStats) -> None:
    table = Table(title="training photos from the catalog")
    for col in ("events", "products", "photos", "deleted", "rejected", "fetch failed"):
        table.add_column(col, justify="right")
    failed = ", ".join(f"{k} {v}" for k, v in stats.failed.most_common()) or "0"
    table.add_row(str(stats.events), str(stats.products), str(stats.photos), str(stats.deleted), str(len(stats.rejected)), failed)
    console.print(table)
    for line in [*stats.rejected[:5], *stats.failed_examples]:
        console.print(f"  [yellow]skipped[/] {line}")


def train(
    manifest: Path | None = typer.Option(
        None, "--manifest", exists=True, dir_okay=False, help="train on the products of an events.jsonl (the event contract)"
    ),
    from_index: bool = typer.Option(
        False, "--from-index", help="train on the image URIs and crops stored in the index (CARDIGAN_COLLECTION)"
    ),
    s3_prefix: str | None = typer.Option(None, "--s3-prefix", help="train on s3://bucket/prefix/<product_id>/<name>.jpg"),
    heldout_share: float = typer.Option(0.2, "--heldout-share", min=0, max=0.9, help="catalog products held out to measure recall"),
    max_products: int | None = typer.Option(None, "--max-products", min=2, help="at most this many catalog products (product-id order)"),
    fetch_threads: int = typer.Option(8, "--fetch-threads", min=1, max=256, help="parallel S3 GETs while loading photos"),
    products: int = typer.Option(150, "--products", "-n", min=2, max=100_000, help="synthetic products (when no catalog source is named)"),
    heldout: int = typer.Option(100, "--heldout", min=0, max=10_000, help="synthetic products never trained on, to measure recall"),
    steps: int = typer.Option(300, "--steps", "-s", min=0, help="optimisation steps (the run's length: same steps, same result)"),
    out: Path = typer.Option(..., "--out", "-o", dir_okay=False, help="checkpoint to write (load it with CARDIGAN_ENCODER__WEIGHTS=PATH)"),
    backbone: str | None = typer.Option(
        None, "--backbone", help=f"trunk to start from (default: settings' if set, else {PRETRAINED_START[0]})"
    ),
    weights: str | None = typer.Option(
        None, "--weights", help=f"starting weights: a torchvision name, random, or a checkpoint (default {PRETRAINED_START[1]})"
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", min=32, max=1024, help="size workers embed at (default: settings); recall is measured there"
    ),
    train_size: int | None = typer.Option(
        DEFAULT_TRAIN_SIZE, "--train-size", min=32, max=1024, help="crop size to train on (at most --image-size; smaller trains faster)"
    ),
    time_budget: float | None = typer.Option(
        None, "--time-budget", min=1, help="also stop after this many seconds (the result then depends on the machine's load)"
    ),
    batch: int = typer.Option(32, "--batch", min=2, help="products per step (two photos each)"),
    lr: float | None = typer.Option(
        None, "--lr", min=0, help="peak learning rate (default 5e-3 from random weights, 1e-3 from pretrained)"
    ),
    margin: float = typer.Option(0.2, "--margin", min=0, help="g in max(0, g + D(q,p) - D(q,n))"),
    seed: int = typer.Option(TRAIN_SEED, "--seed", help="run seed (and the synthetic catalog's; the demo's catalog uses 0)"),
    state: Path | None = typer.Option(None, "--state", dir_okay=False, help="training state file (default: OUT.state)"),
    save_every: int = typer.Option(50, "--save-every", min=0, help="save the training state every N steps (0: never)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the training state (same sources and options)"),
    stop_after: int | None = typer.Option(
        None, "--stop-after", min=0, help="pause after N steps of this run (state saved; continue with --resume)"
    ),
) -> None:
    """Train the encoder with the deck's triplet hinge loss on your catalog (or a synthetic one);
    report recall@1/@5 on held-out products before and after, and write a checkpoint."""
    console = Console()
    try:
        settings = load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one, not a traceback
        console.print(f"[red]configuration error:[/] {e}")
        raise typer.Exit(2) from None
    enc = starting_encoder(settings.encoder, backbone, weights)
    if image_size is not None:
        enc = enc.model_copy(update={"image_size": image_size})
    if lr is None:
        lr = 5e-3 if enc.weights == "random" else 1e-3  # synthetic, 150 steps: recall@1 72% -> 96% (3e-4: 92%)
    out = out.absolute()
    state_path = (state or out.with_name(out.name + ".state")).absolute()
    tsize = min(train_size, enc.image_size) if train_size else None
    try:
        if manifest is not None or from_index or s3_prefix:
            from cardigan.ops.trainset import load_catalog, prepare_photo, split_heldout
            from encoder.train import train_triplets

            catalog, stats = load_catalog(
                settings, manifest=manifest, from_index=from_index, s3_prefix=s3_prefix,
                max_products=max_products, threads=fetch_threads, console=console,
            )  # fmt: skip
            _print_sources(console, stats)
            train_set, held = split_heldout(catalog, heldout_share, seed)
            report = train_triplets(
                enc, train_set, heldout=held, steps=steps, batch=batch, lr=lr, margin=margin, seed=seed,
                time_budget_s=time_budget, out=out, train_size=tsize, console=console,
                state=state_path, save_every=save_every, resume=resume, stop_after=stop_after,
                max_pixels=settings.limits.max_image_pixels, prepare=prepare_photo,
            )  # fmt: skip
        else:
            plan = TrainPlan(
                products=products, heldout=heldout, steps=steps, time_budget_s=time_budget, train_size=train_size,
                batch=batch, lr=lr, margin=margin, seed=seed,
            )  # fmt: skip
            report = train_synthetic(enc, plan, out, console, state=state_path, save_every=save_every, resume=resume, stop_after=stop_after)
    except (ValueError, FileNotFoundError) as e:  # unknown backbone, weights that do not fit, too few products, no state
        console.print(f"[red]training failed:[/] {e}")
        raise typer.Exit(2) from None
    except CardiganError as e:  # S3 or Milvus unreachable, a source that cannot be read
        console.print(f"[red]training failed:[/] {e}")
        raise typer.Exit(1) from None
    if report.stopped_by == "paused":
        console.print(f"paused after step {report.steps} of {steps}; state in {report.state}; continue with the same command and --resume")
        return
    if report.heldout_products:
        console.print(hits_table(report))
    console.print(
        f"{report.steps} steps of {report.batch} products x 2 photos (stopped by {report.stopped_by}), {report.train_size}px crops, "
        f"final loss {report.losses[-1] if report.losses else float('nan'):.4f}; "
        f"prepare {report.prep_s:.1f}s, train {report.train_s:.1f}s, evaluate {report.eval_s:.1f}s, total {report.total_s:.1f}s"
    )
    console.print(f"checkpoint: {report.checkpoint} (model version {report.model_version})")
    console.print(
        f"use it: export CARDIGAN_ENCODER__BACKBONE={enc.backbone} CARDIGAN_ENCODER__WEIGHTS={report.checkpoint} "
        f"CARDIGAN_ENCODER__IMAGE_SIZE={report.image_size}",
        soft_wrap=True,  # one line: it is meant to be copied
        highlight=False,
    )
    console.print("then roll the workers and run `cardigan reindex` (docs/operations.md)", highlight=False)


def register(app: typer.Typer) -> None:
    """``cardigan train``."""
    app.command("train")(train)
