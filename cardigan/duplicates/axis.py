"""The colour axis of one crop: the direction in RGB along which its centre's pixels vary most.

Why: a photo's lighting is, to a first approximation, a gain and a grey offset on every pixel
(exposure scales, contrast and haze add or take away grey). The colour signature
(cardigan/duplicates/signature.py) drops the gain but not the offset, so a relit copy's colours
move by about as much as a lookalike's differ. The pixels' principal direction drops both: a gain
scales it, an offset moves every pixel alike and leaves it where it was. For a plain item it is the
item's own colour (its shading and seams run along it); for a print, the difference between the
print's colours. Another shade or hue turns it.

Measured on the planted sets (devkit/doubles.py): a double listing's two axes differ by a median of
about 0.05, other candidate pairs by about 0.6. The score (cardigan/duplicates/score.py)
charges the smaller of the colour-signature and the axis distances: a pair is one listing when
either colour cue agrees.

Stored in the row's ``crop`` JSON under ``"ax"``: 3 float16, base64 (8 characters); absent where
the centre is too flat for a direction to mean anything.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from cardigan.duplicates.signature import centre_pixels, stored_bytes

AX_KEY = "ax"  # the key in the row's crop JSON
AX_LEN = 3
MIN_SPREAD = 10.0  # uint8 levels of spread along the axis below which it is noise (a flat crop)
_STEP = 4  # every fourth pixel each way of the signature's centre: 28×28 of a 224 crop (~0.03 ms)


def colour_axis(pixels: np.ndarray) -> np.ndarray | None:
    """uint8 S×S×3 crop → the unit principal direction of its centre's RGB (sign: ±, so compare
    with :func:`distance`), or None where the centre's spread along it is under ``MIN_SPREAD``."""
    c = np.ascontiguousarray(centre_pixels(pixels, _STEP, "colour_axis").T, dtype=np.float64)
    if c.shape[1] < 2:
        return None
    mean = c.mean(axis=1)
    values, vectors = np.linalg.eigh(c @ c.T / c.shape[1] - np.outer(mean, mean))  # the 3×3 covariance
    if not np.isfinite(values[-1]) or values[-1] < MIN_SPREAD**2:
        return None
    return vectors[:, -1].astype(np.float32)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far two axes are apart, whichever way each points: 0 (the same) to √2 (at right angles)."""
    return float(min(np.linalg.norm(a - b), np.linalg.norm(a + b)))


def encode(axis: np.ndarray) -> str:
    """The axis as stored: base64 of little-endian float16 (8 characters)."""
    return base64.b64encode(np.asarray(axis, dtype="<f2").tobytes()).decode("ascii")


def decode(raw: Any) -> np.ndarray | None:
    """A stored axis back to a unit float32 vector, or None if absent or malformed (rows written
    before axes existed, or a flat crop: the score then uses the signature alone)."""
    buf = stored_bytes(raw, 2 * AX_LEN)
    if buf is None:
        return None
    v = np.frombuffer(buf, dtype="<f2").astype(np.float32)
    n = float(np.linalg.norm(v))
    return v / n if np.all(np.isfinite(v)) and n > 0.5 else None


def of_row(row: dict[str, Any]) -> np.ndarray | None:
    """The axis kept in a row's (or a search hit's) crop JSON, if any."""
    crop = row.get("crop")
    return decode(crop.get(AX_KEY)) if isinstance(crop, dict) else None
