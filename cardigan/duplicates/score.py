"""How two products' images are scored as one listing: pure, shared by the detector and the
measurement (devkit/doubles.py), so the measured curve is the detector's.

An image pair scores its cosine minus ``colour_weight`` times the distance between the two
images' colour signatures (cardigan/duplicates/signature.py): a re-photographed or edited copy
keeps its colours, a lookalike of the same shape usually does not. A pair where either image has
no signature (rows written before signatures existed) scores its cosine minus
``unsigned_penalty``, which makes its bar the vector-only threshold that held before.

A seller's edit that relights a photo moves its colour signature as far as a lookalike's; the
two images' structure descriptors (cardigan/duplicates/structure.py: a standardised greyscale
thumbnail, blind to brightness and contrast) then still correlate. So the first
``structure_slack`` of colour distance is forgiven in proportion to how far the correlation
rises above ``structure_floor`` (all of it at correlation 1): only the distance beyond that is
charged. A distance well beyond the slack (the same design in another colour) is still charged,
and a pair without descriptors on both sides scores as before.

The signature is blind to a photo's exposure but not to its contrast (grey added or taken
away), which moves it as far as a lookalike's. The colour axis (cardigan/duplicates/axis.py) is
blind to both, so where both images have one, the charge is the smaller of the signature's
(after the structure) and ``axis_weight`` times the axes' distance: either colour cue agreeing
is enough. A product pair's score is its best image pair's. Every image score is at most its
cosine, so a range search with the threshold as radius finds every image pair that can pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cardigan.duplicates import axis, signature, structure
from cardigan.duplicates.pairs import Pair


@dataclass(frozen=True)
class Scoring:
    colour_weight: float = 1.2  # cosine given up per unit of signature distance
    unsigned_penalty: float = 0.0  # subtracted when a signature is missing (≥ 0)
    structure_slack: float = 0.0  # colour distance forgiven at structure correlation 1 (0: none)
    structure_floor: float = 0.9  # correlation at or below which nothing is forgiven (< 1)
    axis_weight: float = 0.0  # cosine given up per unit of colour-axis distance (0: axes unused)

    @staticmethod
    def from_settings(d: Any) -> Scoring:
        """From ``DuplicateSettings``: unsigned pairs must clear ``vector_threshold`` as a cosine."""
        return Scoring(
            colour_weight=d.colour_weight,
            unsigned_penalty=max(0.0, d.vector_threshold - d.threshold),
            structure_slack=d.structure_slack,
            structure_floor=d.structure_floor,
            axis_weight=d.axis_weight,
        )


def forgiven(correlation: float, scoring: Scoring) -> float:
    """The colour distance forgiven for this structure correlation: 0 up to the floor, rising
    linearly to ``structure_slack`` at correlation 1."""
    if scoring.structure_slack <= 0 or correlation <= scoring.structure_floor:
        return 0.0
    return scoring.structure_slack * min(1.0, (correlation - scoring.structure_floor) / (1.0 - scoring.structure_floor))


def image_score(
    cosine: float,
    sig_a: np.ndarray | None,
    sig_b: np.ndarray | None,
    scoring: Scoring,
    st_a: np.ndarray | None = None,
    st_b: np.ndarray | None = None,
    above: float | None = None,
    ax_a: np.ndarray | None = None,
    ax_b: np.ndarray | None = None,
) -> float:
    """One image pair's score (≤ ``cosine``); ``st_*``, ``ax_*``: the structure descriptors and
    colour axes, if stored. ``above``: only scores above it matter (the detector's threshold), so
    the structure correlation (~70 µs) is skipped where even the whole slack could not lift the
    pair over it (the score returned is then also not above it), and wherever the axes' charge is
    already below what the whole slack would leave (the score is then exact)."""
    if sig_a is None or sig_b is None:
        return cosine - scoring.unsigned_penalty
    distance = float(np.linalg.norm(sig_a - sig_b))
    axis_charge = (
        scoring.axis_weight * axis.distance(ax_a, ax_b) if scoring.axis_weight > 0 and ax_a is not None and ax_b is not None else None
    )
    least = scoring.colour_weight * max(0.0, distance - scoring.structure_slack)  # the charge after all the slack
    if st_a is not None and st_b is not None and scoring.structure_slack > 0 and distance > 0:
        # the correlation can only matter if it could beat the axes' charge and clear ``above``
        if (axis_charge is None or axis_charge > least) and (above is None or cosine - least > above):
            distance = max(0.0, distance - forgiven(structure.correlation(st_a, st_b), scoring))
    charge = scoring.colour_weight * distance
    return cosine - (charge if axis_charge is None else min(charge, axis_charge))


def best_pairs(
    rows: list[dict], hits: list[list[dict]], scoring: Scoring, at: float | None = None, min_score: float | None = None
) -> dict[str, dict[str, Pair]]:
    """Per checked product (``rows``: its images, with ``crop``), its best-scoring image pair with
    every other product its images hit (``hits[i]``: the range-search hits of ``rows[i]``, each
    with ``score`` = cosine, ``product_id``, ``image_index``, ``version`` and ``crop``).
    ``min_score``: only pairs scoring above it (the detector's threshold; None: every hit, as the
    measurement needs to sweep thresholds)."""
    best: dict[str, dict[str, Pair]] = {}
    for row, row_hits in zip(rows, hits, strict=True):
        pid = str(row["product_id"])
        mine = best.setdefault(pid, {})
        sig, st, ax = signature.of_row(row), structure.of_row(row), axis.of_row(row)
        for h in row_hits:
            other = str(h["product_id"])
            if other == pid:
                continue
            s = image_score(
                float(h["score"]), sig, signature.of_row(h), scoring, st, structure.of_row(h), above=min_score, ax_a=ax, ax_b=axis.of_row(h)
            )
            if min_score is not None and s <= min_score:
                continue
            cur = mine.get(other)
            if cur is None or s > cur.score:
                mine[other] = Pair.of(
                    pid, other, s, int(row["version"]), int(h["version"]), int(row["image_index"]), int(h["image_index"]), at
                )
    return best
