"""A small colour signature of one crop, stored with the row, to tell a double listing from a
product that only looks alike.

Why: the embedding is mostly about shape and texture, so two products of one category in similar
colours (or one design in another colour) score as high as a re-photographed copy. The
signature is the chromaticity (r, g, b divided by their sum, so brightness drops out) of the
crop's central half (every other pixel), its mean and spread per channel: 6 numbers. It is computed from the uint8
crop the fetch threads already produce (no second decode), the same way at index time
(workers/pipeline.py) and in the measurement (devkit/doubles.py), and stored in the row's
``crop`` JSON under ``"sig"`` (base64 of 6 float16: 16 characters), so no schema change.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

SIG_KEY = "sig"  # the key in the row's crop JSON
SIG_LEN = 6
_CENTRE = 0.5  # side of the central square, as a fraction of the crop: mostly the item itself
_STEP = 2  # every other pixel each way: 56×56 of a 224 crop, ~0.15 ms (all of them: ~1.5 ms)
_DARK = 12.75  # added to r + g + b (uint8 units): near-black pixels do not swing the chromaticity


def centre_pixels(pixels: np.ndarray, step: int, who: str) -> np.ndarray:
    """The central square of a uint8 S×S×3 crop (mostly the item), every ``step``-th pixel each
    way, as N×3 uint8: what the colour cues (this signature, cardigan/duplicates/axis.py) read."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"{who} takes an S×S×3 crop, got shape {pixels.shape}")
    h, w = pixels.shape[:2]
    a, b = int(h * (1 - _CENTRE) / 2), int(w * (1 - _CENTRE) / 2)
    return pixels[a : h - a : step, b : w - b : step].reshape(-1, 3)


def colour_signature(pixels: np.ndarray) -> np.ndarray:
    """uint8 S×S×3 crop → 6 float32: mean and std of each chromaticity channel in the centre."""
    c = centre_pixels(pixels, _STEP, "colour_signature").astype(np.float32)
    chroma = c / (c.sum(axis=1, keepdims=True) + _DARK)
    return np.concatenate([chroma.mean(axis=0), chroma.std(axis=0)]).astype(np.float32)


def encode(sig: np.ndarray) -> str:
    """The signature as stored: base64 of little-endian float16 (16 characters)."""
    return base64.b64encode(np.asarray(sig, dtype="<f2").tobytes()).decode("ascii")


def stored_bytes(raw: Any, n: int) -> bytes | None:
    """A value kept in a row's crop JSON (base64 of exactly ``n`` bytes) back to bytes, or None
    if absent or malformed: what a search hit carries is read, never trusted."""
    if not isinstance(raw, str):
        return None
    try:
        buf = base64.b64decode(raw.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        return None
    return buf if len(buf) == n else None


def decode(raw: Any) -> np.ndarray | None:
    """A stored signature back to float32, or None if absent or malformed (rows written before
    signatures existed, or by another version: the detector then scores by the vector alone)."""
    buf = stored_bytes(raw, 2 * SIG_LEN)
    if buf is None:
        return None
    sig = np.frombuffer(buf, dtype="<f2").astype(np.float32)
    return sig if np.all(np.isfinite(sig)) else None


def of_row(row: dict[str, Any]) -> np.ndarray | None:
    """The signature kept in a row's (or a search hit's) crop JSON, if any."""
    crop = row.get("crop")
    return decode(crop.get(SIG_KEY)) if isinstance(crop, dict) else None
