"""Crop a decoded product photo to the product, and turn the crop into a model input.

Three ways to find the product, in order of trust:

- ``bbox``: the catalog says where it is (pixels of the upright, full-size image);
- ``trim``: no bbox, but the photo is shot on a plain background (the catalog norm), so the
  product is whatever differs from the colour of the border (inside a flat frame, if the photo
  has one: a reseller's copy then crops like the original; thin strokes apart from the item,
  such as a watermark's text, are left out);
- ``localised``: a busy photo, and the process has a localiser (:mod:`cardigan.imaging.localise`,
  the encoder's trunk says where the product is);
- ``centre``: anything else (a lifestyle photo): the central square, as ImageNet models expect.

:func:`to_tensor` keeps the aspect ratio and pads to a square with the background, rather than
stretching or cutting the product: a long dress and a short top stay recognisable shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageChops

from cardigan.errors import InvalidCrop
from cardigan.imaging.decode import WHITE, decode
from encoder.normalise import normalise

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]


class FindsProduct(Protocol):
    """A localiser (cardigan.imaging.localise.Localiser): a box in ``img``'s pixels, or None."""

    size: int  # it looks at the photo at this size: decode no smaller

    def box(self, img: Image.Image) -> Box | None: ...


# Background trim, tuned on catalog-style photos (plain backdrop, JPEG noise of a few levels).
TRIM_SIDE = 200  # the search runs on a copy about this big: a few ms whatever the input
BORDER_TOLERANCE = 20  # a border pixel within this (max over channels) counts as background
BORDER_UNIFORM = 0.75  # share of border pixels that must be background (a product may touch it)
FOREGROUND_THRESHOLD = 28  # a pixel further than this from the background is product
OPENING = 5  # odd: strokes thinner than this (pixels of the search copy) are not product
OPENED_KEEPS = 0.75  # ... unless what the opening leaves out is over a quarter of the foreground
MIN_LINE_PIXELS = 2  # product pixels a row/column of the search copy needs to count
MIN_OBJECT_SHARE = 0.005  # smaller boxes are specks or dust, not a product
MAX_OBJECT_SHARE = 0.97  # a box this close to the whole image gains nothing over centre
MARGIN = 0.03  # of the box's longer side, so edges of the product are not cut
# A framed photo (a border added around the original shot): trim again inside the frame.
MAX_NESTED = 2  # frames within frames, at most
FRAME_TOLERANCE = 12  # a frame is a flat fill: its pixels are this close (max over channels)
FRAME_UNIFORM = 0.95  # share of the border pixels that must be frame
FRAME_LINE_OFF = 0.05  # a line (its middle half) with this share off the frame's colour ends the frame
FRAME_EDGE = 0.9  # ... and the framed photo's edge line differs from the frame across this share
FRAME_MAX_SIDE = 0.15  # every side of the frame at most this share of the shorter side
FRAME_INSET = 2  # lines of the framed photo left out at each side (frame blended in)
NESTED_MIN_SHARE = 0.1  # what the inner trim finds must be this share of the framed photo
_FOREGROUND_LUT = [255 if v > FOREGROUND_THRESHOLD else 0 for v in range(256)]
_FRAME_LUT = [255 if v > FRAME_TOLERANCE else 0 for v in range(256)]


def crop_image(
    img: Image.Image,
    bbox: Sequence[float] | None,
    *,
    field: str = "bbox",
    source_size: tuple[int, int] | None = None,
) -> tuple[Image.Image, str]:
    """Crop ``img`` to the product; return the crop and the method ("bbox", "trim", "centre").

    ``source_size`` is the upright full-resolution size the bbox refers to, when ``img`` was
    decoded smaller (JPEG draft); by default the bbox is in ``img``'s own pixels.
    Raises InvalidCrop, naming ``field``, for a bbox that cannot describe a region.
    """
    crop, method, _ = crop_with_background(img, bbox, field=field, source_size=source_size)
    return crop, method


def crop_with_background(
    img: Image.Image,
    bbox: Sequence[float] | None,
    *,
    field: str = "bbox",
    source_size: tuple[int, int] | None = None,
    localiser: FindsProduct | None = None,
) -> tuple[Image.Image, str, RGB]:
    """As :func:`crop_image`, plus the colour to pad the crop with (the trimmed background).

    Order: bbox > plain-background trim > ``localiser`` (only here: it runs a forward pass) > centre.
    """
    if bbox is not None:
        box = bbox_to_box(bbox, img.size, source_size or img.size, field=field)
        return _crop(img, box), "bbox", WHITE
    found = trim_box(img)
    if found is not None:
        box, background = found
        return _crop(img, box), "trim", background
    if localiser is not None and (found_box := localiser.box(img)) is not None:
        return _crop(img, found_box), "localised", WHITE
    return _crop(img, centre_box(img.size)), "centre", WHITE


def bbox_to_box(
    bbox: Sequence[float],
    size: tuple[int, int],
    source_size: tuple[int, int],
    *,
    field: str = "bbox",
) -> Box:
    """Validate a bbox given on ``source_size`` and map it to integer pixels of ``size``.

    A bbox partly outside the image is clamped (catalog tools round, and boxes drawn to the
    edge spill over); one that is inverted, empty or entirely outside is an error the
    producer must fix, so it is reported with the image size they can check against.
    """
    src_w, src_h = source_size
    where = f"on the {src_w}x{src_h} image"
    try:
        x0, y0, x1, y1 = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise InvalidCrop(f"{field} must be 4 numbers [x0, y0, x1, y1] in pixels {where}, got {bbox!r}", field=field) from exc
    shown = f"[{_num(x0)}, {_num(y0)}, {_num(x1)}, {_num(y1)}]"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InvalidCrop(f"{field} {shown} must be finite numbers {where}", field=field)
    if x1 < x0 or y1 < y0:
        axis = "x1 < x0" if x1 < x0 else "y1 < y0"
        raise InvalidCrop(f"{field} {shown} is inverted ({axis}) {where}", field=field)
    if x1 == x0 or y1 == y0:
        raise InvalidCrop(f"{field} {shown} has zero area {where}", field=field)
    if x0 >= src_w or y0 >= src_h or x1 <= 0 or y1 <= 0:
        raise InvalidCrop(f"{field} {shown} lies entirely outside the image {where}", field=field)
    width, height = size
    sx, sy = width / src_w, height / src_h
    left = min(max(math.floor(max(x0, 0.0) * sx), 0), width - 1)
    top = min(max(math.floor(max(y0, 0.0) * sy), 0), height - 1)
    right = max(min(math.ceil(min(x1, src_w) * sx), width), left + 1)
    bottom = max(min(math.ceil(min(y1, src_h) * sy), height), top + 1)
    return (left, top, right, bottom)


def trim_box(img: Image.Image) -> tuple[Box, RGB] | None:
    """Find the product on a plain background: its box (with a margin) and the background.

    None when the border is not near-uniform (not a studio shot) or when what differs from
    it is a speck or the whole picture. Searches a ~TRIM_SIDE copy and maps back.
    """
    width, height = img.size
    factor = max(1, max(width, height) // TRIM_SIDE)
    # reduce() box-averages: cheap, and it smooths JPEG noise before thresholding.
    small = img.reduce(factor) if factor > 1 else img
    return trim_reduced(small, factor, img.size)


def trim_reduced(small: Image.Image, factor: int, size: tuple[int, int]) -> tuple[Box, RGB] | None:
    """:func:`trim_box` on its search copy ``small`` (``size`` reduced by ``factor``): the box in ``size``.

    Split out so the GPU path (:mod:`cardigan.imaging.device_decode`) can reduce on the
    device, bring back only the small copy, and decide exactly as the CPU path does.

    A photo inside a frame (a reseller's border around the original shot) is trimmed again
    inside the frame, up to ``MAX_NESTED`` times: otherwise the frame goes but the original's
    own backdrop stays, the item is small in the crop, and the framed copy no longer looks
    like the original (a double listing that the detector missed). The background returned is
    the innermost one, so both copies are padded alike.
    """
    width, height = size
    region, x0, y0, framed = small, 0, 0, False
    for _ in range(MAX_NESTED):
        inner = _frame(region)
        if inner is None:
            break
        region, x0, y0, framed = region.crop(inner), x0 + inner[0], y0 + inner[1], True
    found = _trim_search(region)
    if framed and (found is None or _area(found[0]) < NESTED_MIN_SHARE * region.width * region.height):
        # a busy photo in the frame, or a logo on a plain product: the framed photo itself
        found = ((0, 0, region.width, region.height), _rgb(_border(region)[1]))
    if found is None:
        return None
    (left, top, right, bottom), colour = found
    left, top, right, bottom = left + x0, top + y0, right + x0, bottom + y0
    left, top, right, bottom = (v * factor for v in (left, top, right, bottom))
    margin = max(factor, round(MARGIN * max(right - left, bottom - top)))
    box = (
        max(left - margin, 0),
        max(top - margin, 0),
        min(right + margin, width),
        min(bottom + margin, height),
    )
    return box, colour


def _frame(small: Image.Image) -> Box | None:
    """The photo inside a flat frame on every side of ``small`` (its box there), or None.

    A frame is a run of lines of the border's colour on each side, each at most
    FRAME_MAX_SIDE of the shorter side, ending at a line that differs from it across the
    middle half (the framed photo's edge; one blended line between is allowed). A product on a
    plain backdrop ends the run at a line that is still mostly backdrop, so it is no frame.
    The box starts FRAME_INSET lines inside the photo's edge, where JPEG ringing and the search
    copy's averaging no longer mix the frame in.
    """
    w, h = small.size
    if w < 16 or h < 16 or small.mode != "RGB":
        return None
    border, median = _border(small)
    if (np.abs(border - median).max(axis=1) <= FRAME_TOLERANCE).mean() < FRAME_UNIFORM:
        return None
    off = _off_colour(small, _rgb(median), _FRAME_LUT)
    rows = off[:, w // 4 : w - w // 4].mean(axis=1)
    cols = off[h // 4 : h - h // 4].mean(axis=0)
    most = FRAME_MAX_SIDE * min(h, w)
    sides = []
    for share in (cols, rows, cols[::-1], rows[::-1]):  # left, top, right, bottom
        k = int(np.argmax(share >= FRAME_LINE_OFF))  # first line that is not all frame
        if share[k] < FRAME_LINE_OFF or k < 1 or k > most:
            return None
        if share[k] < FRAME_EDGE:  # a blended line, then the photo's edge
            k += 1
            if k >= share.size or share[k] < FRAME_EDGE:
                return None
        sides.append(k + FRAME_INSET)
    left, top, right, bottom = sides[0], sides[1], w - sides[2], h - sides[3]
    return (left, top, right, bottom) if right - left >= 8 and bottom - top >= 8 else None


def _border(small: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The outermost ring of ``small``'s pixels (int16, N×3) and its median (per channel)."""
    pixels = np.asarray(small).astype(np.int16)
    border = np.concatenate((pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]))
    return border, np.median(border, axis=0)


def _rgb(median: np.ndarray) -> RGB:
    return (int(median[0]), int(median[1]), int(median[2]))


def _off_colour(small: Image.Image, colour: RGB, lut: list[int]) -> np.ndarray:
    """Where ``small`` differs from ``colour`` by more than ``lut``'s threshold (max over
    channels), as a bool mask: in Pillow's C loops, ~10x faster than the same in numpy on int16."""
    r, g, b = ImageChops.difference(small, Image.new("RGB", small.size, colour)).split()
    return np.asarray(ImageChops.lighter(ImageChops.lighter(r, g), b).point(lut)) > 0


def _lines(mask: np.ndarray) -> Box | None:
    """The box of the rows and columns with MIN_LINE_PIXELS product pixels: lone noisy pixels
    (JPEG ringing, dust) must not stretch the box to a corner."""
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1) >= MIN_LINE_PIXELS)
    cols = np.flatnonzero(np.count_nonzero(mask, axis=0) >= MIN_LINE_PIXELS)
    if rows.size == 0 or cols.size == 0:
        return None
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _open(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary opening of ``mask`` by a (2r+1)² square: separable shifted ANDs, then ORs (numpy,
    ~20x faster than Pillow's rank filters on the search copy)."""
    out = mask
    for op, pad in ((np.logical_and, False), (np.logical_or, False)):
        for axis in (0, 1):
            n = out.shape[axis]
            padded = np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)], constant_values=pad)
            acc = padded.take(range(0, n), axis=axis)
            for shift in range(1, 2 * r + 1):
                op(acc, padded.take(range(shift, shift + n), axis=axis), out=acc)
            out = acc
    return out


def _grow(box: Box, mask: np.ndarray) -> Box:
    """``box`` grown, a line at a time, while the line just outside it holds MIN_LINE_PIXELS of
    ``mask`` within its span: what touches the item stays in, a stroke apart from it does not."""
    left, top, right, bottom = box
    height, width = mask.shape
    grew = True
    while grew:
        grew = False
        if top > 0 and np.count_nonzero(mask[top - 1, left:right]) >= MIN_LINE_PIXELS:
            top, grew = top - 1, True
        if bottom < height and np.count_nonzero(mask[bottom, left:right]) >= MIN_LINE_PIXELS:
            bottom, grew = bottom + 1, True
        if left > 0 and np.count_nonzero(mask[top:bottom, left - 1]) >= MIN_LINE_PIXELS:
            left, grew = left - 1, True
        if right < width and np.count_nonzero(mask[top:bottom, right]) >= MIN_LINE_PIXELS:
            right, grew = right + 1, True
    return (left, top, right, bottom)


def _area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _trim_search(small: Image.Image) -> tuple[Box, RGB] | None:
    """What differs from ``small``'s near-uniform border: its tight box in ``small``'s pixels,
    and the border colour."""
    if small.mode != "RGB" or small.width < 3 or small.height < 3:
        return None
    border, median = _border(small)
    if (np.abs(border - median).max(axis=1) <= BORDER_TOLERANCE).mean() < BORDER_UNIFORM:
        return None
    colour = _rgb(median)
    # An opening (erode, then dilate) drops strokes thinner than OPENING pixels of the search
    # copy: a reseller's watermark text apart from the item must not stretch the box. The box
    # of what survives then grows over the thin parts that touch it. A product that is all thin
    # strokes (a belt, a chain) has nothing left: the mask as it was. So does one whose thin
    # parts are most of what differs from the backdrop (small pieces scattered over it, a
    # speckled pattern): a watermark is a small share of the photo's foreground, not most of it.
    mask = _off_colour(small, colour, _FOREGROUND_LUT)
    opened = _open(mask, OPENING // 2)
    lines = _lines(opened)
    found = None
    if lines is not None and _area(lines) >= MIN_OBJECT_SHARE * small.width * small.height:
        grown = _grow(lines, mask)  # thin parts attached to the item (a bag's handle) are product
        left, top, right, bottom = grown
        if np.count_nonzero(mask[top:bottom, left:right]) >= OPENED_KEEPS * np.count_nonzero(mask):
            found = grown
    if found is None:
        found = _lines(mask)
    if found is None:
        return None
    small_w, small_h = small.size
    share = _area(found) / (small_w * small_h)
    if share < MIN_OBJECT_SHARE or share > MAX_OBJECT_SHARE:
        return None
    return found, colour


def centre_box(size: tuple[int, int]) -> Box:
    """The central square on the shorter side: the usual ImageNet view of a photo."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def to_pixels(img: Image.Image, size: int, *, fill: RGB = WHITE) -> np.ndarray:
    """Resize to fit ``size``x``size`` keeping the aspect ratio, pad with ``fill``: uint8 HWC.

    The model input before normalisation. A batch of these is a quarter of the float32 bytes
    (what crosses queues and, on a GPU, the bus), and :func:`normalise` turns a whole batch
    into model input in one vectorised pass (on a GPU: on the device, :mod:`encoder.pixels`).
    Padding (white by default, the trimmed background after a trim) rather than stretching
    keeps a product's proportions, which are part of what it looks like.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    if (new_w, new_h) != (width, height):
        # BILINEAR in Pillow widens its filter when shrinking (antialiased, like torchvision's
        # Resize(antialias=True)); reducing_gap box-averages big shrinks first, for speed.
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if (new_w, new_h) != (size, size):
        # Pillow's paste onto a filled canvas: C loops, ~40x faster than numpy's broadcast fill
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
        img = canvas
    return np.asarray(img)


def to_tensor(img: Image.Image, size: int, *, fill: RGB = WHITE) -> torch.Tensor:
    """:func:`to_pixels` then :func:`normalise`: float32 CHW, what torchvision backbones take."""
    return torch.from_numpy(normalise(to_pixels(img, size, fill=fill)))


def preprocess_pixels(
    data: bytes,
    bbox: Sequence[float] | None,
    *,
    size: int,
    max_pixels: int,
    field_prefix: str = "image",
    max_bytes: int | None = None,
    localiser: FindsProduct | None = None,
) -> tuple[np.ndarray, str]:
    """Bytes of one image to uint8 ``size``x``size``x3 pixels: decode, crop, resize; (pixels, method).

    ``field_prefix`` names the image in the event (``"images[2]"``): decode errors carry it,
    bbox errors carry ``"images[2].bbox"``, so a dead letter says which image was wrong.
    A ``localiser`` finds the product in busy photos without a bbox; the decode then keeps at
    least the size it looks at.
    """
    target = size if localiser is None or bbox is not None else max(size, localiser.size)
    decoded = decode(data, max_pixels=max_pixels, target_size=target, crop_hint=bbox, field=field_prefix, max_bytes=max_bytes)
    crop, method, fill = crop_with_background(
        decoded.image, bbox, field=f"{field_prefix}.bbox", source_size=decoded.source_size, localiser=localiser
    )
    return to_pixels(crop, size, fill=fill), method


def preprocess(
    data: bytes,
    bbox: Sequence[float] | None,
    *,
    size: int,
    max_pixels: int,
    field_prefix: str = "image",
    max_bytes: int | None = None,
    localiser: FindsProduct | None = None,
) -> tuple[torch.Tensor, str]:
    """:func:`preprocess_pixels`, normalised: a float32 CHW model input and the crop method."""
    pixels, method = preprocess_pixels(
        data, bbox, size=size, max_pixels=max_pixels, field_prefix=field_prefix, max_bytes=max_bytes, localiser=localiser
    )
    return torch.from_numpy(normalise(pixels)), method


def _crop(img: Image.Image, box: Box) -> Image.Image:
    """Crop, without a copy when the box is the whole image."""
    if box == (0, 0, img.width, img.height):
        return img
    return img.crop(box)


def _num(value: float) -> str:
    """A coordinate as the producer likely wrote it: 12 rather than 12.0."""
    return str(int(value)) if math.isfinite(value) and value == int(value) else f"{value:g}"
