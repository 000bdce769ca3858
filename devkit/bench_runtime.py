"""``python -m devkit.bench_runtime``: the forward pass alone, torch against ONNX Runtime.

For each backbone, side by side in one run: the embedding net (trunk + head, random weights:
speed does not depend on them) as the frozen TorchScript graph the torch runtime serves, and
as the ONNX export the onnxruntime runtime serves, on the same random batch and thread count.
A backbone name torchvision knows but the encoder registry does not (mobilenet_v2) is built
straight from torchvision. Prints a table; numbers are for this machine, at its current load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from encoder import onnx_runtime
from encoder.model import EmbeddingNet
from encoder.registry import get_backbone, known_backbones


def build_net(name: str) -> nn.Module:
    if name in known_backbones():
        b = get_backbone(name)
        return EmbeddingNet(b.build_trunk(None), b.feature_dim).eval()
    if name == "mobilenet_v2":
        return EmbeddingNet(models.mobilenet_v2().features, 1280).eval()
    raise SystemExit(f"unknown backbone {name!r}; known: mobilenet_v2, {', '.join(known_backbones())}")


def rate(step: object, batch: int, seconds: float) -> float:
    """Best images/s over three windows of ``seconds`` (other load only slows a window down)."""
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()  # type: ignore[operator]
            n += batch
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v3_small,mobilenet_v2,resnet50")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each of the three windows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.size, args.size)
    xn = x.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            net = build_net(name)
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                graph = torch.jit.freeze(torch.jit.trace(net, x[:2]))
                graph(x)
                graph(x)
                t = rate(lambda g=graph: g(x), args.batch, args.seconds)
            path = Path(tmp) / f"{name}.onnx"
            onnx_runtime.export(net, path, args.size)
            sess = onnx_runtime.open_session(path, args.threads)
            cos = onnx_runtime.check_against(sess, net, args.size)
            onnx_runtime.run(sess, xn)
            o = rate(lambda s=sess: onnx_runtime.run(s, xn), args.batch, args.seconds)
            rows.append((name, t, o, cos))
            print(f"{name}: torchscript {t:.1f} img/s, onnxruntime {o:.1f} img/s", flush=True)
    print(f"\nforward only, batch {args.batch}, {args.size} px, {args.threads} thread(s), images/s")
    print("| network | TorchScript | ONNX Runtime | speed-up | min cosine |\n|---|---:|---:|---:|---:|")
    for name, t, o, cos in rows:
        print(f"| {name} | {t:.1f} | {o:.1f} | {o / t:.2f}x | {cos:.6f} |")


if __name__ == "__main__":
    main()
