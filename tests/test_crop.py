"""Crop stage: bbox crops are exact and validated, background trim finds the product on a
plain backdrop, anything else is centre-cropped, and tensors are what backbones expect."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cardigan.errors import CorruptImage, InvalidCrop
from cardigan.imaging.crop import (
    bbox_to_box,
    centre_box,
    crop_image,
    crop_with_background,
    preprocess,
    to_tensor,
    trim_box,
)
from encoder.normalise import IMAGENET_MEAN, IMAGENET_STD

LIMIT = 40_000_000


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def quadrants(width: int = 100, height: int = 80) -> Image.Image:
    """Every pixel distinct, so a crop can be compared with the source region exactly."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    arr = np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(arr)


def product_shot(
    size: tuple[int, int] = (400, 300),
    box: tuple[int, int, int, int] = (100, 80, 220, 200),
    background: tuple[int, int, int] = (255, 255, 255),
    seed: int = 0,
) -> Image.Image:
    """A textured product on a plain backdrop, sent through JPEG like a real catalog photo."""
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = background
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = rng.integers(20, 160, (y1 - y0, x1 - x0, 3))
    return Image.open(io.BytesIO(encode(Image.fromarray(arr), quality=85))).convert("RGB")


def normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD, strict=True)])


# -- bbox ------------------------------------------------------------------------------------


def test_bbox_crops_the_exact_region() -> None:
    img = quadrants()
    crop, method = crop_image(img, (10, 20, 30, 50))
    assert method == "bbox"
    assert crop.size == (20, 30)
    assert np.array_equal(np.asarray(crop), np.asarray(img)[20:50, 10:30])


def test_fractional_bbox_covers_every_touched_pixel() -> None:
    crop, _ = crop_image(quadrants(), (10.4, 20.6, 29.2, 49.9))
    assert crop.size == (20, 30)


@pytest.mark.parametrize(
    ("bbox", "size"),
    [
        ((-10, -5, 50, 40), (50, 40)),
        ((80, 60, 150, 300), (20, 20)),
        ((-1, -1, 101, 81), (100, 80)),
    ],
)
def test_bbox_partly_outside_is_clamped(bbox: tuple[float, ...], size: tuple[int, int]) -> None:
    crop, method = crop_image(quadrants(), bbox)
    assert method == "bbox"
    assert crop.size == size


@pytest.mark.parametrize(
    ("bbox", "problem"),
    [
        ((30, 20, 10, 50), r"inverted \(x1 < x0\)"),
        ((10, 50, 30, 20), r"inverted \(y1 < y0\)"),
        ((10, 20, 10, 50), "zero area"),
        ((10, 20, 30, 20), "zero area"),
        ((100, 0, 120, 10), "entirely outside"),
        ((0, 80, 10, 90), "entirely outside"),
        ((-30, -30, 0, 10), "entirely outside"),
        ((0, 0, float("nan"), 10), "finite"),
        ((0, 0, 10), "4 numbers"),
        (("a", 0, 1, 2), "4 numbers"),
    ],
)
def test_bad_bbox_names_field_problem_and_size(bbox: tuple[object, ...], problem: str) -> None:
    with pytest.raises(InvalidCrop, match=problem) as info:
        crop_image(quadrants(), bbox, field="images[2].bbox")  # type: ignore[arg-type]
    assert info.value.field == "images[2].bbox"
    assert str(info.value).startswith("images[2].bbox")
    assert info.value.reason == str(info.value)  # the field is not repeated
    assert "100x80" in str(info.value)


def test_bbox_on_the_source_size_maps_onto_a_smaller_decode() -> None:
    # A JPEG decoded at 1/2 scale: the bbox stays in the producer's full-size pixels.
    assert bbox_to_box((10, 20, 30, 60), (50, 40), (100, 80)) == (5, 10, 15, 30)
    with pytest.raises(InvalidCrop, match="100x80"):
        bbox_to_box((100, 0, 120, 10), (50, 40), (100, 80))


# -- trim and centre -------------------------------------------------------------------------


def _close(found: tuple[int, int, int, int], expected: tuple[int, int, int, int], slack: int) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(found, expected, strict=True))


def _assert_trims_to(arr: np.ndarray, expected: tuple[int, int, int, int], slack: int) -> None:
    """The array, saved as a JPEG photo, trims to ``expected`` within ``slack`` pixels."""
    found = trim_box(_jpeg(Image.fromarray(arr)))
    assert found is not None
    assert _close(found[0], expected, slack=slack), found[0]


def test_trim_finds_a_product_on_white() -> None:
    img = product_shot(box=(100, 80, 220, 200))
    found = trim_box(img)
    assert found is not None
    box, background = found
    # The product box plus a small margin (3 % of its side): within 8 px on every side.
    assert _close(box, (100, 80, 220, 200), slack=8)
    assert box[0] <= 100 and box[1] <= 80 and box[2] >= 220 and box[3] >= 200  # nothing cut
    assert background == (255, 255, 255)
    crop, method, fill = crop_with_background(img, None)
    assert method == "trim" and fill == (255, 255, 255)
    assert crop.size == (box[2] - box[0], box[3] - box[1])


def test_trim_box_maps_back_from_the_reduced_search_copy() -> None:
    # 1600 px wide: the search runs on a 1/8 copy; the box must map back to full pixels.
    img = product_shot(size=(1600, 1200), box=(300, 500, 900, 1100))
    found = trim_box(img)
    assert found is not None
    assert _close(found[0], (300, 500, 900, 1100), slack=30)
    assert crop_image(img, None)[1] == "trim"


def test_trim_on_a_grey_backdrop_pads_with_that_grey() -> None:
    img = product_shot(background=(200, 200, 200))
    _, method, fill = crop_with_background(img, None)
    assert method == "trim"
    assert all(abs(c - 200) <= 3 for c in fill)


def test_trim_when_the_product_touches_one_edge() -> None:
    img = product_shot(box=(120, 100, 260, 300))  # a dress cut off by the bottom edge
    crop, method = crop_image(img, None)
    assert method == "trim"
    assert crop.height < 300 and crop.width < 200


def _jpeg(img: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(encode(img, quality=85))).convert("RGB")


@pytest.mark.parametrize("shade", [20, 235])
def test_trim_inside_a_frame_finds_the_product_on_the_original_backdrop(shade: int) -> None:
    # A reseller's copy: the shop photo (grey backdrop) with a flat border added. Trimming only
    # the border would keep the grey backdrop, and the item would be small in the crop.
    b = 16
    framed = ImageOps.expand(product_shot(background=(200, 200, 200)), border=b, fill=(shade, shade, shade))
    found = trim_box(_jpeg(framed))
    assert found is not None
    box, background = found
    assert _close(box, (100 + b, 80 + b, 220 + b, 200 + b), slack=8)
    assert all(abs(c - 200) <= 4 for c in background)  # padded like the original, not with the frame


def test_a_framed_busy_photo_is_cut_to_the_photo() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    found = trim_box(_jpeg(ImageOps.expand(Image.fromarray(noise), border=20, fill=(20, 20, 20))))
    assert found is not None
    assert _close(found[0], (20, 20, 420, 320), slack=14)


def test_a_logo_on_a_plain_rectangular_product_keeps_the_product() -> None:
    # A flat grey product with a thin white margin looks like a frame; what is inside (a logo)
    # is too small a share to be the item, so the crop is the product, not its logo.
    arr = np.full((300, 400, 3), 255, np.uint8)
    arr[30:270, 30:370] = 120
    arr[130:170, 180:220] = 20  # the logo
    _assert_trims_to(arr, (30, 30, 370, 270), slack=14)


def test_watermark_text_does_not_stretch_the_trim() -> None:
    img = product_shot(box=(100, 60, 220, 180)).convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((230, 240), "shop42.example", fill=(0, 0, 0, 110), font=ImageFont.load_default(size=24))
    marked = _jpeg(Image.alpha_composite(img, layer).convert("RGB"))
    found = trim_box(marked)
    assert found is not None
    assert _close(found[0], (100, 60, 220, 180), slack=8)


def test_a_thin_part_touching_the_item_stays_in_the_box() -> None:
    # A bag's handle is thinner than the opening that drops watermark strokes: it is kept
    # because it touches the bag.
    arr = np.asarray(product_shot(box=(100, 100, 220, 220))).copy()
    arr[40:100, 150:153] = 30
    arr[40:43, 150:190] = 30
    _assert_trims_to(arr, (100, 40, 220, 220), slack=8)


def test_a_product_of_thin_strokes_is_still_trimmed() -> None:
    # A strap or a chain: the opening that drops watermark strokes would drop it all.
    arr = np.full((300, 400, 3), 255, np.uint8)
    arr[80:83, 100:250] = 40
    arr[80:230, 100:103] = 40
    arr[228:231, 100:250] = 40
    _assert_trims_to(arr, (100, 80, 250, 231), slack=8)


def test_small_pieces_scattered_over_the_backdrop_stay_in_the_box() -> None:
    # Beads, a starfield: the thin parts are most of what differs from the backdrop, so they are
    # the product, not a watermark beside it; the one thick piece alone is not the box.
    arr = np.full((300, 400, 3), 255, np.uint8)
    arr[130:170, 180:220] = 30
    for y in range(40, 261, 44):
        for x in range(40, 361, 64):
            arr[y : y + 6, x : x + 6] = 30
    _assert_trims_to(arr, (40, 40, 366, 266), slack=12)


def test_busy_photo_is_centre_cropped() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    crop, method = crop_image(Image.fromarray(noise), None)
    assert method == "centre"
    assert crop.size == (300, 300)
    assert np.array_equal(np.asarray(crop), noise[:, 50:350])


@pytest.mark.parametrize("speck", [False, True])
def test_blank_or_specked_white_is_centre_cropped(speck: bool) -> None:
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    if speck:
        img.paste((0, 0, 0), (150, 100, 152, 102))  # dust, not a product
    _, method = crop_image(img, None)
    assert method == "centre"


def test_centre_box() -> None:
    assert centre_box((400, 300)) == (50, 0, 350, 300)
    assert centre_box((300, 401)) == (0, 50, 300, 350)
    assert centre_box((64, 64)) == (0, 0, 64, 64)


# -- to_tensor -------------------------------------------------------------------------------


def test_to_tensor_shape_dtype_and_normalisation() -> None:
    t = to_tensor(Image.new("RGB", (50, 50), (255, 255, 255)), 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.allclose(t[:, 5, 5], normalised((255, 255, 255)), atol=1e-5)
    t = to_tensor(Image.new("RGB", (64, 64), (0, 0, 0)), 32)
    assert torch.allclose(t[:, 5, 5], normalised((0, 0, 0)), atol=1e-5)


def test_to_tensor_keeps_aspect_ratio_by_padding() -> None:
    t = to_tensor(Image.new("RGB", (200, 100), (255, 0, 0)), 64)
    red, white = normalised((255, 0, 0)), normalised((255, 255, 255))
    assert torch.allclose(t[:, 32, 32], red, atol=1e-5)  # the product fills the middle rows
    assert torch.allclose(t[:, 2, 32], white, atol=1e-5)  # padding above and below
    assert torch.allclose(t[:, 61, 32], white, atol=1e-5)
    assert torch.allclose(t[:, 32, 0], red, atol=1e-5)  # full width
    t = to_tensor(Image.new("RGB", (10, 20), (255, 0, 0)), 64, fill=(0, 0, 0))
    assert torch.allclose(t[:, 32, 2], normalised((0, 0, 0)), atol=1e-5)


def test_to_tensor_upsamples_small_crops_and_accepts_other_modes() -> None:
    assert to_tensor(Image.new("L", (7, 3), 128), 224).shape == (3, 224, 224)


# -- preprocess: bytes to tensor -------------------------------------------------------------


def test_preprocess_bbox_on_a_drafted_jpeg() -> None:
    # A large JPEG is decoded at reduced scale; the bbox (full-size pixels) must still land on
    # the red square and nothing else.
    img = Image.new("RGB", (2000, 2000), (255, 255, 255))
    img.paste((255, 0, 0), (1200, 1200, 1400, 1400))
    t, method = preprocess(encode(img, quality=95), (1200, 1200, 1400, 1400), size=64, max_pixels=LIMIT)
    assert method == "bbox" and t.shape == (3, 64, 64)
    red = normalised((255, 0, 0))
    assert (t - red.view(3, 1, 1)).abs().amax(dim=0).median() < 0.15
    assert torch.allclose(t[:, 2, 2], red, atol=0.3) and torch.allclose(t[:, 61, 61], red, atol=0.3)


def test_preprocess_bbox_is_read_on_the_upright_image() -> None:
    # Stored 200x100 with orientation 6: upright it is 100x200, and the bbox refers to that.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 50, 50))  # stored top-left -> upright top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, quality=95, exif=exif.tobytes())
    t, _ = preprocess(data, (55, 5, 95, 45), size=32, max_pixels=LIMIT)
    assert torch.allclose(t[:, 16, 16], normalised((255, 0, 0)), atol=0.3)
    with pytest.raises(InvalidCrop, match="100x200"):
        preprocess(data, (150, 0, 160, 10), size=32, max_pixels=LIMIT)


def test_preprocess_trims_a_product_shot() -> None:
    t, method = preprocess(encode(product_shot()), None, size=224, max_pixels=LIMIT)
    assert method == "trim" and t.shape == (3, 224, 224) and t.dtype == torch.float32


def test_preprocess_errors_carry_the_image_field() -> None:
    data = encode(quadrants())
    with pytest.raises(InvalidCrop) as crop_error:
        preprocess(data, (50, 50, 40, 60), size=32, max_pixels=LIMIT, field_prefix="images[2]")
    assert crop_error.value.field == "images[2].bbox"
    with pytest.raises(CorruptImage) as decode_error:
        preprocess(b"", None, size=32, max_pixels=LIMIT, field_prefix="images[2]")
    assert decode_error.value.reason == "images[2]: empty file"
