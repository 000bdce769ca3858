"""Decode untrusted image bytes into an upright RGB picture, safely and fast.

Images come from the catalog, not from us: the pixel count is checked from the header before
any pixel is decoded, only a few well-known formats are opened, and every failure becomes a
:class:`~cardigan.errors.PermanentError` with a message an operator can act on. Nothing here
touches Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``, warning
filters): worker threads share them.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cardigan.errors import CorruptImage, ImageTooLarge

WHITE = (255, 255, 255)

# What a broken or hostile file can make Pillow's parsers raise. Listed, not a blanket
# ``except Exception``: a bug in our own code must not be reported as a corrupt image.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's "not a PNG/GIF file", "broken PNG file"
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    ZeroDivisionError,
)

# Sniffed name -> the Pillow plugins allowed to open it. Restricting ``Image.open`` to the
# sniffed plugin skips Pillow's trial of ~40 decoders (faster) and keeps rarely used,
# rarely audited parsers (EPS, PSD, FITS, ...) away from untrusted bytes.
_PIL_FORMATS: dict[str, tuple[str, ...]] = {
    "jpeg": ("JPEG", "MPO"),  # phone JPEGs often carry MPO data
    "png": ("PNG",),
    "gif": ("GIF",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
    "tiff": ("TIFF",),
    "avif": ("AVIF",),
    "heic": ("HEIF",),  # only when a plugin such as pillow-heif registers it
}

# JPEG draft keeps at least this many times the model's input size (short side, or across the
# bbox). 1: decode straight to about the input size, the DCT scaling doing the first, and
# cheapest, part of the shrink (on 1200-2000 px photos 5.2 against 8.3 ms of CPU per image
# at 2). Vectors against a full decode: cosine 0.998 on average, 0.992 at worst, with
# pretrained mobilenet_v2 features (2: 0.9996 / 0.997); docs/performance.md. Changing it
# changes vectors: bump encoder.encoder._VERSION_SCHEME with it.
DRAFT_OVERSAMPLE = 1

_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded picture plus what the crop stage needs to read a bbox against it."""

    image: Image.Image  # upright RGB, possibly smaller than the file (JPEG draft)
    source_size: tuple[int, int]  # upright full-resolution (width, height): bbox coordinates
    format: str  # sniffed name: "jpeg", "png", ...


def sniff_format(data: bytes) -> str | None:
    """Name the image format from its magic bytes, or None when it is not one we know.

    Done before Pillow so that "not an image" and "an image format we do not open" get
    different, precise messages.
    """
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "heic"
        return None
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "jxl"
    return None


@cache
def _available_plugins() -> frozenset[str]:
    """Pillow plugins that can open files here (cached: the set never changes at runtime)."""
    Image.init()
    return frozenset(Image.OPEN)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    target_size: int | None = None,
    field: str = "image",
) -> Image.Image:
    """Decode ``data`` to an upright RGB image (see :func:`decode` for the details)."""
    return decode(data, max_pixels=max_pixels, target_size=target_size, field=field).image


def decode(
    data: bytes,
    *,
    max_pixels: int,
    target_size: int | None = None,
    crop_hint: Sequence[float] | None = None,
    field: str = "image",
    max_bytes: int | None = None,
) -> DecodedImage:
    """Decode ``data`` to an upright RGB image, refusing bombs and broken files.

    ``target_size`` lets a large JPEG be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT
    scaling skips most of the work: 1.5x faster at 1/2, far more at 1/8), keeping at least
    ``DRAFT_OVERSAMPLE * target_size`` pixels on the short side, or across ``crop_hint`` (the
    bbox, in upright full-resolution pixels, that will be cropped) so a small crop keeps its detail.
    ``source_size`` in the result says what the bbox coordinates refer to.

    ``max_bytes`` bounds the memory the decode and the conversion to RGB need, from the
    header's size and pixel mode (see :func:`decode_bytes`), before any pixel is decoded.

    Raises CorruptImage (empty, not an image, unsupported, truncated, corrupt) and
    ImageTooLarge (more than ``max_pixels`` or ``max_bytes``), both with ``field``.
    """
    if not data:
        raise CorruptImage("empty file", field=field)
    fmt = sniff_format(data)
    if fmt is None:
        raise CorruptImage("not an image: cannot identify image format", field=field)
    plugins = tuple(p for p in _PIL_FORMATS[fmt] if p in _available_plugins())
    if not plugins:
        raise CorruptImage(f"unsupported image format: {fmt}", field=field)
    label = fmt.upper()

    im = _open(data, plugins, max_pixels=max_pixels, label=label, field=field)
    width, height = im.size

    if target_size is not None and im.format in ("JPEG", "MPO"):
        request = _draft_request(im, target_size, crop_hint)
        if request is not None:
            im.draft("RGB", request)
    if max_bytes is not None:  # after draft: a large JPEG decodes at the reduced size
        cost = decode_bytes(im.size, im.mode, transparent="transparency" in im.info)
        if cost > max_bytes:
            w, h = im.size
            raise ImageTooLarge(
                f"{label} {w}x{h} in mode {im.mode} needs about {cost / 2**20:.0f} MiB to decode, "
                f"over the limit of {max_bytes / 2**20:.0f} MiB",
                field=field,
            )

    try:
        im.load()  # first frame only: animated GIF/WebP/PNG never decode the rest
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # per-frame checks
        raise ImageTooLarge(f"image is a decompression bomb: {exc}", field=field) from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt(exc, label, field) from exc

    before = im.size
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except _DECODE_ERRORS:
        pass  # unreadable EXIF: the pixels are fine, keep them as stored
    swapped = im.size != before  # only a 90-degree turn changes a (non-square) size
    source_size = (height, width) if swapped else (width, height)

    try:
        rgb = to_rgb(im)
    except _DECODE_ERRORS as exc:
        raise CorruptImage(f"cannot convert {label} mode {im.mode} to RGB: {exc}", field=field) from exc
    return DecodedImage(image=rgb, source_size=source_size, format=fmt)


def jpeg_header(data: bytes, *, max_pixels: int, field: str = "image", max_bytes: int | None = None) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) as stored, of a plain 8-bit RGB or greyscale JPEG, limits checked.

    For decoders that are not Pillow (nvJPEG on a GPU): the same pixel and memory limits, read
    from the header before any pixel is decoded, as :func:`decode`. None when ``data`` is not
    such a JPEG (another format, CMYK, MPO): the caller decodes it with :func:`decode`.
    Raises ImageTooLarge, and CorruptImage for a JPEG whose header does not parse.
    """
    if not data or sniff_format(data) != "jpeg":
        return None
    im = _open(data, ("JPEG",), max_pixels=max_pixels, label="JPEG", field=field)
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    if max_bytes is not None:
        cost = decode_bytes(im.size, "RGB")
        if cost > max_bytes:
            w, h = im.size
            raise ImageTooLarge(
                f"JPEG {w}x{h} needs about {cost / 2**20:.0f} MiB to decode, over the limit of {max_bytes / 2**20:.0f} MiB", field=field
            )
    try:
        orientation = int(im.getexif().get(_ORIENTATION, 1))  # JPEG: parsed, no pixels
    except (*_DECODE_ERRORS, RuntimeError):
        orientation = 1  # unreadable EXIF: the pixels as stored, as decode() does
    return (*im.size, orientation if 1 <= orientation <= 8 else 1)


# Peak bytes per pixel from decode to 8-bit RGB, by Pillow mode: the decoded image (Pillow keeps
# multi-band 8-bit modes in 4 bytes a pixel) plus what ``to_rgb`` allocates on the way. High-depth
# modes go through numpy in float64: a 40 Mpx float TIFF peaks near 1.9 GB.
_HIGH_DEPTH_COST = {"I;16": 40, "I;16L": 40, "I;16B": 40, "I;16N": 40, "I": 46, "F": 46}
_ONE_BYTE_MODES = ("1", "L", "P")


def decode_bytes(size: tuple[int, int], mode: str, *, transparent: bool = False) -> int:
    """Memory, in bytes, that decoding an image of ``size`` and ``mode`` to RGB takes at its peak."""
    pixels = size[0] * size[1]
    if mode in _HIGH_DEPTH_COST:
        per = _HIGH_DEPTH_COST[mode]
    elif mode == "RGB" and not transparent:
        per = 4
    elif mode in _ONE_BYTE_MODES:
        per = 1 + 4 + (4 if transparent else 0)  # + the RGB (and RGBA) copy
    else:
        per = 4 + 4 + 4  # RGBA, LA, CMYK …: the image, an RGBA copy, the RGB result
    return pixels * per


def _open(data: bytes, plugins: tuple[str, ...], *, max_pixels: int, label: str, field: str) -> Image.Image:
    """Read the header only, and refuse images over ``max_pixels`` before any pixel decodes."""
    try:
        im = Image.open(BytesIO(data), formats=plugins)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own, global, limit (a warning turns into an error under ``-W error``).
        raise ImageTooLarge(f"image is a decompression bomb: {exc}", field=field) from exc
    except UnidentifiedImageError as exc:
        raise CorruptImage(f"corrupt {label}: cannot read the header", field=field) from exc
    except _DECODE_ERRORS as exc:
        raise _corrupt(exc, label, field) from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"corrupt {label}: size {width}x{height}", field=field)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels",
            field=field,
        )
    return im


def _draft_request(im: Image.Image, target_size: int, crop_hint: Sequence[float] | None) -> tuple[int, int] | None:
    """The size to ask ``draft`` for, so the region we will keep has >= DRAFT_OVERSAMPLE*target pixels."""
    width, height = im.size
    wanted = DRAFT_OVERSAMPLE * target_size
    if crop_hint is None:
        return (wanted, wanted)
    try:
        x0, y0, x1, y1 = (float(v) for v in crop_hint)
        orientation = int(im.getexif().get(_ORIENTATION, 1))  # JPEG: parsed, no pixels
    except (*_DECODE_ERRORS, RuntimeError):
        return (wanted, wanted)  # a bad bbox is reported by the crop stage
    up_w, up_h = (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)
    region = min(
        min(x1, up_w) - max(x0, 0.0),
        min(y1, up_h) - max(y0, 0.0),
    )
    if not math.isfinite(region) or region <= 0:
        return None  # the crop stage will reject this bbox: do not bother scaling
    factor = wanted / region  # draft keeps size >= request, so region keeps >= wanted
    return (math.ceil(width * factor), math.ceil(height * factor))


def _corrupt(exc: BaseException, label: str, field: str) -> CorruptImage:
    """Say whether the file was cut short (a failed upload, a partial fetch) or damaged."""
    text = str(exc)
    if isinstance(exc, EOFError) or "truncated" in text.lower() or "broken data stream" in text:
        return CorruptImage(f"truncated {label}: {text or type(exc).__name__}", field=field)
    return CorruptImage(f"corrupt {label}: {text or type(exc).__name__}", field=field)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency onto white.

    White because catalog photos are shot on white: a transparent PNG cut-out then looks
    like its shop photo, and the background trim in the crop stage removes it.
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")  # P/L/RGB + tRNS, premultiplied modes, PA, LA
        out = Image.new("RGB", rgba.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, HSV, ...


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16-bit/32-bit/float pixels to 0..255 (Pillow's own convert clips at 255)."""
    arr = np.asarray(im)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        scaled = arr.astype(np.float32) * (255.0 / 65535.0)  # I;16: full-range 16-bit
    else:
        values = arr.astype(np.float64)
        finite = values[np.isfinite(values)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if lo >= 0.0 and hi <= 1.0 and arr.dtype.kind == "f":
            scaled = values * 255.0  # float in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            scaled = values  # 8-bit data stored wide
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = values * (255.0 / 65535.0)  # 16-bit data stored as I (older PNG path)
        else:
            span = hi - lo or 1.0  # arbitrary range: stretch what is there
            scaled = (values - lo) * (255.0 / span)
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
