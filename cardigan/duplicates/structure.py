"""A small lighting-robust structure descriptor of one crop: does the other photo show the same
picture, whatever its lighting?

Why: the colour signature (cardigan/duplicates/signature.py) tells a lookalike from a copy, but a
seller's edit that relights the photo (contrast, colour temperature) moves it as far as a
lookalike's colours are. The *layout* of light and dark survives relighting: a greyscale
thumbnail of the crop's centre, high-passed (each cell less the mean of its 3×3 neighbourhood,
so the silhouette that every product of one cut shares counts less than the print and the
folds) and standardised (zero mean, unit variance: brightness and contrast drop out),
correlates near 1 between a photo and its edited copy and lower with another product of the
same cut. The score (cardigan/duplicates/score.py) uses the correlation only to forgive some
colour distance, never to add to the cosine.

Stored like the signature, in the row's ``crop`` JSON under ``"st"``: ``GRID``×``GRID`` int8
(base64, 536 characters). The thumbnail covers ``PAD`` cells more on each side than the
``CELLS``×``CELLS`` window that is compared, so a copy cropped a little differently is compared
at its best shift.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from cardigan.duplicates.signature import stored_bytes

ST_KEY = "st"  # the key in the row's crop JSON
CELLS = 16  # the compared window: CELLS × CELLS cells
PAD = 2  # extra cells each side: shifts of up to PAD cells each way are tried
GRID = CELLS + 2 * PAD
_SPAN = 0.8  # the compared window's side, as a fraction of the crop
_SCALE = 127 / 4  # int8 steps per standard deviation (±4 σ kept)


def structure(pixels: np.ndarray) -> np.ndarray:
    """uint8 S×S×3 crop → GRID×GRID int8: the high-passed greyscale thumbnail, standardised."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"structure takes an S×S×3 crop, got shape {pixels.shape}")
    s = min(pixels.shape[:2])
    side = min(float(s), s * _SPAN / CELLS * GRID)  # GRID cells, centred (the whole crop at these sizes)
    a = (s - side) / 2
    # Pillow's box filter averages each cell (fractional edges included) in C: ~0.1 ms
    grey = Image.fromarray(np.ascontiguousarray(pixels[:s, :s])).convert("L").convert("F")
    thumb = np.asarray(grey.resize((GRID, GRID), Image.Resampling.BOX, box=(a, a, a + side, a + side)), np.float32)
    high = thumb - sliding_window_view(np.pad(thumb, 1, mode="edge"), (3, 3)).mean(axis=(2, 3))
    sd = high.std()
    z = (high - high.mean()) / sd if sd > 1e-3 else np.zeros_like(high)
    return np.clip(np.round(z * _SCALE), -127, 127).astype(np.int8)


def _standard(rows: np.ndarray) -> np.ndarray:
    """Each row less its mean, to unit length (a flat row stays 0)."""
    rows = rows - rows.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(rows, axis=-1, keepdims=True)
    return np.divide(rows, norm, out=np.zeros_like(rows), where=norm > 1e-6)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of one descriptor's central window with the other's windows, over
    shifts of up to ``PAD`` cells each way (both ways round): in [-1, 1]; 0 for a flat crop."""
    best = -1.0
    for x, y in ((a, b), (b, a)):
        inner = _standard(x[PAD : PAD + CELLS, PAD : PAD + CELLS].astype(np.float32).ravel())
        windows = _standard(sliding_window_view(y.astype(np.float32), (CELLS, CELLS)).reshape(-1, CELLS * CELLS))
        best = max(best, float((windows @ inner).max()))
    return best


def encode(st: np.ndarray) -> str:
    """The descriptor as stored: base64 of its GRID² int8."""
    return base64.b64encode(np.asarray(st, dtype=np.int8).tobytes()).decode("ascii")


def decode(raw: Any) -> np.ndarray | None:
    """A stored descriptor back to GRID×GRID int8, or None if absent or malformed (rows written
    before it existed, or by another version: the score then uses the colour signature alone)."""
    buf = stored_bytes(raw, GRID * GRID)
    return None if buf is None else np.frombuffer(buf, dtype=np.int8).reshape(GRID, GRID)


def of_row(row: dict[str, Any]) -> np.ndarray | None:
    """The descriptor kept in a row's (or a search hit's) crop JSON, if any."""
    crop = row.get("crop")
    return decode(crop.get(ST_KEY)) if isinstance(crop, dict) else None
