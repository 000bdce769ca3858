"""``cardigan bench``: the options; the measurement itself is ``devkit.bench`` (imported when the command runs)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cardigan.cli._devkit import require_devkit
from cardigan.errors import CardiganError


def bench(
    events: int = typer.Option(1000, "--events", "-n", min=1, help="events per throughput run (each has 1-4 photos)"),
    model: str = typer.Option("mobilenet_v2", "--model", help="encoder backbone"),
    weights: str | None = typer.Option(
        None, "--weights", help="encoder weights (default: CARDIGAN_ENCODER__WEIGHTS, else ImageNet for mobilenet_v2, random for others)"
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    image_size: int = typer.Option(224, "--image-size", min=32, max=1024),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="worker processes (one model each)"),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="task threads per worker (default: settings)"),
    prefetch: int | None = typer.Option(None, "--prefetch", min=1, help="prefetch multiplier (default: settings)"),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="images per forward pass (default: settings)"),
    batch_wait_ms: float | None = typer.Option(None, "--batch-wait-ms", min=0, help="how long a batch waits to fill (default: settings)"),
    fetch_threads: int | None = typer.Option(None, "--fetch-threads", min=1, help="fetch+decode threads per worker (default: settings)"),
    torch_threads: int = typer.Option(
        0,
        "--torch-threads",
        min=0,
        help="torch intra-op threads per worker (ONNX Runtime's too, unless CARDIGAN_ENCODER__ONNX_THREADS says); 0: torch's default (all cores)",
    ),
    fresh_seconds: float = typer.Option(15.0, "--fresh-seconds", min=0, help="length of the half-load freshness run; 0 skips it"),
    naive: bool = typer.Option(True, "--naive/--no-naive", help="also run the unbatched pipeline"),
    soak_events: int = typer.Option(0, "--soak", min=0, help="also run an RSS soak of this many events"),
    s3: str = typer.Option(
        "rclone", "--s3", help="S3 server on this machine: rclone (Go, ~0.5 ms CPU per GET) or moto (Python, ~2.3 ms); folder: file:// URIs"
    ),
    milvus: str = typer.Option(
        "lite", "--milvus", help="lite (Milvus Lite, Python) or server (the real standalone Milvus from the milvus wheel, C++)"
    ),
    pool: int = typer.Option(200, "--pool", min=1, help="distinct products rendered (events reuse their photos)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="keep the stack and worker logs here (default: a temporary folder)"),
    profile: bool = typer.Option(False, "--profile", help="also report the workers' CPU time per stage"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
    duplicates: bool = typer.Option(
        True, "--duplicates/--no-duplicates", help="also run the events with double-listing detection off and on (its CPU cost)"
    ),
    runtime: str | None = typer.Option(None, "--runtime", help="torch | onnxruntime (default: settings, CARDIGAN_ENCODER__RUNTIME)"),
    compare_torch: bool = typer.Option(
        True, "--compare-torch/--no-compare-torch", help="on onnxruntime, also run the batched pipeline on torch (images_per_s_torch)"
    ),
) -> None:
    """Measure throughput, batching gain, freshness and worker memory of the whole pipeline."""
    bm = require_devkit("devkit.bench", "bench")
    err = Console(stderr=True)
    opts = bm.BenchOptions(
        events=events, model=model, weights=weights, device=device, image_size=image_size, workers=workers, concurrency=concurrency,
        prefetch=prefetch, batch_size=batch_size, batch_wait_ms=batch_wait_ms, fetch_threads=fetch_threads,
        torch_threads=torch_threads, fresh_seconds=fresh_seconds, naive=naive, soak=soak_events, s3=s3, milvus=milvus, pool=pool, data_dir=data_dir,
        profile=profile, runtime=runtime, compare_torch=compare_torch, duplicates=duplicates,
    )  # fmt: skip
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err)
    try:
        with progress:
            res = bm.run_bench(opts, progress=progress, say=lambda m: progress.console.print(f"[dim]{m}[/]")).as_dict()
    except CardiganError as e:
        err.print(f"[red]bench failed:[/] {e.reason}")
        raise typer.Exit(1) from None
    Console().print(bm.results_table(res))
    if as_json:
        print(json.dumps(res), flush=True)


def register(app: typer.Typer) -> None:
    """``cardigan bench``."""
    app.command("bench")(bench)
