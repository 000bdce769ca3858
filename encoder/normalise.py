"""The ImageNet normalisation the backbones' weights were trained with, where the weights live.

``x * (1/(255 std)) - mean/std`` folded into one multiply and one subtract per value. numpy, not
torch: torch spreads even a 150k-element op over its intra-op threads, which on a busy worker
(many preprocessing threads next to a forward pass) was 8x slower than one core.
"""

from __future__ import annotations

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SCALE = np.array([1.0 / (255.0 * s) for s in IMAGENET_STD], np.float32).reshape(3, 1, 1)
_SHIFT = np.array([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)], np.float32).reshape(3, 1, 1)


def normalise(pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 HWC (one image) or NHWC (a batch) → float32 CHW / NCHW, ImageNet mean/std.

    ``x * (1/(255 std)) - mean/std`` in float32, the same two roundings whatever the batch,
    so a batch normalised here equals its images normalised one by one, bit for bit.
    ``out`` (float32, the result's shape) is reused instead of allocating a new array.
    """
    chw = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    if out is None:
        out = np.empty(chw.shape, np.float32)  # C order: what the runtimes take without a copy
    np.multiply(chw, _SCALE, out=out)  # one strided pass, GIL released
    out -= _SHIFT
    return out
