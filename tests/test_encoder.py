"""The encoder: shapes, unit norms, determinism across processes' worth of builds, checkpoints.

Small backbones at 64 px on the CPU with random weights: nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import WeightsEnum

from config.settings import EncoderSettings
from encoder import (
    EmbeddingNet,
    Encoder,
    build_encoder,
    get_backbone,
    known_backbones,
    model_version_for,
    save_checkpoint,
)
from encoder.checkpoint import file_sha256

SIZE = 64
ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.cuda  # run where a GPU is; deselected elsewhere (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("torch_rng_isolated", "one_torch_thread")  # tests/conftest.py


def make_settings(**kw: Any) -> EncoderSettings:
    base: dict[str, Any] = {"backbone": "mobilenet_v3_small", "weights": "random", "image_size": SIZE, "device": "cpu"}
    return EncoderSettings(**(base | kw))


def images(n: int, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    """Normalised images with structure (smooth colour fields plus blocks), made in memory."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    for i in range(n):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, y0 : y0 + size // 3, x0 : x0 + size // 3] = torch.rand(3, 1, 1, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@pytest.fixture(scope="module")
def mobilenet() -> Encoder:
    return build_encoder(make_settings()).load()


@pytest.fixture(scope="module")
def resnet() -> Encoder:
    return build_encoder(make_settings(backbone="resnet18")).load()


@pytest.fixture(params=["mobilenet", "resnet"])
def encoder(request: pytest.FixtureRequest) -> Encoder:
    return request.getfixturevalue(request.param)


def test_embeddings_are_512d_float32_unit_rows(encoder: Encoder) -> None:
    v = encoder.embed(images(5))
    assert v.shape == (5, 512) and v.dtype == np.float32
    assert np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 512 and encoder.image_size == SIZE
    assert encoder.device == torch.device("cpu") and encoder.random_weights


def test_random_weights_still_tell_images_apart(encoder: Encoder) -> None:
    # A random torchvision trunk collapses every image onto one vector unless calibrated.
    x = images(6)
    v = encoder.embed(torch.cat([x, x[:1]]))
    cos = v[:6] @ v[:6].T
    assert cos[~np.eye(6, dtype=bool)].max() < 0.99
    np.testing.assert_allclose(v[6], v[0], atol=1e-6)


def test_batch_equals_one_by_one(encoder: Encoder) -> None:
    x = images(6)
    whole = encoder.embed(x)
    single = np.concatenate([encoder.embed(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(whole, single, atol=1e-5)


def test_same_seed_builds_identical_weights_whatever_the_process_state(mobilenet: Encoder) -> None:
    # Another build, with the global RNG elsewhere and another thread count: same bits.
    threads = torch.get_num_threads()
    torch.manual_seed(12345)
    torch.set_num_threads(2)
    try:
        other = build_encoder(make_settings()).load()
    finally:
        torch.set_num_threads(threads)
    assert other.fingerprint == mobilenet.fingerprint
    assert other.model_version == mobilenet.model_version
    x = images(4)
    assert np.array_equal(other.embed(x), mobilenet.embed(x))


def test_loading_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_encoder(make_settings()).load()
    assert torch.equal(torch.rand(3), expected)


def test_pinned_weights_and_version() -> None:
    """Golden values: if these move, random-weight vectors moved and the scheme needs a bump."""
    enc = build_encoder(make_settings()).load()
    assert enc.model_version == "mobilenet_v3_small-random-s0-64-4644a739"
    assert enc.fingerprint == GOLDEN_FINGERPRINT


_FINGERPRINT_SCRIPT = """
import logging, sys
logging.disable(logging.WARNING)
from config.settings import EncoderSettings
from encoder import build_encoder
for backbone in sys.argv[1:]:
    s = EncoderSettings(backbone=backbone, weights="random", image_size=64, device="cpu")
    print(backbone, build_encoder(s).load().fingerprint)
"""


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_random_weights_are_the_same_bits_on_other_cpus(capability: str) -> None:
    """A fleet of mixed hosts (AVX2, AVX-512, none) must build the same random net from one
    seed, or their vectors would not be comparable. ATEN_CPU_CAPABILITY makes this process's
    torch use another set of SIMD kernels: the one a different CPU would get."""
    backbones = ["mobilenet_v3_small", "resnet18", "efficientnet_b0"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_SCRIPT, *backbones], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    there = dict(line.split() for line in out.splitlines())
    here = {b: build_encoder(make_settings(backbone=b)).load().fingerprint for b in backbones}
    assert there == here


def test_other_seed_other_version_other_vectors(mobilenet: Encoder) -> None:
    other = build_encoder(make_settings(seed=1)).load()
    assert other.model_version != mobilenet.model_version
    assert "-s1-" in other.model_version
    x = images(4)
    assert np.abs(other.embed(x) - mobilenet.embed(x)).max() > 1e-2


def test_model_version_shape_and_no_model_needed() -> None:
    enc = build_encoder(make_settings(backbone="resnet18", image_size=96, seed=3))
    assert re.fullmatch(r"resnet18-random-s3-96-[0-9a-f]{8}", enc.model_version)
    assert enc.model_version == model_version_for(enc.settings)
    assert not enc.loaded
    # Every part of the identity moves the version.
    versions = {
        model_version_for(make_settings(**kw))
        for kw in ({}, {"seed": 1}, {"image_size": 96}, {"backbone": "resnet18"}, {"weights": "DEFAULT"})
    }
    assert len(versions) == 5


def test_constructor_builds_nothing_and_load_is_idempotent() -> None:
    enc = Encoder(make_settings(device="auto"))
    assert enc._net is None and enc.fingerprint is None and not enc.loaded
    assert enc._device is None and not torch.cuda.is_initialized()  # "auto" waits for load()
    assert enc.load() is enc
    net = enc._net
    assert net is not None and not net.training
    assert enc.load() is enc and enc._net is net


def test_concurrent_first_use_loads_once() -> None:
    enc = Encoder(make_settings())
    x = images(2)
    barrier = threading.Barrier(4)

    def go() -> np.ndarray:
        barrier.wait()
        return enc.embed(x)  # embed loads on first use

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: go(), range(4)))
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_random_weights_are_announced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="encoder"):
        build_encoder(make_settings()).load()
    assert any("RANDOM WEIGHTS" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown backbone 'alexnet'; known: .*mobilenet_v3_small, resnet18, resnet50, vgg16"):
        build_encoder(make_settings(backbone="alexnet"))
    assert {"mobilenet_v3_small", "resnet18", "resnet50", "vgg16"} <= set(known_backbones())


@pytest.mark.parametrize("weights", ["IMAGENET1K_V9", "imagenet", "Random", "VGG16_Weights.IMAGENET1K_V1"])
def test_unknown_weights_name_is_refused_up_front(weights: str) -> None:
    with pytest.raises(ValueError, match=r"encoder\.weights: unknown weights .* IMAGENET1K_V1, DEFAULT"):
        Encoder(make_settings(backbone="resnet18", weights=weights))


def test_missing_checkpoint_names_the_field(tmp_path: Path) -> None:
    enc = Encoder(make_settings(weights=str(tmp_path / "nope.pt")))  # no I/O yet
    with pytest.raises(ValueError, match=r"encoder\.weights: checkpoint file not found"):
        _ = enc.model_version
    with pytest.raises(ValueError, match=r"encoder\.weights: checkpoint file not found"):
        enc.load()


def test_bad_device_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"encoder\.device"):
        Encoder(make_settings(device="tpu"))
    assert Encoder(make_settings(device="auto")).device.type in ("cpu", "cuda")


def test_checkpoint_round_trip(tmp_path: Path, mobilenet: Encoder) -> None:
    # Weights of seed 5, loaded under seed 0: the file wins, and the version names the file.
    source = build_encoder(make_settings(seed=5)).load()
    assert source._net is not None
    path = tmp_path / "encoder.pt"
    digest = save_checkpoint(source._net, path)
    assert digest == file_sha256(path)
    assert save_checkpoint(source._net, tmp_path / "again.pt") == digest  # same weights, same bytes

    enc = build_encoder(make_settings(weights=str(path))).load()
    assert not enc.random_weights
    assert digest[:12] in enc.model_version
    assert re.fullmatch(rf"mobilenet_v3_small-ckpt{digest[:12]}-64-[0-9a-f]{{8}}", enc.model_version)
    assert enc.model_version == model_version_for(enc.settings)
    assert enc.fingerprint == source.fingerprint
    x = images(4)
    assert np.array_equal(enc.embed(x), source.embed(x))
    assert not np.allclose(enc.embed(x), mobilenet.embed(x))


def test_checkpoint_for_another_backbone_is_refused(tmp_path: Path, mobilenet: Encoder) -> None:
    assert mobilenet._net is not None
    path = tmp_path / "mobilenet.pt"
    save_checkpoint(mobilenet._net, path)
    with pytest.raises(ValueError, match=r"encoder\.weights: checkpoint .* does not fit backbone 'resnet18'"):
        build_encoder(make_settings(backbone="resnet18", weights=str(path))).load()


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state_dict"):
        build_encoder(make_settings(weights=str(path))).load()


def test_pretrained_names_resolve_without_network() -> None:
    default = Encoder(make_settings(backbone="resnet18", weights="DEFAULT"))
    qualified = Encoder(make_settings(backbone="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"))
    # DEFAULT is named by what it resolves to: it moves between torchvision releases.
    assert default.model_version == qualified.model_version
    assert re.fullmatch(r"resnet18-IMAGENET1K_V1-s0-64-[0-9a-f]{8}", default.model_version)
    assert not default.random_weights and not default.loaded


def test_pretrained_backbone_goes_through_torchvision_loading(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The download is faked; torchvision's own builder loads what it returns into the trunk.
    torch.manual_seed(99)  # the autouse fixture restores the global RNG
    state = torchvision.models.mobilenet_v3_small().state_dict()
    calls: list[str] = []

    def fake_get_state_dict(self: WeightsEnum, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls.append(self.name)
        return state

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    with caplog.at_level(logging.WARNING, logger="encoder"):
        enc = build_encoder(make_settings(weights="DEFAULT")).load()
    assert calls == ["IMAGENET1K_V1"]
    assert enc._net is not None
    assert torch.equal(enc._net.trunk[0][0].weight, state["features.0.0.weight"])
    assert any("UNTRAINED HEAD" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.linalg.norm(enc.embed(images(2)), axis=1), 1.0, atol=1e-5)


def test_pretrained_without_network_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: WeightsEnum, *args: Any, **kwargs: Any) -> None:
        raise URLError("no network")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"encoder\.weights: could not load MobileNet_V3_Small_Weights\.IMAGENET1K_V1.*checkpoints/"):
        build_encoder(make_settings(weights="IMAGENET1K_V1")).load()


def test_embed_checks_its_input(mobilenet: Encoder) -> None:
    with pytest.raises(ValueError, match=r"N×3×64×64"):
        mobilenet.embed(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"N×3×64×64"):
        mobilenet.embed(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="float"):
        mobilenet.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert mobilenet.embed(torch.zeros(0, 3, 64, 64)).shape == (0, 512)
    # float64 and pinned-style inputs are fine
    assert mobilenet.embed(images(1).double()).dtype == np.float32


def test_every_backbone_is_registered_with_its_width() -> None:
    for name in known_backbones():
        b = get_backbone(name)
        with torch.device("meta"):
            out = EmbeddingNet(b.build_trunk(None), b.feature_dim).trunk(torch.empty(1, 3, 64, 64))
        assert out.shape[1] == b.feature_dim, name


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_matches_cpu(dtype: str, mobilenet: Encoder) -> None:
    enc = build_encoder(make_settings(device="cuda", dtype=dtype, batch_size=8)).load()
    x = images(8).pin_memory()
    v = enc.embed(x)
    assert enc.fingerprint == mobilenet.fingerprint  # weights are built on the CPU, then moved
    cos = np.sum(v * mobilenet.embed(x), axis=1)
    assert cos.min() > (0.9999 if dtype == "float32" else 0.99)


GOLDEN_FINGERPRINT = "3c4651676086312e"


def test_cpu_graph_matches_eager_at_any_batch_size(mobilenet: Encoder) -> None:
    """The frozen TorchScript graph (the CPU default) gives the eager net's vectors, for
    batch sizes other than the one it was traced with."""
    graph = build_encoder(make_settings(runtime="torch")).load()
    eager = build_encoder(make_settings(runtime="torch", cpu_graph=False)).load()
    assert isinstance(graph._runner, torch.jit.ScriptModule) and graph._graph == "torchscript" and graph.runtime == "torch"
    assert eager._runner is eager._net and eager._graph == "eager"
    assert eager.fingerprint == graph.fingerprint == mobilenet.fingerprint
    for n in (1, 5, 17):
        x = images(n, seed=n)
        a, b = graph.embed(x), eager.embed(x)
        assert a.shape == (n, 512)
        assert np.abs(a - b).max() < 1e-4
