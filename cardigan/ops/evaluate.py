"""Retrieval quality of an encoder on labelled query → product sets: recall@k and mAP.

One honest number for any encoder (random, pretrained, a trained checkpoint): every photo goes
through the workers' own preprocessing (:func:`cardigan.imaging.crop.preprocess`: decode, crop,
resize) and the encoder's own :meth:`Encoder.embed`, so the number is the product's number.
Ranking is exact cosine over the whole gallery (no Milvus, deterministic), and products are
ranked by their best photo, like :func:`cardigan.ops.query.best_per_product` ranks the index.

Metrics, per query (then averaged):

- ``recall@k``: 1 if the query's product is among the ``k`` best products, else 0. Ties count
  against the query (a product scoring exactly as high as the right one ranks before it).
- ``AP``: average precision over the ranked gallery *photos*, a photo being relevant when it
  shows the query's product (every shop photo of it counts); ties rank irrelevant photos first.

A gallery photo may be *junk* for a query (ignored, as in the revisited Oxford/Paris
benchmarks): a distractor cut from the query's own source photo is neither right nor wrong.
Sets are built elsewhere (``devkit.evalsets``); this module only needs their items.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cardigan.imaging.crop import preprocess
from encoder import Encoder

CropMode = Literal["given", "centre", "localise"]
CROP_MODES: tuple[str, ...] = ("given", "centre", "localise")
KS = (1, 5)
_EMBED_BATCH = 64


class EvalError(ValueError):
    """A set or option that cannot be scored (says which, and why)."""


@dataclass(frozen=True)
class Item:
    """One photo of a set: encoded bytes, where the product is (or None), whose it is.

    ``source`` names the photo it was cut from: gallery photos sharing a query's source but
    not its ``label`` are junk for that query (ignored). Empty: its own source.
    """

    data: bytes
    bbox: tuple[float, float, float, float] | None
    label: str
    source: str = ""


@dataclass(frozen=True)
class EvalSet:
    """Queries and the gallery they search; every query's label has a gallery photo."""

    name: str
    description: str
    queries: Sequence[Item]
    gallery: Sequence[Item]


@dataclass(frozen=True)
class Score:
    """One encoder on one set."""

    set: str
    encoder: str  # the row label (what the user asked for: "random", "IMAGENET1K_V1", a path)
    model_version: str
    queries: int
    gallery: int
    products: int  # distinct gallery labels (chance of recall@1 is 1/products)
    recall: dict[int, float]
    mean_ap: float
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON shape: ``recall@1``, ``recall@5``, ``mAP`` in [0, 1] next to the counts."""
        out: dict[str, object] = {"set": self.set, "encoder": self.encoder, "model_version": self.model_version}
        out.update({f"recall@{k}": round(v, 4) for k, v in sorted(self.recall.items())})
        out.update({"mAP": round(self.mean_ap, 4), "queries": self.queries, "gallery": self.gallery, "products": self.products})
        out["seconds"] = round(self.seconds, 2)
        return out


# --------------------------------------------------------------------------- metrics


def junk_mask(queries: Sequence[Item], gallery: Sequence[Item]) -> np.ndarray:
    """Q×G bool: gallery photos cut from the query's own source that are not its product."""
    qs = np.array([q.source or f"\0q{i}" for i, q in enumerate(queries)], dtype=object)
    gs = np.array([g.source or f"\0g{j}" for j, g in enumerate(gallery)], dtype=object)
    ql = np.array([q.label for q in queries], dtype=object)
    gl = np.array([g.label for g in gallery], dtype=object)
    return (qs[:, None] == gs[None, :]) & (ql[:, None] != gl[None, :])


def retrieval_metrics(
    sims: np.ndarray,
    query_labels: Sequence[str],
    gallery_labels: Sequence[str],
    junk: np.ndarray | None = None,
    ks: Sequence[int] = KS,
) -> tuple[dict[int, float], float]:
    """(recall@k for each k, mAP) of a Q×G similarity matrix; see the module docstring."""
    sims = np.asarray(sims, dtype=np.float64)
    n_q, n_g = sims.shape
    if n_q != len(query_labels) or n_g != len(gallery_labels):
        raise EvalError(f"similarities are {n_q}×{n_g} but there are {len(query_labels)} queries and {len(gallery_labels)} gallery photos")
    if n_q == 0:
        raise EvalError("a set needs at least one query")
    labels = sorted(set(gallery_labels))
    col = {lab: i for i, lab in enumerate(labels)}
    g_idx = np.array([col[lab] for lab in gallery_labels])
    ignored = np.zeros_like(sims, dtype=bool) if junk is None else np.asarray(junk, dtype=bool)
    hits = {k: 0 for k in ks}
    aps = []
    for i, truth in enumerate(query_labels):
        if truth not in col:
            raise EvalError(f"query {i} is labelled {truth!r}, which has no photo in the gallery")
        keep = ~ignored[i]
        s, owners = sims[i, keep], g_idx[keep]
        t = col[truth]
        best = np.full(len(labels), -np.inf)
        np.maximum.at(best, owners, s)
        rank = int((np.delete(best, t) >= best[t]).sum())  # products ahead of the right one; ties count
        for k in ks:
            hits[k] += rank < k
        relevant = owners == t
        order = np.lexsort((relevant, -s))  # by score, descending; on a tie, irrelevant first
        rel = relevant[order]
        positions = np.flatnonzero(rel) + 1
        aps.append(float(np.mean(np.arange(1, len(positions) + 1) / positions)))
    return {k: hits[k] / n_q for k in ks}, float(np.mean(aps))


# --------------------------------------------------------------------------- embedding


def _query_box(mode: CropMode) -> Callable[[Item], tuple[float, float, float, float] | None]:
    """How a query is cropped: the box the set gives, or none (the worker's own fallback)."""
    if mode == "given":
        return lambda item: item.bbox
    if mode == "centre":
        return lambda item: None  # no box: background trim where it applies, else the centre square
    if mode == "localise":
        return lambda item: None  # no box: the localiser finds the product (see score_set)
    raise EvalError(f"--crop must be one of {', '.join(CROP_MODES)}, not {mode!r}")


def embed_items(
    encoder: Encoder, items: Sequence[Item], *, max_pixels: int, box: Callable[[Item], object] | None = None, localiser: Any = None
) -> torch.Tensor:
    """N×D unit rows: each photo through the workers' preprocessing and the encoder's embed."""
    box = box or (lambda item: item.bbox)
    size = encoder.image_size
    rows: list[np.ndarray] = []
    for start in range(0, len(items), _EMBED_BATCH):
        chunk = items[start : start + _EMBED_BATCH]
        tensors = [
            preprocess(it.data, box(it), size=size, max_pixels=max_pixels, field_prefix=f"{it.label}", localiser=localiser)[0]  # type: ignore[arg-type]
            for it in chunk
        ]
        rows.append(encoder.embed(torch.stack(tensors)))
    return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, encoder.dim)


def score_set(
    encoder: Encoder,
    ev: EvalSet,
    *,
    label: str,
    max_pixels: int,
    crop: CropMode = "given",
    ks: Sequence[int] = KS,
) -> Score:
    """recall@k and mAP of ``encoder`` on ``ev`` (loads the encoder if it is not loaded)."""
    t = time.perf_counter()
    box = _query_box(crop)
    encoder.load()
    localiser = None
    if crop == "localise":  # the workers' localiser (crop.localiser=boxhead), as indexing and queries run it
        from cardigan.imaging.localise import localiser_for
        from config.settings import CropSettings

        localiser = localiser_for(encoder, CropSettings())
        if localiser is None:
            raise EvalError(f"--crop localise: no localiser for {label} (random weights, or no box head for its backbone)")
    q = embed_items(encoder, ev.queries, max_pixels=max_pixels, box=box, localiser=localiser)
    g = embed_items(encoder, ev.gallery, max_pixels=max_pixels)
    sims = (q @ g.T).numpy()  # cosine: the rows are unit vectors
    recall, mean_ap = retrieval_metrics(
        sims, [i.label for i in ev.queries], [i.label for i in ev.gallery], junk_mask(ev.queries, ev.gallery), ks
    )
    return Score(
        set=ev.name,
        encoder=label,
        model_version=encoder.model_version,
        queries=len(ev.queries),
        gallery=len(ev.gallery),
        products=len({i.label for i in ev.gallery}),
        recall=recall,
        mean_ap=mean_ap,
        seconds=time.perf_counter() - t,
    )
