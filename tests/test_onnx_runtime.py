"""encoder.runtime=onnxruntime: the same vectors as torch, an export cached per model, a loud
fallback to torch, and a worker that indexes with it. Real onnxruntime, small nets at 64 px."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cardigan.event import primary_key
from cardigan.imaging.crop import preprocess
from cardigan.ops.verify import Expected
from config.settings import EncoderSettings
from encoder import Encoder, build_encoder, onnx_runtime
from tests.harness import Namespace
from tests.test_encoder import images
from tests.test_index_e2e import add, converge

pytestmark = pytest.mark.usefixtures("torch_rng_isolated", "one_torch_thread")  # tests/conftest.py

SIZE = 64


def make(cache: Path, **kw: Any) -> Encoder:
    base: dict[str, Any] = {
        "backbone": "mobilenet_v3_small",
        "weights": "random",
        "image_size": SIZE,
        "device": "cpu",
        "onnx_cache_dir": str(cache),
    }
    return build_encoder(EncoderSettings(**(base | kw)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def on_torch(cache: Path) -> Encoder:
    return make(cache, runtime="torch").load()


@pytest.fixture(scope="module")
def on_ort(cache: Path) -> Encoder:
    return make(cache, runtime="onnxruntime").load()


def onnx_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.onnx"))


def test_settings_default_is_onnxruntime_and_torch_stays_available() -> None:
    assert EncoderSettings().runtime == "onnxruntime"
    assert EncoderSettings(runtime="torch").runtime == "torch"
    with pytest.raises(ValueError, match="runtime"):
        EncoderSettings(runtime="tensorrt")


def test_same_vectors_and_same_ranking_as_torch(on_torch: Encoder, on_ort: Encoder) -> None:
    assert on_ort.runtime == "onnxruntime" and on_torch.runtime == "torch"
    assert on_ort.model_version == on_torch.model_version  # the vectors are the same: so is their name
    x = images(24, seed=5)
    a, b = on_ort.embed(x), on_torch.embed(x)
    assert a.dtype == np.float32 and a.shape == (24, 512)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert (np.sum(a * b, axis=1) >= 0.9999).all()
    # search: every image as a query against the others, top 5 in the same order
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -2)
    np.fill_diagonal(sb, -2)
    top_a, top_b = np.argsort(-sa, axis=1)[:, :5], np.argsort(-sb, axis=1)[:, :5]
    assert np.array_equal(top_a, top_b)


def test_batch_sizes_other_than_the_export_and_empty(on_ort: Encoder, on_torch: Encoder) -> None:
    for n in (1, 7, 33):
        x = images(n, seed=n)
        assert (np.sum(on_ort.embed(x) * on_torch.embed(x), axis=1) >= 0.9999).all()
    assert on_ort.embed(torch.empty(0, 3, SIZE, SIZE)).shape == (0, 512)
    with pytest.raises(ValueError, match="image_size"):
        on_ort.embed(torch.zeros(2, 3, SIZE + 1, SIZE + 1))


def test_session_threads_follow_the_split_unless_set(on_ort: Encoder, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's share of the cores (OMP_NUM_THREADS, set by `cardigan worker -p N`) is
    torch's thread count, and ONNX Runtime's unless ``onnx_threads`` says otherwise."""
    so = on_ort._ort.get_session_options()
    assert so.intra_op_num_threads == torch.get_num_threads() == 1  # one_torch_thread
    assert so.inter_op_num_threads == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # a share of 4 cores
    assert make(cache).load()._ort.get_session_options().intra_op_num_threads == 4
    assert make(cache, onnx_threads=3).load()._ort.get_session_options().intra_op_num_threads == 3
    with pytest.raises(ValueError, match="onnx_threads"):
        EncoderSettings(onnx_threads=-1)


def test_export_is_cached_per_model_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    exports: list[Path] = []
    real = onnx_runtime.export
    monkeypatch.setattr(onnx_runtime, "export", lambda net, path, size: (exports.append(path), real(net, path, size)))
    caplog.set_level(logging.INFO, "encoder")
    first = make(tmp_path).load()
    (path,) = onnx_files(tmp_path)
    assert exports == [path] and first.model_version in path.name and first.fingerprint in path.name
    stamp = path.stat().st_mtime_ns
    second = make(tmp_path).load()  # another worker process on this host, same model
    assert exports == [path] and path.stat().st_mtime_ns == stamp
    assert second.runtime == "onnxruntime" and f"reusing {path}" in caplog.text
    other = make(tmp_path, seed=1).load()  # another model: its own file
    assert other.model_version != first.model_version and len(exports) == 2 and len(onnx_files(tmp_path)) == 2
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize("damage", ["garbage", "another model"])
def test_a_bad_cache_file_is_exported_again_loudly(
    tmp_path: Path, damage: str, on_torch: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    path = onnx_runtime.cache_path(tmp_path, on_torch.model_version, on_torch.fingerprint or "")
    if damage == "garbage":
        path.write_bytes(b"\x08\x07not an onnx file")
    else:  # a valid graph, wrong weights: only the check against torch can tell
        make(tmp_path, seed=3).load()
        (onnx_files(tmp_path)[0]).rename(path)
    caplog.set_level(logging.INFO, "encoder")
    enc = make(tmp_path).load()
    assert "is unusable" in caplog.text and f"exported to {path}" in caplog.text
    assert enc.runtime == "onnxruntime"
    x = images(4, seed=9)
    assert (np.sum(enc.embed(x) * on_torch.embed(x), axis=1) >= 0.9999).all()


def test_export_failure_falls_back_to_torch_loudly(tmp_path: Path, on_torch: Encoder, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file")
    enc = make(blocker / "onnx").load()
    assert enc.runtime == "torch" and enc._graph == "torchscript"
    assert "falling back to torch" in caplog.text and "a-file" in caplog.text
    x = images(3)
    assert np.array_equal(enc.embed(x), on_torch.embed(x))


def test_check_refuses_a_graph_of_another_network(tmp_path: Path, on_torch: Encoder) -> None:
    other = make(tmp_path, seed=4).load()
    assert other._net is not None and on_torch._net is not None
    with pytest.raises(onnx_runtime.OnnxUnavailable, match="cosine"):
        onnx_runtime.check_against(other._ort, on_torch._net, SIZE)
    assert onnx_runtime.check_against(other._ort, other._net, SIZE) >= 0.9999


@pytest.mark.cuda
def test_cuda_always_runs_torch(tmp_path: Path) -> None:
    enc = make(tmp_path, device="cuda", runtime="onnxruntime").load()
    assert enc.runtime == "torch" and not onnx_files(tmp_path)


@pytest.mark.e2e
def test_e2e_worker_indexes_on_onnxruntime(ns: Namespace, tmp_path: Path, on_torch: Encoder) -> None:
    """A worker on onnxruntime indexes events; its stored vectors are torch's, under the same version."""
    cache = tmp_path / "onnx-cache"
    w = ns.start_worker(extra_env={"CARDIGAN_ENCODER__RUNTIME": "onnxruntime", "CARDIGAN_ENCODER__ONNX_CACHE_DIR": str(cache)})
    assert len(onnx_files(cache)) == 1  # the worker exported at start
    events = [add(ns, f"ort-{i}", 1, 2) for i in range(4)]
    ns.publish(events)
    converge(ns, {e["product_id"]: Expected(1, 2, model_version=on_torch.model_version) for e in events})
    s = ns.settings.encoder
    assert s.image_size == SIZE and s.backbone == "mobilenet_v3_small"  # tests/harness.py: what on_torch is
    rows = ns.index().get([primary_key("ort-0", 0)], ["embedding", "model_version"])
    assert rows and rows[0]["model_version"] == on_torch.model_version
    uri = events[0]["images"][0]["uri"]
    data = ns.s3().get_object(Bucket=ns.settings.bucket, Key=uri.split("/", 3)[3])["Body"].read()
    x, _ = preprocess(data, None, size=SIZE, max_pixels=ns.settings.limits.max_image_pixels)
    want = on_torch.embed(x.unsqueeze(0))[0]
    assert float(np.dot(np.asarray(rows[0]["embedding"], dtype=np.float32), want)) >= 0.9999
    assert w.alive() and "falling back to torch" not in w.log_text()
