"""How two products' images are scored as one listing: pure, shared by the detector and the
measurement (devkit/doubles.py), so the measured curve is the detector's.

An image pair scores its cosine minus ``colour_weight`` times the distance between the two
images' colour signatures (cardigan/duplicates/signature.py): a re-photographed or edited copy
keeps its colours, a lookalike of the same shape usually does not. A pair where either image has
no signature (rows written before signatures existed) scores its cosine minus
``unsigned_penalty``, which makes its bar the vector-only threshold that held before. A product
pair's score is its best image pair's. Every image score is at most its cosine, so a range
search with the threshold as radius finds every image pair that can pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cardigan.duplicates import signature
from cardigan.duplicates.pairs import Pair


@dataclass(frozen=True)
class Scoring:
    colour_weight: float = 1.2  # cosine given up per unit of signature distance
    unsigned_penalty: float = 0.0  # subtracted when a signature is missing (≥ 0)

    @staticmethod
    def from_settings(d: Any) -> Scoring:
        """From ``DuplicateSettings``: unsigned pairs must clear ``vector_threshold`` as a cosine."""
        return Scoring(colour_weight=d.colour_weight, unsigned_penalty=max(0.0, d.vector_threshold - d.threshold))


def image_score(cosine: float, sig_a: np.ndarray | None, sig_b: np.ndarray | None, scoring: Scoring) -> float:
    """One image pair's score (≤ ``cosine``)."""
    if sig_a is None or sig_b is None:
        return cosine - scoring.unsigned_penalty
    return cosine - scoring.colour_weight * float(np.linalg.norm(sig_a - sig_b))


def best_pairs(rows: list[dict], hits: list[list[dict]], scoring: Scoring, at: float | None = None) -> dict[str, dict[str, Pair]]:
    """Per checked product (``rows``: its images, with ``crop``), its best-scoring image pair with
    every other product its images hit (``hits[i]``: the range-search hits of ``rows[i]``, each
    with ``score`` = cosine, ``product_id``, ``image_index``, ``version`` and ``crop``)."""
    best: dict[str, dict[str, Pair]] = {}
    for row, row_hits in zip(rows, hits, strict=True):
        pid = str(row["product_id"])
        mine = best.setdefault(pid, {})
        sig = signature.of_row(row)
        for h in row_hits:
            other = str(h["product_id"])
            if other == pid:
                continue
            s = image_score(float(h["score"]), sig, signature.of_row(h), scoring)
            cur = mine.get(other)
            if cur is None or s > cur.score:
                mine[other] = Pair.of(
                    pid, other, s, int(row["version"]), int(h["version"]), int(row["image_index"]), int(h["image_index"]), at
                )
    return best
