"""A small lighting-robust structure descriptor of one crop: does the other photo show the same
picture, whatever its lighting?

Why: the colour signature (cardigan/duplicates/signature.py) tells a lookalike from a copy, but a
seller's edit that relights the photo (contrast, colour temperature) moves it as far as a
lookalike's colours are. The *layout* of light and dark in the crop survives relighting: a
greyscale thumbnail of the crop's centre, zero mean and unit variance (so brightness and
contrast drop out), correlates near 1 between a photo and its edited copy and much lower with
another product, even one of the same cut. The score (cardigan/duplicates/score.py) uses the
correlation to forgive some colour distance, never to add to the cosine.

Stored like the signature, in the row's ``crop`` JSON under ``"st"``: ``GRID``×``GRID`` int8
(base64). The thumbnail covers ``PAD`` cells more on each side than the ``CELLS``×``CELLS``
window that is compared, so a copy cropped a little differently is compared at its best shift.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

ST_KEY = "st"  # the key in the row's crop JSON
CELLS = 8  # the compared window: CELLS × CELLS cells
PAD = 1  # extra cells each side: shifts of up to PAD cells are tried
GRID = CELLS + 2 * PAD
_SPAN = 0.6  # the compared window's side, as a fraction of the crop (the item, little backdrop)
_SCALE = 127 / 4  # int8 steps per standard deviation (±4 σ kept)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def structure(pixels: np.ndarray) -> np.ndarray:
    """uint8 S×S×3 crop → GRID×GRID int8: the greyscale thumbnail, standardised."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"structure takes an S×S×3 crop, got shape {pixels.shape}")
    s = min(pixels.shape[:2])
    cell = s * _SPAN / CELLS
    edges = np.clip(np.round((s - cell * GRID) / 2 + cell * np.arange(GRID + 1)).astype(int), 0, s)
    grey = pixels[:s, :s].astype(np.float32) @ _LUMA
    ii = np.zeros((s + 1, s + 1), np.float64)
    ii[1:, 1:] = grey.cumsum(0).cumsum(1)
    a, b = edges[:-1], edges[1:]
    sums = ii[np.ix_(b, b)] - ii[np.ix_(a, b)] - ii[np.ix_(b, a)] + ii[np.ix_(a, a)]
    thumb = sums / np.maximum(np.outer(b - a, b - a), 1)
    sd = thumb.std()
    z = (thumb - thumb.mean()) / sd if sd > 1e-3 else np.zeros_like(thumb)
    return np.clip(np.round(z * _SCALE), -127, 127).astype(np.int8)


def _standard(window: np.ndarray) -> np.ndarray | None:
    w = window.astype(np.float32).ravel()
    w = w - w.mean()
    norm = float(np.linalg.norm(w))
    return w / norm if norm > 1e-6 else None


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of one descriptor's central window with the other's, over shifts of
    up to ``PAD`` cells either way (both ways round): in [-1, 1]; 0 for a flat crop."""
    best = -1.0
    for x, y in ((a, b), (b, a)):
        inner = _standard(x[PAD : PAD + CELLS, PAD : PAD + CELLS])
        if inner is None:
            return 0.0
        for dy in range(2 * PAD + 1):
            for dx in range(2 * PAD + 1):
                w = _standard(y[dy : dy + CELLS, dx : dx + CELLS])
                if w is not None:
                    best = max(best, float(inner @ w))
    return best


def encode(st: np.ndarray) -> str:
    """The descriptor as stored: base64 of its GRID² int8."""
    return base64.b64encode(np.asarray(st, dtype=np.int8).tobytes()).decode("ascii")


def decode(raw: Any) -> np.ndarray | None:
    """A stored descriptor back to GRID×GRID int8, or None if absent or malformed (rows written
    before it existed, or by another version: the score then uses the colour signature alone)."""
    if not isinstance(raw, str):
        return None
    try:
        buf = base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    if len(buf) != GRID * GRID:
        return None
    return np.frombuffer(buf, dtype=np.int8).reshape(GRID, GRID)


def of_row(row: dict[str, Any]) -> np.ndarray | None:
    """The descriptor kept in a row's (or a search hit's) crop JSON, if any."""
    crop = row.get("crop")
    return decode(crop.get(ST_KEY)) if isinstance(crop, dict) else None
