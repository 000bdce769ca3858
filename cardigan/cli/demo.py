"""``cardigan demo``: the options; the run itself is ``devkit.demo`` (imported when the command runs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cardigan.cli._devkit import require_devkit
from cardigan.errors import CardiganError


def demo(
    products: int = typer.Option(200, "--products", "-n", min=1, max=100_000, help="synthetic products in the catalog"),
    workers: int = typer.Option(2, "--workers", "-w", min=1, max=64, help="worker processes (one model each)"),
    keep: bool = typer.Option(False, "--keep", help="leave the stack and workers running (stop with --stop)"),
    out: Path = typer.Option(Path("demo-out"), "--out", help="where results.html, contact_sheet.png, logs and the stack go"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="stack data directory (default <out>/stack)"),
    seed: int = typer.Option(0, "--seed", help="catalog and scenario seed: same seed, same events"),
    image_size: int | None = typer.Option(None, "--image-size", min=32, max=1024, help="encoder input size (default: settings, 224)"),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="events in flight per worker"),
    stop: bool = typer.Option(False, "--stop", help="only stop what an earlier --keep run left running"),
    backbone: str | None = typer.Option(
        None, "--backbone", help="encoder backbone (default: CARDIGAN_ENCODER__BACKBONE, else mobilenet_v2)"
    ),
    weights: str | None = typer.Option(
        None,
        "--weights",
        help="random, a torchvision weights name or a checkpoint (default: CARDIGAN_ENCODER__WEIGHTS, else IMAGENET1K_V1)",
    ),
    train: bool | None = typer.Option(
        None, "--train/--no-train", help="fine-tune the encoder on a synthetic catalog first (default: unless --weights is a checkpoint)"
    ),
    train_steps: int = typer.Option(60, "--train-steps", min=1, help="training steps (fixed: same seed, same checkpoint; cached in --out)"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="score the encoder before and after training (cardigan eval) at the end"),
) -> None:
    """Run the whole system on this machine and check the index it builds."""
    dm = require_devkit("devkit.demo", "demo")
    console = Console()
    if stop:
        n, services = dm.stop_kept(out.absolute(), data_dir)
        console.print(f"stopped {n} worker(s) and {', '.join(services) or 'no servers'}")
        return
    opts = dm.DemoOptions(
        products=products,
        workers=workers,
        keep=keep,
        out=out,
        data_dir=data_dir,
        seed=seed,
        image_size=image_size,
        concurrency=concurrency,
        backbone=backbone,
        weights=weights,
        train=train,
        train_steps=train_steps,
        evaluate=evaluate,
    )
    try:
        res = dm.run_demo(opts, console)
    except CardiganError as e:
        console.print(f"[red]demo failed:[/] {e.reason}")
        raise typer.Exit(2) from None
    except ValueError as e:  # settings: an unknown backbone, bad weights name, …
        console.print(f"[red]demo failed (configuration):[/] {e}")
        raise typer.Exit(2) from None
    dm.print_result(res, console)
    raise typer.Exit(0 if res.ok else 1)


def register(app: typer.Typer) -> None:
    """``cardigan demo``."""
    app.command("demo")(demo)
