"""``cardigan eval``: recall@1, recall@5 and mAP of one or more encoders on labelled sets.

The sets come from ``devkit.evalsets`` (street→shop on unseen synthetic products, near-duplicates
of real photographs that ship in packages); the scoring is :mod:`cardigan.ops.evaluate`, through
the workers' own preprocessing and encoder, so the number is the product's number.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from config.settings import EncoderSettings, load_settings

if TYPE_CHECKING:
    from cardigan.ops.evaluate import Score


def encoder_settings(base: EncoderSettings, spec: str) -> tuple[str, EncoderSettings]:
    """``[BACKBONE:]WEIGHTS`` → (row label, settings). WEIGHTS: random, a torchvision weights
    name (IMAGENET1K_V1) or a checkpoint path; BACKBONE defaults to ``base``'s."""
    from encoder import known_backbones

    backbone, _, weights = spec.partition(":")
    if not weights or backbone not in known_backbones():
        backbone, weights = base.backbone, spec
    label = spec if weights == spec else f"{backbone}:{weights}"
    if "/" in weights or weights.endswith((".pt", ".pth")):
        label = (f"{backbone}:" if weights != spec else "") + Path(weights).name
    return label, base.model_copy(update={"backbone": backbone, "weights": weights})


def _cell(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.3f}"


def scores_table(scores: Sequence[Score], title: str = "retrieval quality (cardigan eval)") -> Table:
    """One row per (set, encoder): recall@1, recall@5, mAP, and what chance would score."""
    table = Table(title=title)
    for col, just in (("set", "left"), ("encoder", "left"), ("recall@1", "right"), ("recall@5", "right"), ("mAP", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    table.add_column("queries / gallery", justify="right")
    table.add_column("model version", justify="left", overflow="fold")
    previous = None
    for s in scores:
        if previous is not None and s.set != previous:
            table.add_section()
        previous = s.set
        table.add_row(
            s.set, s.encoder, _cell(s.recall.get(1, math.nan)), _cell(s.recall.get(5, math.nan)), _cell(s.mean_ap),
            f"{s.queries} / {s.gallery}", s.model_version,
        )  # fmt: skip
    return table


def run_eval(
    specs: Sequence[tuple[str, EncoderSettings]],
    sets: Sequence[object],
    *,
    max_pixels: int,
    crop: str = "given",
    console: Console | None = None,
) -> list[Score]:
    """Every encoder on every set, encoder by encoder (one model in memory at a time)."""
    from cardigan.ops.evaluate import EvalSet, score_set
    from encoder import Encoder

    console = console or Console(stderr=True)
    scores: list[Score] = []
    for label, enc_settings in specs:
        enc = Encoder(enc_settings)
        with console.status(f"loading {label} ({enc_settings.backbone})…"):
            enc.load()
        for ev in sets:
            assert isinstance(ev, EvalSet)
            with console.status(f"{label}: embedding {ev.name} ({len(ev.queries)} queries, {len(ev.gallery)} gallery photos)…"):
                scores.append(score_set(enc, ev, label=label, max_pixels=max_pixels, crop=crop))  # type: ignore[arg-type]
        del enc
    return sorted(scores, key=lambda s: [e.name for e in sets].index(s.set))  # type: ignore[attr-defined]


def eval_command(
    weights: list[str] | None = typer.Option(
        None,
        "--weights",
        "-w",
        help="[BACKBONE:]WEIGHTS, repeatable: random, a torchvision weights name (IMAGENET1K_V1) or a checkpoint path "
        "(default: the settings' encoder)",
    ),
    sets: list[str] | None = typer.Option(None, "--set", help="street2shop and/or neardup (default: both)"),
    products: int = typer.Option(100, "--products", "-n", min=2, max=100_000, help="products in the street→shop set"),
    image_size: int | None = typer.Option(None, "--image-size", min=32, max=1024, help="encoder input size (default: settings)"),
    crop: str = typer.Option("given", "--crop", help="queries: given (the set's boxes), centre (no box: trim or centre) or localise"),
    as_json: bool = typer.Option(False, "--json", help="print the scores as JSON"),
) -> None:
    """Score encoders on labelled query → product sets: recall@1, recall@5, mAP."""
    from cardigan.ops.evaluate import CROP_MODES, EvalError

    err = Console(stderr=True)
    try:
        settings = load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one, not a traceback
        err.print(f"[red]configuration error:[/] {e}")
        raise typer.Exit(2) from None
    base = settings.encoder if image_size is None else settings.encoder.model_copy(update={"image_size": image_size})
    if crop not in CROP_MODES:
        err.print(f"[red]error:[/] --crop must be one of {', '.join(CROP_MODES)}, not {crop!r}")
        raise typer.Exit(2)
    try:
        from encoder import Encoder

        specs = [encoder_settings(base, w) for w in (weights or [base.weights])]
        for _, s in specs:
            Encoder(s)  # names are checked here, before minutes of rendering and embedding
        try:
            from devkit.evalsets import SETS, build_sets
        except ImportError as e:
            err.print(f"[red]error:[/] `cardigan eval` needs the devkit extra ({e.name} missing): pip install 'cardigan[devkit]'")
            raise typer.Exit(2) from None
        names = sets or list(SETS)
        with err.status(f"building the eval sets ({', '.join(names)})…"):
            built = build_sets(names, products=products)
        scores = run_eval(specs, built, max_pixels=settings.limits.max_image_pixels, crop=crop, console=err)
    except (EvalError, ValueError, RuntimeError) as e:
        err.print(f"[red]eval failed:[/] {e}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"crop": crop, "sets": {s.name: s.description for s in built}, "scores": [s.as_dict() for s in scores]}))
        return
    for s in built:
        err.print(f"[bold]{s.name}[/]: {s.description}")
    Console().print(scores_table(scores, title=f"retrieval quality, image size {base.image_size}, crop {crop}"))


def register(app: typer.Typer) -> None:
    """``cardigan eval``."""
    app.command("eval")(eval_command)
