"""The GPU targets of issue 14 in one prepared run, for the day a GPU is lent.

    python -m devkit.gpu_check                  # on a CUDA host: about 3-6 minutes
    python -m devkit.gpu_check --device cpu --events 60 --model mobilenet_v3_small --image-size 64
                                                # rehearsal on a CPU: proves the script, measures nothing

It installs nothing and downloads nothing (random weights: speed does not depend on them). It
measures, in one process tree on the same machine:

1. the model alone: ``Encoder.embed_pixels`` on a pinned uint8 batch, normalised on the
   device, autocast in ``--dtype`` (the forward-only ceiling);
2. decode alone: :func:`cardigan.imaging.device_decode.device_crops` (nvJPEG, batched) on the
   bench's photos;
3. end to end: ``cardigan bench`` (devkit.bench.run_bench) with ``--workers`` processes on the
   GPU, ``CARDIGAN_ENCODER__DTYPE`` and ``CARDIGAN_ENCODER__DECODE`` set, and the naive
   pipeline (batch 1, one Milvus write per event) in the same run;

then prints the table the targets need (resnet50 bf16 end to end >= 5,000 images/s, >= 10x the
naive path, >= 0.7 of the forward-only ceiling) and writes it as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = {  # issue 14, point 3 (H200)
    "images_per_s": (">=", 5000.0),
    "speedup_vs_naive": (">=", 10.0),
    "ratio_to_forward_only": (">=", 0.7),
}


def _rate(step: Any, n: int, seconds: float, sync: Any) -> float:
    """Images/s of ``step()`` (``n`` images each) over about ``seconds``, after two warm-up calls."""
    step()
    step()
    sync()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        done += n
    sync()
    return done / (time.perf_counter() - t0)


def micro(args: argparse.Namespace, jpegs: list[tuple[bytes, list[int] | None]]) -> dict[str, float]:
    """The model alone and the decode alone, each on the path the pipeline uses."""
    import numpy as np
    import torch

    from cardigan.imaging.device_decode import ImageJob, device_crops
    from config.settings import EncoderSettings
    from encoder import build_encoder

    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a rehearsal on a shared CPU: OpenMP barriers would dominate

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    s = EncoderSettings(
        backbone=args.model,
        weights="random",
        image_size=args.image_size,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        runtime="torch",
    )
    enc = build_encoder(s).load()
    rng = np.random.default_rng(0)
    crops = list(rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8))
    forward = _rate(lambda: enc.embed_pixels(crops), args.batch_size, args.seconds, sync)
    jobs = [ImageJob(d, b, f"images[{i}]") for i, (d, b) in enumerate(jpegs[: args.batch_size])]
    decode = _rate(lambda: device_crops(jobs, size=args.image_size, max_pixels=40_000_000, device=dev), len(jobs), args.seconds, sync)
    return {"forward_only_pixels_images_per_s": round(forward, 1), "device_decode_only_images_per_s": round(decode, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m devkit.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a rehearsal: no GPU numbers)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", help="encoder.dtype: auto, bfloat16, float16, float32")
    p.add_argument("--decode", default="device", choices=["device", "cpu"], help="encoder.decode for the end-to-end run")
    p.add_argument("--events", type=int, default=6000, help="events per end-to-end run (about 2.6 images each)")
    p.add_argument("--workers", type=int, default=4, help="worker processes sharing the GPU")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=256, help="task threads per worker")
    p.add_argument("--fetch-threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0, help="length of each micro measurement")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    args = p.parse_args(argv)

    import torch

    rehearsal = args.device == "cpu"
    if not rehearsal and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}): nothing to measure; --device cpu rehearses the script", file=sys.stderr)
        return 2
    from devkit.bench import BenchOptions, run_bench
    from devkit.catalog import generate_catalog

    started = time.monotonic()
    # the workers read these (the bench passes its environment on), and so does the bench's own ceiling
    os.environ["CARDIGAN_ENCODER__DTYPE"] = args.dtype
    os.environ["CARDIGAN_ENCODER__DECODE"] = args.decode
    os.environ.setdefault("CARDIGAN_WORKER__WRITE_BATCH_SIZE", "512")
    gpu = torch.cuda.get_device_name(0) if not rehearsal else "none (cpu rehearsal)"
    print(f"gpu_check: {args.model} {args.dtype} at {args.image_size} px on {gpu}, decode on {args.decode}", flush=True)

    products = generate_catalog(min(200, args.events), seed=0, prefix="p", workers=os.cpu_count() or 2)  # the bench's photos
    jpegs = [(img.data, list(img.bbox) if img.bbox else None) for prod in products for img in prod.images]
    res: dict[str, Any] = micro(args, jpegs)
    print(f"micro ({time.monotonic() - started:.0f}s): {res}", flush=True)

    opts = BenchOptions(
        events=args.events, model=args.model, device=args.device, image_size=args.image_size, workers=args.workers,
        concurrency=args.concurrency, prefetch=2, batch_size=args.batch_size, batch_wait_ms=3.0, fetch_threads=args.fetch_threads,
        torch_threads=1, runtime="torch", compare_torch=False, warmup=50 * args.workers, fresh_seconds=5.0, naive=True,
        ready_timeout_s=240, drain_timeout_s=240,
    )  # fmt: skip
    bench = run_bench(opts, say=lambda m: print(f"  {m}", flush=True)).as_dict()
    fwd = max(res["forward_only_pixels_images_per_s"], bench["forward_only_images_per_s"] or 0.0)
    res.update(
        {
            "images_per_s": bench["images_per_s"],
            "naive_images_per_s": bench["naive_images_per_s"],
            "speedup_vs_naive": bench["speedup_vs_naive"],
            "forward_only_images_per_s": fwd,
            "ratio_to_forward_only": round(bench["images_per_s"] / fwd, 3) if fwd else None,
            "batch_size_mean": bench["batch_size_mean"],
            "model_busy_pct": bench["model_busy_pct"],
            "freshness_p99_ms": bench["freshness_p99_ms"],
            "cpu_ms_per_image": bench["cpu_ms_per_image"],
            "decode": args.decode,
            "dtype": args.dtype,
            "model": args.model,
            "device": gpu,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "events": args.events,
            "images": bench["images"],
            "cpu_count": os.cpu_count(),
            "load_avg_end": bench["load_avg_end"],
            "seconds_total": round(time.monotonic() - started, 1),
            "rehearsal": rehearsal,
        }
    )
    print(render(res), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**res, "bench": bench}, indent=1))
    print(json.dumps(res), flush=True)
    return 0


def render(res: dict[str, Any]) -> str:
    """A plain-text table (no rich: the output is read back from a remote log)."""
    lines = [f"{'metric':<36} {'value':>12}  target"]
    for key, value in res.items():
        target = ""
        if key in TARGETS and value is not None and not res.get("rehearsal"):
            op, bound = TARGETS[key]
            ok = value >= bound if op == ">=" else value < bound
            target = f"{op} {bound:g} {'ok' if ok else 'MISSED'}"
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<36} {shown:>12}  {target}")
    if res.get("rehearsal"):
        lines.append("REHEARSAL on a CPU: these are not GPU numbers")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
