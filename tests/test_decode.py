"""Decode stage: every format and mode the catalog sends becomes upright RGB; bad input fails
with a permanent, precise error. All images are made in memory."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from cardigan.errors import CorruptImage, ImageTooLarge, PermanentError
from cardigan.imaging.decode import decode, decode_image, sniff_format, to_rgb

LIMIT = 40_000_000  # LimitSettings.max_image_pixels default


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """A hand-made 8-bit greyscale PNG: the header can claim any size, cheaply."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def near(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected, strict=True))


# -- every mode to RGB --------------------------------------------------------------------


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    return Image.linear_gradient("L").resize(size).convert(mode)


CASES = [
    ("1", "PNG"),
    ("L", "PNG"),
    ("L", "JPEG"),
    ("P", "PNG"),
    ("P", "GIF"),
    ("RGB", "PNG"),
    ("RGB", "JPEG"),
    ("RGB", "WEBP"),
    ("RGB", "BMP"),
    ("RGBA", "PNG"),
    ("RGBA", "WEBP"),
    ("LA", "PNG"),
    ("CMYK", "JPEG"),
    ("CMYK", "TIFF"),
    ("I", "TIFF"),
    ("F", "TIFF"),
]


@pytest.mark.parametrize(("mode", "fmt"), CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_every_mode_decodes_to_rgb_at_its_size(mode: str, fmt: str) -> None:
    data = encode(_gradient(mode, (48, 32)), fmt)
    img = decode_image(data, max_pixels=LIMIT)
    assert img.mode == "RGB"
    assert img.size == (48, 32)
    img.load()  # usable after decode returns


def test_16bit_png_keeps_its_contrast() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    source = Image.fromarray(ramp)
    assert source.mode == "I;16"
    img = decode_image(encode(source, "PNG"), max_pixels=LIMIT)
    row = np.asarray(img)[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253  # the full range survives: not clipped to 255
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50


@pytest.mark.parametrize(
    ("array", "lo", "hi"),
    [
        (np.linspace(0.0, 1.0, 64, dtype=np.float32), 0, 255),  # float in [0, 1]
        (np.linspace(-5.0, 5.0, 64, dtype=np.float32), 0, 255),  # arbitrary range: stretched
        (np.linspace(0, 65535, 64).astype(np.int32), 0, 255),  # 16-bit data in mode I
    ],
)
def test_wide_modes_scale_instead_of_clipping(array: np.ndarray, lo: int, hi: int) -> None:
    img = to_rgb(Image.fromarray(np.tile(array, (4, 1))))
    row = np.asarray(img)[0, :, 0].astype(int)
    assert abs(row[0] - lo) <= 2 and abs(row[-1] - hi) <= 2
    assert len(set(row.tolist())) > 50


def test_cmyk_jpeg_colours() -> None:
    red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    img = decode_image(encode(red, "JPEG", quality=95), max_pixels=LIMIT)
    assert near(img.getpixel((8, 8)), (255, 0, 0), tol=20)


def test_palette_with_transparency_goes_onto_white() -> None:
    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, 1 red
    pal.paste(1, (10, 0, 20, 10))
    for fmt in ("PNG", "GIF"):
        img = decode_image(encode(pal, fmt, transparency=0), max_pixels=LIMIT)
        assert img.getpixel((2, 5)) == (255, 255, 255), fmt  # transparent black -> white
        assert img.getpixel((15, 5)) == (255, 0, 0), fmt


def test_alpha_composites_onto_white() -> None:
    rgba = Image.new("RGBA", (30, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 0, 20, 10))
    rgba.paste((0, 0, 0, 128), (20, 0, 30, 10))
    img = decode_image(encode(rgba, "PNG"), max_pixels=LIMIT)
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((15, 5)) == (0, 0, 255)
    assert near(img.getpixel((25, 5)), (127, 127, 127), tol=2)
    la = decode_image(encode(rgba.convert("LA"), "PNG"), max_pixels=LIMIT)
    assert la.getpixel((5, 5)) == (255, 255, 255)


def test_grey_png_with_transparent_colour() -> None:
    grey = Image.new("L", (10, 10), 0)
    grey.paste(200, (5, 0, 10, 10))
    img = decode_image(encode(grey, "PNG", transparency=0), max_pixels=LIMIT)
    assert img.getpixel((2, 2)) == (255, 255, 255)
    assert img.getpixel((7, 2)) == (200, 200, 200)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    img = decode_image(encode(frames[0], fmt, **params), max_pixels=LIMIT)
    assert img.size == (32, 24)
    assert near(img.getpixel((16, 12)), (255, 0, 0), tol=4)


# -- orientation and JPEG draft --------------------------------------------------------------


def _marked_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    """Blue picture with a red marker in its stored top-left corner."""
    img = Image.new("RGB", size, (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, size[0] // 4, size[1] // 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_is_turned_upright() -> None:
    # Orientation 6: the camera was turned; the viewer rotates the stored picture 90 degrees
    # clockwise, so its top-left corner lands top-right and width/height swap.
    decoded = decode(_marked_jpeg((80, 40), 6), max_pixels=LIMIT)
    assert decoded.image.size == (40, 80)
    assert decoded.source_size == (40, 80)
    assert near(decoded.image.getpixel((37, 3)), (255, 0, 0), tol=30)
    assert near(decoded.image.getpixel((3, 3)), (0, 0, 255), tol=30)
    assert near(decoded.image.getpixel((37, 77)), (0, 0, 255), tol=30)


def test_exif_orientation_3_is_rotated_180() -> None:
    img = decode_image(_marked_jpeg((80, 40), 3), max_pixels=LIMIT)
    assert img.size == (80, 40)
    assert near(img.getpixel((77, 37)), (255, 0, 0), tol=30)


def test_jpeg_draft_decodes_large_jpegs_small_but_keeps_source_size() -> None:
    data = encode(Image.new("RGB", (2400, 1200), (10, 200, 30)), "JPEG")
    decoded = decode(data, max_pixels=LIMIT, target_size=224)
    assert decoded.source_size == (2400, 1200)
    # libjpeg scales by 1/2, 1/4 or 1/8 keeping both sides >= 224 (DRAFT_OVERSAMPLE 1): 1200 // 224 = 5 -> 1/4.
    assert decoded.image.size == (600, 300)


def test_jpeg_draft_keeps_detail_inside_a_small_bbox() -> None:
    data = encode(Image.new("RGB", (2400, 2400), (10, 200, 30)), "JPEG")
    whole = decode(data, max_pixels=LIMIT, target_size=100)
    assert whole.image.size == (300, 300)  # 1/8: 300 >= 100
    small_box = decode(data, max_pixels=LIMIT, target_size=100, crop_hint=(0, 0, 300, 300))
    # 300 source px must keep >= 100: scale at most 1/2 (1/4 would leave 75).
    assert small_box.image.size == (1200, 1200)
    assert small_box.source_size == (2400, 2400)


def test_no_draft_without_target_size() -> None:
    data = encode(Image.new("RGB", (1000, 500)), "JPEG")
    assert decode_image(data, max_pixels=LIMIT).size == (1000, 500)


# -- broken input ----------------------------------------------------------------------------


def test_empty_file() -> None:
    with pytest.raises(CorruptImage, match="empty file") as info:
        decode_image(b"", max_pixels=LIMIT, field="images[1]")
    assert info.value.field == "images[1]"
    assert info.value.reason == "images[1]: empty file"


def test_random_bytes_are_not_an_image() -> None:
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(CorruptImage, match="not an image"):
        decode_image(noise, max_pixels=LIMIT)
    with pytest.raises(CorruptImage, match="not an image"):
        decode_image(b"<html><body>404</body></html>", max_pixels=LIMIT)


def test_truncated_jpeg() -> None:
    data = encode(Image.linear_gradient("L").convert("RGB"), "JPEG", quality=90)
    with pytest.raises(CorruptImage, match="truncated JPEG") as info:
        decode_image(data[: len(data) // 2], max_pixels=LIMIT, field="images[0]")
    assert isinstance(info.value, PermanentError)
    assert info.value.field == "images[0]"


def test_truncated_png() -> None:
    data = encode(Image.linear_gradient("L"), "PNG")
    with pytest.raises(CorruptImage, match="truncated PNG|corrupt PNG"):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)


def test_image_magic_followed_by_garbage() -> None:
    for head in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8 "):
        with pytest.raises(CorruptImage, match="corrupt|truncated"):
            decode_image(head + b"\x00garbage" * 8, max_pixels=LIMIT)


def test_known_but_unsupported_format() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(CorruptImage, match="unsupported image format: heic"):
        decode_image(heic, max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00", "png"),
        (b"GIF87a....", "gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8L", "webp"),
        (b"BM" + b"\x00" * 20, "bmp"),
        (b"II*\x00\x08\x00", "tiff"),
        (b"\x00\x00\x00\x1cftypavif", "avif"),
        (b"\x00\x00\x00\x18ftypheic", "heic"),
        (b"\x00\x00\x00\x18ftypisom", None),  # an MP4
        (b"%PDF-1.7", None),
        (b"", None),
        (b"\xff", None),
    ],
)
def test_sniff_format(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


# -- size limits -----------------------------------------------------------------------------


def test_over_the_pixel_limit() -> None:
    data = encode(Image.new("RGB", (100, 60)), "PNG")
    with pytest.raises(ImageTooLarge, match=r"100x60 = 6000 pixels, over the limit of 5999") as info:
        decode_image(data, max_pixels=5999, field="images[3]")
    assert info.value.field == "images[3]"
    assert decode_image(data, max_pixels=6000).size == (100, 60)


def test_size_is_checked_before_any_pixel_is_decoded() -> None:
    # The header claims 9000x9000 and the pixel data is garbage: the limit answers first.
    data = grey_png(9000, 9000, b"not zlib at all")
    with pytest.raises(ImageTooLarge, match="9000x9000"):
        decode_image(data, max_pixels=LIMIT)


def test_real_png_bomb_with_the_default_limit() -> None:
    # 8000x8000 of one grey: a 62 kB file that decodes to 64 MB, over a 40 Mpx limit but under
    # Pillow's own (89 Mpx), so it is our check that refuses it.
    width = height = 8000
    rows = (b"\x00" + b"\x00" * width) * 500
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(rows) for _ in range(height // 500)) + packer.flush()
    data = grey_png(width, height, idat)
    assert len(data) < 100_000
    assert Image.open(io.BytesIO(data)).size == (width, height)  # a valid PNG
    with pytest.raises(ImageTooLarge, match="64000000 pixels, over the limit of 40000000"):
        decode_image(data, max_pixels=LIMIT)


def test_pillow_bomb_error_is_image_too_large() -> None:
    # Past twice Pillow's global limit, Image.open itself raises DecompressionBombError.
    before = Image.MAX_IMAGE_PIXELS
    data = grey_png(30_000, 30_000, zlib.compress(b"\x00" * 30_001))
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode_image(data, max_pixels=10**10)
    assert Image.MAX_IMAGE_PIXELS == before  # no global state touched


def test_pillow_bomb_warning_as_error_is_image_too_large() -> None:
    # Under ``-W error`` Pillow's DecompressionBombWarning is raised: still ImageTooLarge.
    data = grey_png(10_000, 10_000, zlib.compress(b"\x00" * 10_001))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLarge):
            decode_image(data, max_pixels=10**10)
