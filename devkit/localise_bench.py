"""Train the crop's box head and measure the localisers against the centre crop.

``python -m devkit.localise_bench train``: fits the 1×1 box head of
:mod:`cardigan.imaging.localise` on synthetic street photos (the generator knows every box),
full-batch L-BFGS on cached trunk features: deterministic, about a minute on two cores, and
writes ``cardigan/imaging/heads/<backbone>.npz`` (a few kB, committed).

``python -m devkit.localise_bench measure``: on held-out products (other ids, other seed),
the IoU of each method's box with the known box of a new street photo (no bbox given), and
street→shop hit@k with the same encoder, the shop side cropped as the workers crop it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from cardigan.imaging.crop import crop_with_background, to_tensor
from cardigan.imaging.localise import HEADS_DIR, Localiser, head_path, load_head, to_input, trunk_fingerprint
from config.settings import EncoderSettings
from devkit.catalog import generate_catalog, query_photo, render_product
from encoder import Encoder

TRAIN_PREFIX, TRAIN_SEED = "boxtrain", 1
HELD_PREFIX, HELD_SEED = "held", 99
Box = tuple[float, float, float, float]


def street_photos(n: int, *, prefix: str, seed: int) -> list[tuple[Image.Image, Box]]:
    """One new street photo of each of ``n`` synthetic products, with its known box."""
    out = []
    for i in track(range(n), description=f"rendering {n} street photos", transient=True):
        q = query_photo(render_product(f"{prefix}-{i:04d}", 0, 1, seed))
        assert q.bbox is not None
        out.append((Image.open(io.BytesIO(q.data)).convert("RGB"), tuple(map(float, q.bbox))))
    return out


def load_encoder(backbone: str, weights: str, size: int = 224, *, graph: bool = True) -> Encoder:
    """The encoder on the CPU with torch (``graph``: its frozen TorchScript graph, for embedding)."""
    s = EncoderSettings(backbone=backbone, weights=weights, image_size=size, runtime="torch", device="cpu", cpu_graph=graph)
    return Encoder(s).load()


def coverage(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """Share of each cell of a g×g grid over the stretched photo that the box covers."""
    w, h = image_size
    g_h, g_w = grid
    edges_x = np.linspace(0, 1, g_w + 1)
    edges_y = np.linspace(0, 1, g_h + 1)
    ox = np.clip(np.minimum(edges_x[1:], box[2] / w) - np.maximum(edges_x[:-1], box[0] / w), 0, None) * g_w
    oy = np.clip(np.minimum(edges_y[1:], box[3] / h) - np.maximum(edges_y[:-1], box[1] / h), 0, None) * g_h
    return np.outer(oy, ox).astype(np.float32)


def features(trunk: torch.nn.Module, photos: Sequence[tuple[Image.Image, Box]], size: int, batch: int = 16) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in track(range(0, len(photos), batch), description="trunk features", transient=True):
            x = torch.cat([to_input(img, size) for img, _ in photos[i : i + batch]])
            out.append(trunk(x).float())
    return torch.cat(out)


def fit_head(feats: torch.Tensor, targets: torch.Tensor, *, l2: float = 1e-3, iters: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell logistic regression (soft targets), full batch L-BFGS: the same result every run."""
    c = feats.shape[1]
    x = feats.permute(0, 2, 3, 1).reshape(-1, c).double()
    y = targets.reshape(-1).double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)  # standardise for conditioning, fold back below
    xs = (x - mu) / sd
    w = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = (w / sd).float().numpy()
        bias = (b - (w * mu / sd).sum()).float().numpy()
    return weight, bias


def train(backbone: str, weights: str, n: int, size: int, out: Path, console: Console) -> Path:
    t0 = time.perf_counter()
    enc = load_encoder(backbone, weights, graph=False)
    trunk = enc.trunk
    photos = street_photos(n, prefix=TRAIN_PREFIX, seed=TRAIN_SEED)
    feats = features(trunk, photos, size)
    grid = (feats.shape[2], feats.shape[3])
    targets = torch.from_numpy(np.stack([coverage(box, img.size, grid) for img, box in photos]))
    weight, bias = fit_head(feats, targets)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        weight=weight,
        bias=bias,
        trunk_fingerprint=np.array(trunk_fingerprint(trunk)),
        size=np.array(size),
        recipe=np.array(f"{backbone} {weights}; {n} street photos {TRAIN_PREFIX}-* seed {TRAIN_SEED}; L-BFGS l2=1e-3"),
    )
    console.print(f"box head for {backbone} ({weights}) → {out} in {time.perf_counter() - t0:.0f}s")
    return out


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Row:
    method: str
    mean_iou: float
    iou50: float
    hits: dict[int, float]
    ms: float | None
    found: float  # share of photos where the method gave a box (else centre)


def _embed(enc: Encoder, tensors: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([enc.embed(torch.stack(tensors[i : i + 32])) for i in range(0, len(tensors), 32)])


def hit_rates(queries: np.ndarray, gallery: np.ndarray, owners: np.ndarray, truth: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries whose product is in the top k products (best image per product), exact cosine."""
    sims = queries @ gallery.T
    n_products = int(owners.max()) + 1
    per = np.full((len(queries), n_products), -2.0, np.float32)
    for j, p in enumerate(owners):
        per[:, p] = np.maximum(per[:, p], sims[:, j])
    rank = (per > per[np.arange(len(truth)), truth][:, None]).sum(1)
    return {k: float((rank < k).mean()) for k in ks}


def measure(backbone: str, weights: str, n: int, size: int, ks: Sequence[int], console: Console) -> list[Row]:
    enc = load_encoder(backbone, weights)
    trunk = enc.trunk
    fp = trunk_fingerprint(trunk)
    locs: dict[str, Localiser | None] = {"centre": None, "energy": Localiser(trunk, kind="energy", size=size)}
    head = load_head(backbone, fp)
    if head is not None:
        locs["boxhead"] = Localiser(trunk, kind="boxhead", size=size, head=head)
    products = generate_catalog(n, seed=HELD_SEED, prefix=HELD_PREFIX)
    # the shop side, as the workers crop it (bbox where the catalog gives one, else trim / centre)
    gallery_t, owners = [], []
    for p_i, p in enumerate(track(products, description="gallery", transient=True)):
        for img in p.images:
            pil = Image.open(io.BytesIO(img.data)).convert("RGB")
            crop, _, fill = crop_with_background(pil, img.bbox)
            gallery_t.append(to_tensor(crop, enc.image_size, fill=fill))
            owners.append(p_i)
    gallery = _embed(enc, gallery_t)
    queries = []
    for p in products:
        q = query_photo(p)
        assert q.bbox is not None
        queries.append((Image.open(io.BytesIO(q.data)).convert("RGB"), tuple(map(float, q.bbox))))
    truth = np.arange(len(products))
    for loc in locs.values():  # a frozen graph optimises itself on its first calls: not timed
        for img, _ in queries[:3]:
            loc is not None and loc.box(img)
    rows = []
    for name, loc in [*locs.items(), ("oracle bbox", None)]:
        tensors, ious, found, spent = [], [], 0, 0.0
        for img, known in track(queries, description=name, transient=True):
            if name == "oracle bbox":
                crop, _, fill = crop_with_background(img, known)
                box: Box = known
            else:
                t0 = time.perf_counter()
                crop, method, fill = crop_with_background(img, None, localiser=loc)
                spent += time.perf_counter() - t0
                found += method == "localised"
                box = _box_of(crop, img, loc)
            ious.append(iou(box, known))
            tensors.append(to_tensor(crop, enc.image_size, fill=fill))
        hits = hit_rates(_embed(enc, tensors), gallery, np.asarray(owners), truth, ks)
        arr = np.asarray(ious)
        ms = spent / len(queries) * 1000 if name != "oracle bbox" else None
        rows.append(Row(name, float(arr.mean()), float((arr >= 0.5).mean()), hits, ms, found / len(queries)))
    return rows


def _box_of(crop: Image.Image, img: Image.Image, loc: Localiser | None) -> Box:
    """The box a crop came from (the localiser is deterministic: ask it again; else the centre)."""
    from cardigan.imaging.crop import centre_box

    box = loc.box(img) if loc is not None else None
    return tuple(map(float, box or centre_box(img.size)))  # type: ignore[return-value]


def speed(backbone: str, weights: str, size: int, console: Console, repeats: int = 30) -> None:
    """ms per image of each localiser on one 640×480 street photo (after warm-up), median of ``repeats``."""
    enc = load_encoder(backbone, weights, graph=False)
    trunk = enc.trunk
    img, _ = street_photos(1, prefix=HELD_PREFIX, seed=HELD_SEED)[0]
    img = img.resize((640, 480))
    head = load_head(backbone, trunk_fingerprint(trunk))
    locs = {"energy": Localiser(trunk, kind="energy", size=size)}
    if head is not None:
        locs["boxhead"] = Localiser(trunk, kind="boxhead", size=size, head=head)
    table = Table(title=f"localiser cost per image ({backbone}, {size} px, {torch.get_num_threads()} torch threads)")
    for col in ("localiser", "median ms", "p90 ms"):
        table.add_column(col, justify="right")
    for name, loc in locs.items():
        for _ in range(3):
            loc.box(img)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loc.box(img)
            times.append((time.perf_counter() - t0) * 1000)
        table.add_row(name, f"{np.median(times):.1f}", f"{np.percentile(times, 90):.1f}")
    console.print(table)
    console.print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def show(rows: list[Row], ks: Sequence[int], n: int, console: Console, title: str) -> None:
    table = Table(title=title)
    for col in ("crop of the street photo", "mean IoU", "IoU≥0.5", *(f"hit@{k}" for k in ks), "box found", "ms/image"):
        table.add_column(col, justify="left" if col.startswith("crop") else "right")
    for r in rows:
        table.add_row(
            r.method,
            f"{r.mean_iou:.3f}",
            f"{r.iou50:.0%}",
            *(f"{r.hits[k]:.0%}" for k in ks),
            "—" if r.method in ("centre", "oracle bbox") else f"{r.found:.0%}",
            "—" if r.ms is None else f"{r.ms:.1f}",
        )
    console.print(table)
    console.print(f"{n} held-out products; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(json.dumps([r.__dict__ for r in rows]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devkit.localise_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train", "measure", "speed"])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="IMAGENET1K_V1", help="a torchvision weights name or a checkpoint path")
    ap.add_argument("--photos", type=int, default=None, help="train: 400 street photos; measure: 120 held-out products")
    ap.add_argument("--size", type=int, default=320, help="the localiser's input (crop.localiser_size)")
    ap.add_argument("--out", type=Path, default=None, help=f"train: default {HEADS_DIR}/<backbone>.npz")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    console = Console()
    if a.what == "speed":
        speed(a.backbone, a.weights, a.size, console)
    elif a.what == "train":
        train(a.backbone, a.weights, a.photos or 400, a.size, a.out or head_path(a.backbone), console)
    else:
        ks = (1, 5)
        n = a.photos or 120
        rows = measure(a.backbone, a.weights, n, a.size, ks, console)
        show(rows, ks, n, console, f"Finding the product in street photos ({a.backbone} {a.weights}, {a.size} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
