"""uint8 crops, normalised once per batch: the same vectors as the per-image float path, on
every runtime, and the GPU path's own code (device normalisation, autocast choice) run on the CPU."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cardigan.imaging.crop import normalise, preprocess, preprocess_pixels, to_pixels, to_tensor
from config.settings import EncoderSettings
from encoder.encoder import autocast_dtype
from encoder.pixels import PixelStager, normalise_on_device
from tests.test_onnx_runtime import make

pytestmark = pytest.mark.usefixtures("torch_rng_isolated", "one_torch_thread")  # tests/conftest.py

SIZE = 64
LIMIT = 40_000_000


def photos(n: int, seed: int = 0) -> list[tuple[bytes, list[int] | None]]:
    """JPEGs of different sizes and shapes, some with a bbox, made in memory."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(48, 200)), int(rng.integers(48, 200))
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((buf.getvalue(), [w // 8, h // 8, w - 2, h - 3] if i % 3 == 0 else None))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


def test_pixels_then_normalise_is_the_old_float_path_bit_for_bit() -> None:
    for data, bbox in photos(6):
        tensor, method = preprocess(data, bbox, size=SIZE, max_pixels=LIMIT)
        pixels, method2 = preprocess_pixels(data, bbox, size=SIZE, max_pixels=LIMIT)
        assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 3) and method == method2
        assert torch.equal(tensor, torch.from_numpy(normalise(pixels)))
    wide = Image.new("RGB", (90, 30), (10, 200, 30))
    px = to_pixels(wide, SIZE, fill=(1, 2, 3))
    assert (px[0, 0] == (1, 2, 3)).all() and (px[SIZE // 2, SIZE // 2] == (10, 200, 30)).all()  # padded, not stretched
    assert torch.equal(to_tensor(wide, SIZE, fill=(1, 2, 3)), torch.from_numpy(normalise(px)))


def test_batch_normalisation_equals_per_image_and_reuses_its_buffer() -> None:
    crops = [preprocess_pixels(d, b, size=SIZE, max_pixels=LIMIT)[0] for d, b in photos(5)]
    stager = PixelStager(SIZE)
    batch = stager.normalised(stager.stack(crops))
    assert batch.shape == (5, 3, SIZE, SIZE) and batch.is_contiguous()
    for i, c in enumerate(crops):
        assert torch.equal(batch[i], torch.from_numpy(normalise(c)))
    again = stager.normalised(stager.stack(crops[:2]))  # a smaller batch: the same memory
    assert again.data_ptr() == batch.data_ptr()
    with pytest.raises(ValueError, match="uint8"):
        stager.stack([crops[0].astype(np.float32)])


def test_device_normalisation_matches_numpy_and_is_channels_last() -> None:
    """What runs on the GPU after the uint8 copy, run here on the CPU."""
    crops = np.stack([preprocess_pixels(d, b, size=SIZE, max_pixels=LIMIT)[0] for d, b in photos(4)])
    x = normalise_on_device(torch.from_numpy(crops))
    assert x.dtype == torch.float32 and x.shape == (4, 3, SIZE, SIZE)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x.contiguous(), torch.from_numpy(normalise(crops)))


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_embed_pixels_gives_the_vectors_of_embed(cache: Path, runtime: str) -> None:
    enc = make(cache, runtime=runtime).load()
    pics = photos(9, seed=3)
    crops = [preprocess_pixels(d, b, size=SIZE, max_pixels=LIMIT)[0] for d, b in pics]
    old = enc.embed(torch.stack([preprocess(d, b, size=SIZE, max_pixels=LIMIT)[0] for d, b in pics]))
    new = enc.embed_pixels(crops)
    assert new.shape == (9, 512) and new.dtype == np.float32
    assert (np.sum(old * new, axis=1) >= 0.9999).all()
    assert np.array_equal(enc.embed_pixels(np.stack(crops)), new)  # a stacked array: the same
    assert enc.embed_pixels([]).shape == (0, 512)
    if runtime == "torch":  # the GPU path's forward (device normalisation, channels_last), on the CPU
        on_device = enc._embed_on_device(torch.from_numpy(np.stack(crops)))
        assert (np.sum(old * on_device, axis=1) >= 0.9999).all()


def test_autocast_choice() -> None:
    assert autocast_dtype("auto", "cuda", bf16_supported=True) is torch.bfloat16
    assert autocast_dtype("auto", "cuda", bf16_supported=False) is torch.float16
    assert autocast_dtype("bfloat16", "cuda", bf16_supported=False) is torch.float16
    assert autocast_dtype("float16", "cuda", bf16_supported=True) is torch.float16
    assert autocast_dtype("float32", "cuda", bf16_supported=True) is None
    for name in ("auto", "bfloat16", "float16", "float32"):
        assert autocast_dtype(name, "cpu", bf16_supported=True) is None  # a CPU runs float32


def test_precision_setting_and_its_short_names() -> None:
    assert EncoderSettings().dtype == "auto"
    assert EncoderSettings(dtype="bf16").dtype == "bfloat16"
    assert EncoderSettings(dtype="fp16").dtype == "float16"
    assert EncoderSettings(dtype="fp32").dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        EncoderSettings(dtype="int8")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_pinned_uint8_batch_matches_cpu(cache: Path, dtype: str) -> None:
    cpu = make(cache, runtime="torch").load()
    gpu = make(cache, device="cuda", dtype=dtype, batch_size=8).load()
    crops = [preprocess_pixels(d, b, size=SIZE, max_pixels=LIMIT)[0] for d, b in photos(8)]
    v = gpu.embed_pixels(crops)
    host = gpu._stager.stack(crops) if gpu._stager else None
    assert host is not None and host.is_pinned()
    cos = np.sum(v * cpu.embed_pixels(crops), axis=1)
    assert cos.min() > (0.9999 if dtype == "float32" else 0.99)
