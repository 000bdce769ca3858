"""Batched JPEG decode + crop + resize on the model's device, with the CPU path per image for
what it cannot decode. Run here with device="cpu" (torchvision's libjpeg-turbo decoder): the
same code a GPU runs with nvJPEG, except the decoder itself (the ``cuda`` test)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cardigan.errors import CorruptImage, ImageTooLarge, InvalidCrop
from cardigan.imaging.crop import preprocess_pixels
from cardigan.imaging.decode import jpeg_header
from cardigan.imaging.device_decode import ImageJob, device_crops
from cardigan.ops.verify import Expected
from devkit.catalog import generate_catalog, render_product
from encoder import build_encoder
from tests.harness import Namespace
from tests.test_batching import MIXING_ENV, _product_event
from tests.test_index_e2e import converge

SIZE = 96
LIMIT = 40_000_000


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


@pytest.fixture(scope="module")
def catalog_jobs() -> list[ImageJob]:
    """Catalog-style photos (plain backdrops to trim, bboxes, lifestyle shots), as the bench uses."""
    products = generate_catalog(12, seed=3, prefix="d", workers=1)
    return [ImageJob(i.data, list(i.bbox) if i.bbox else None, f"images[{k}]") for p in products for k, i in enumerate(p.images)]


def test_device_crops_are_close_to_the_cpu_path(catalog_jobs: list[ImageJob]) -> None:
    got = device_crops(catalog_jobs, size=SIZE, max_pixels=LIMIT, device="cpu")
    diffs = []
    for job, crop in zip(catalog_jobs, got, strict=True):
        assert isinstance(crop, torch.Tensor) and crop.dtype == torch.uint8 and crop.shape == (SIZE, SIZE, 3)
        want, _ = preprocess_pixels(job.data, job.bbox, size=SIZE, max_pixels=LIMIT)
        diffs.append(np.abs(crop.numpy().astype(int) - want.astype(int)).mean())
    # Same crop decisions; the pixels differ only by the resampling filter (and JPEG draft).
    assert np.median(diffs) < 3 and max(diffs) < 12, diffs


def test_one_bad_file_fails_only_its_own_image() -> None:
    good = encode(Image.new("RGB", (120, 80), (200, 30, 30)))
    png = encode(Image.new("RGBA", (50, 50), (0, 0, 255, 255)), "PNG")
    cmyk = encode(Image.new("CMYK", (60, 40), (0, 255, 255, 0)))
    jobs = [
        ImageJob(good, None, "images[0]"),
        ImageJob(good[: len(good) // 2], None, "images[1]"),  # cut short: the batched call fails
        ImageJob(png, None, "images[2]"),  # not a JPEG: decoded on the CPU
        ImageJob(cmyk, None, "images[3]"),  # CMYK JPEG: the CPU path converts it
        ImageJob(b"not an image", None, "images[4]"),
        ImageJob(good, [500, 500, 600, 600], "images[5]"),  # a bbox outside the image
    ]
    out = device_crops(jobs, size=SIZE, max_pixels=LIMIT, device="cpu")
    assert isinstance(out[0], torch.Tensor) and abs(int(out[0][SIZE // 2, SIZE // 2, 0]) - 200) < 6
    assert isinstance(out[1], CorruptImage) and out[1].field == "images[1]" and "JPEG" in str(out[1])
    assert isinstance(out[2], torch.Tensor) and tuple(out[2][SIZE // 2, SIZE // 2].tolist()) == (0, 0, 255)
    assert isinstance(out[3], torch.Tensor)
    assert isinstance(out[4], CorruptImage) and "not an image" in str(out[4])
    assert isinstance(out[5], InvalidCrop) and out[5].field == "images[5].bbox"


def test_the_limits_are_read_from_the_header_first() -> None:
    big = encode(Image.new("RGB", (400, 300)))
    with pytest.raises(ImageTooLarge, match="120000 pixels"):
        jpeg_header(big, max_pixels=100_000, field="images[0]")
    with pytest.raises(ImageTooLarge, match="MiB"):
        jpeg_header(big, max_pixels=LIMIT, max_bytes=100_000)
    assert jpeg_header(big, max_pixels=LIMIT) == (400, 300, 1)
    assert jpeg_header(encode(Image.new("CMYK", (8, 8))), max_pixels=LIMIT) is None  # the CPU path's job
    out = device_crops([ImageJob(big, None, "images[7]")], size=SIZE, max_pixels=100_000, device="cpu")
    assert isinstance(out[0], ImageTooLarge) and out[0].field == "images[7]"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_upright_as_on_the_cpu_path(orientation: int) -> None:
    """nvJPEG ignores EXIF orientation: the module turns the image itself, on any device."""
    rng = np.random.default_rng(orientation)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, exif=exif.tobytes(), quality=95)
    w, h = (120, 160) if orientation >= 5 else (160, 120)
    bbox = [0, 0, w * 3 // 4, h // 2]  # not symmetric: a wrong turn crops elsewhere
    got = device_crops([ImageJob(data, bbox, "images[0]")], size=SIZE, max_pixels=LIMIT, device="cpu")[0]
    want, _ = preprocess_pixels(data, bbox, size=SIZE, max_pixels=LIMIT)
    assert isinstance(got, torch.Tensor)
    assert np.abs(got.numpy().astype(int) - want.astype(int)).mean() < 4


def test_exif_orientation_is_applied_before_the_bbox() -> None:
    """Stored 200x100 with orientation 6 (rotate 90° clockwise to view): the bbox is upright."""
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 40, 100))  # stored left edge: upright, the top
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, exif=exif.tobytes(), quality=95)
    out = device_crops([ImageJob(data, [0, 0, 100, 40], "images[0]")], size=SIZE, max_pixels=LIMIT, device="cpu")
    crop = out[0]
    assert isinstance(crop, torch.Tensor)
    centre = crop[SIZE // 2, SIZE // 2].tolist()
    assert centre[0] > 200 and centre[2] < 60, centre  # red: the upright top strip


@pytest.mark.cuda
def test_nvjpeg_batch_matches_the_cpu_decoder(catalog_jobs: list[ImageJob]) -> None:
    gpu = device_crops(catalog_jobs, size=SIZE, max_pixels=LIMIT, device="cuda")
    cpu = device_crops(catalog_jobs, size=SIZE, max_pixels=LIMIT, device="cpu")
    for g, c in zip(gpu, cpu, strict=True):
        assert isinstance(g, torch.Tensor) and g.device.type == "cuda" and isinstance(c, torch.Tensor)
        assert np.abs(g.cpu().numpy().astype(int) - c.numpy().astype(int)).mean() < 3


@pytest.mark.e2e
def test_e2e_worker_decodes_on_the_device(ns: Namespace) -> None:
    """encoder.decode=device in a real worker (device cpu here): each stored vector is its own
    image's, through device_crops (whose pixels are checked against the CPU path above), and a
    JPEG cut short dead-letters its own event only."""
    s = ns.settings
    good = {f"dev-{p}": _product_event(ns, f"dev-{p}", 2, seed=300 + p) for p in range(4)}
    bad_ev, _ = _product_event(ns, "dev-broken", 2, seed=400)
    whole = render_product("dev-broken", 0, 2, 200).images[1].data
    bad_ev["images"][1]["uri"] = ns.put_image("device/dev-broken/cut.jpg", whole[: len(whole) // 3])
    bad_ev["images"][1].pop("bbox", None)
    w = ns.start_worker(extra_env={**MIXING_ENV, "CARDIGAN_ENCODER__DECODE": "device"})
    ns.publish([*(ev for ev, _ in good.values()), bad_ev])
    converge(ns, {**{pid: Expected(1, 2) for pid in good}, "dev-broken": None})
    dead = ns.dead().list()
    assert [(d.product_id, d.kind) for d in dead] == [("dev-broken", "corrupt_image")]
    assert "images[1]" in dead[0].reason

    enc = build_encoder(s.encoder).load()
    size, limit = s.encoder.image_size, s.limits.max_image_pixels
    for pid, (_, raw) in good.items():
        rows = {r["image_index"]: r for r in ns.index().get_product(pid, s.limits.max_images)}
        for i, (data, bbox) in enumerate(raw):
            crop = device_crops([ImageJob(data, bbox, "x")], size=size, max_pixels=limit, device="cpu")[0]
            assert isinstance(crop, torch.Tensor)
            want = enc.embed_pixels([crop])[0]
            assert float(np.dot(np.asarray(rows[i]["embedding"], np.float32), want)) >= 0.9999, (pid, i)
    assert w.alive()
