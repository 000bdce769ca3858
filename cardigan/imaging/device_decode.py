"""Decode, crop and resize a batch of JPEGs on the model's device; anything else on the CPU.

Why: on a GPU host the CPU, not the GPU, sets the pace: Pillow decodes a few hundred photos
a second per core, an H200 embeds thousands. ``torchvision.io.decode_jpeg`` on a list of
JPEGs with ``device="cuda"`` decodes them with nvJPEG in one call. The same call runs on the
CPU (libjpeg-turbo), which is how this module is tested on machines without a GPU.

Safety is unchanged: the pixel and memory limits are read from the header on the CPU before
any pixel is decoded (:func:`~cardigan.imaging.decode.jpeg_header`). One bad JPEG fails the
whole batched call, so a failed batch is decoded again one by one, and an image that nvJPEG
cannot decode (CMYK, a truncated file, PNG, WebP, ...) goes through the CPU path
(:func:`~cardigan.imaging.crop.preprocess_pixels`), which also writes the error an operator
reads. The crop follows the CPU rules: the bbox, else the background trim (decided on a
small copy brought back to the host, by the same code), else the centre square.

The pixels are close to the CPU path's, not identical: a full-size decode instead of JPEG
draft scaling, torch's antialiased bilinear instead of Pillow's (measured in
tests/test_device_decode.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.nn import functional as F

from cardigan.errors import PermanentError
from cardigan.imaging.crop import RGB, TRIM_SIDE, WHITE, Box, bbox_to_box, centre_box, preprocess_pixels, trim_reduced
from cardigan.imaging.decode import jpeg_header


@dataclass(frozen=True, slots=True)
class ImageJob:
    """One image of an event, fetched but not decoded."""

    data: bytes
    bbox: Sequence[float] | None
    field: str  # "images[2]": errors name it


def device_crops(
    jobs: Sequence[ImageJob],
    *,
    size: int,
    max_pixels: int,
    device: torch.device | str,
    max_bytes: int | None = None,
) -> list[torch.Tensor | PermanentError]:
    """One ``size``×``size``×3 uint8 crop on ``device`` per job, or the PermanentError for that job alone."""
    device = torch.device(device)
    out: list[torch.Tensor | PermanentError | None] = [None] * len(jobs)
    on_device: list[int] = []
    orientation: dict[int, int] = {}
    for i, job in enumerate(jobs):
        try:
            header = jpeg_header(job.data, max_pixels=max_pixels, field=job.field, max_bytes=max_bytes)
        except PermanentError as e:
            out[i] = e
            continue
        if header is not None:
            on_device.append(i)
            orientation[i] = header[2]
    decoded = _decode_jpegs([jobs[i].data for i in on_device], device)
    for i, img in zip(on_device, decoded, strict=True):
        if img is None:
            continue  # the CPU path below decodes it, or says why it cannot
        try:
            upright = _ORIENT[orientation[i]](img)
            out[i] = _crop_resize(upright, jobs[i].bbox, size, field=f"{jobs[i].field}.bbox")
        except PermanentError as e:
            out[i] = e
    for i, res in enumerate(out):
        if res is None:
            job = jobs[i]
            try:
                pixels, _ = preprocess_pixels(
                    job.data, job.bbox, size=size, max_pixels=max_pixels, field_prefix=job.field, max_bytes=max_bytes
                )
            except PermanentError as e:
                out[i] = e
            else:
                out[i] = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).to(device)
    return out  # type: ignore[return-value]


# EXIF orientation -> what makes a CHW image upright (Pillow's exif_transpose, checked in the
# tests). decode_jpeg applies EXIF orientation on the CPU only, so it is done here, the same
# way on every device.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(2),  # mirrored left-right
    3: lambda x: x.flip(1, 2),  # 180°
    4: lambda x: x.flip(1),  # mirrored top-bottom
    5: lambda x: x.transpose(1, 2),  # transposed
    6: lambda x: torch.rot90(x, -1, (1, 2)),  # 90° clockwise
    7: lambda x: x.transpose(1, 2).flip(1, 2),  # transversed
    8: lambda x: torch.rot90(x, 1, (1, 2)),  # 90° counter-clockwise
}


def _decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """RGB CHW uint8 on ``device`` per JPEG, as stored (not yet upright); None where this decoder failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29: "decoding is deprecated in favour of TorchCodec"
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False))
        except RuntimeError:
            pass  # one bad file fails the batch: find it, one by one
        results: list[torch.Tensor | None] = []
        for e in encoded:
            try:
                results.append(decode_jpeg(e, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False))
            except RuntimeError:
                results.append(None)
        return results


def _crop_resize(img: torch.Tensor, bbox: Sequence[float] | None, size: int, *, field: str) -> torch.Tensor:
    """CHW uint8 (upright, full size) → ``size``×``size``×3 uint8: crop, fit, pad, as ``crop.to_pixels``."""
    _, height, width = img.shape
    fill: RGB = WHITE
    if bbox is not None:
        box = bbox_to_box(bbox, (width, height), (width, height), field=field)
    else:
        found = _trim(img)
        box, fill = found if found is not None else (centre_box((width, height)), WHITE)
    left, top, right, bottom = box
    crop = img[:, top:bottom, left:right]
    ch, cw = crop.shape[1:]
    scale = size / max(cw, ch)
    new_w, new_h = min(size, max(1, round(cw * scale))), min(size, max(1, round(ch * scale)))
    if (new_w, new_h) != (cw, ch):
        x = F.interpolate(crop[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        crop = x[0].round_().clamp_(0, 255).to(torch.uint8)
    out = torch.tensor(fill, dtype=torch.uint8, device=img.device).expand(size, size, 3).clone()
    x0, y0 = (size - new_w) // 2, (size - new_h) // 2
    out[y0 : y0 + new_h, x0 : x0 + new_w] = crop.permute(1, 2, 0)
    return out


def _trim(img: torch.Tensor) -> tuple[Box, RGB] | None:
    """``crop.trim_box`` with the reduction on the device: only the ~TRIM_SIDE copy crosses back."""
    _, height, width = img.shape
    factor = max(1, max(width, height) // TRIM_SIDE)
    small = img
    if factor > 1:
        # box average, rounded, like Pillow's reduce (its ragged last row/column is left out here)
        small = F.avg_pool2d(img[None].float(), factor)[0].round_().to(torch.uint8)
    host = small.permute(1, 2, 0).contiguous().cpu().numpy()
    return trim_reduced(Image.fromarray(host), factor, (width, height))
