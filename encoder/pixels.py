"""uint8 crops in, model input out: one batch buffer per thread, normalised once per batch.

Why: a crop is ``S×S×3`` uint8 (:func:`cardigan.imaging.crop.to_pixels`), a quarter of the
float32 bytes. The embed thread stacks a batch into a buffer it reuses (page-locked on CUDA,
so the host-to-device copy is asynchronous and needs no staging copy), and normalises the
whole batch in one pass: in numpy on a CPU (no GIL held), on the GPU after the uint8 copy.
The arithmetic is the same two float32 roundings as the per-image path (``x * scale - shift``),
so the vectors are the same, bit for bit on a CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from encoder.normalise import _SCALE, _SHIFT, normalise

Pixels = Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor


class PixelStager:
    """Per-thread reusable batch buffers for one image size (and one device).

    ``pin``: page-locked host memory (CUDA only). One buffer per calling thread: a caller may
    reuse it as soon as the device has the batch, which :meth:`Encoder.embed` guarantees by
    returning only once the result is back on the host.
    """

    def __init__(self, size: int, *, pin: bool = False) -> None:
        self.size = size
        self.pin = pin
        self._local = threading.local()

    def _buffer(self, name: str, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf: torch.Tensor | None = getattr(self._local, name, None)
        if buf is None or buf.shape[0] < n:
            cap = max(n, 2 * buf.shape[0] if buf is not None else n)  # grow geometrically, keep it
            buf = torch.empty((cap, *shape), dtype=dtype, pin_memory=self.pin)
            setattr(self._local, name, buf)
        return buf[:n]

    def stack(self, pixels: Pixels) -> torch.Tensor:
        """N×S×S×3 uint8 on the host (a view of this thread's buffer), from host crops."""
        if isinstance(pixels, torch.Tensor | np.ndarray) and pixels.ndim == 4:
            items: Sequence[np.ndarray | torch.Tensor] = list(pixels)
        else:
            items = pixels  # type: ignore[assignment]
        s = self.size
        out = self._buffer("u8", len(items), (s, s, 3), torch.uint8)
        dst = out.numpy()
        for i, p in enumerate(items):
            arr = p.numpy() if isinstance(p, torch.Tensor) else p
            if arr.shape != (s, s, 3) or arr.dtype != np.uint8:
                raise ValueError(f"embed_pixels() takes {s}×{s}×3 uint8 crops (encoder.image_size={s}), got {arr.dtype} {arr.shape}")
            dst[i] = arr
        return out

    def normalised(self, batch_u8: torch.Tensor) -> torch.Tensor:
        """N×S×S×3 uint8 host batch → N×3×S×S float32, C order, in this thread's float buffer."""
        n, s = batch_u8.shape[0], self.size
        out = self._buffer("f32", n, (3, s, s), torch.float32)
        normalise(batch_u8.numpy(), out=out.numpy())
        return out


_DEVICE_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise_on_device(batch_u8: torch.Tensor) -> torch.Tensor:
    """N×S×S×3 uint8 (on any device) → N×3×S×S float32, channels_last, normalised there.

    NHWC memory seen as NCHW is exactly ``channels_last``, the layout cuDNN's tensor-core
    kernels want: no transpose is ever copied. Same formula as :func:`crop.normalise`.
    """
    dev = batch_u8.device
    consts = _DEVICE_CONSTANTS.get(dev)
    if consts is None:
        consts = (torch.from_numpy(_SCALE).to(dev).view(1, 3, 1, 1), torch.from_numpy(_SHIFT).to(dev).view(1, 3, 1, 1))
        _DEVICE_CONSTANTS[dev] = consts
    scale, shift = consts
    x = batch_u8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.channels_last)
    return x.mul_(scale).sub_(shift)
