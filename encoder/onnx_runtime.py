"""The encoder's forward pass on ONNX Runtime's CPU provider.

Why: on a CPU, ONNX Runtime runs these CNNs several times faster than torch (a frozen
TorchScript graph), measured side by side (docs/performance.md). The network is exported
once per host and model (a file keyed by model version and weights fingerprint), checked
against torch at every load, and the caller falls back to torch if anything fails.

Nothing here is imported until a worker loads an encoder with ``runtime="onnxruntime"``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

OPSET = 17
INPUT, OUTPUT = "images", "vectors"
MIN_COSINE = 0.9999  # per vector, ORT against torch
_CHECK_BATCH = 3  # not the export's example batch of 2: proves the batch axis is dynamic


class OnnxUnavailable(RuntimeError):
    """The ONNX path cannot serve this network here; the message says why (the caller falls back)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cardigan" / "onnx"


def cache_path(cache_dir: Path, model_version: str, fingerprint: str) -> Path:
    """One file per model version and exact weights; the exporter's versions are in the name
    too, so an upgraded torch exports afresh instead of reusing an older graph."""
    tv = torch.__version__.split("+")[0]
    return cache_dir / f"{model_version}-{fingerprint}-torch{tv}-opset{OPSET}.onnx"


def export(net: nn.Module, path: Path, image_size: int) -> None:
    """Export ``net`` (eval mode, CPU, float32) with a dynamic batch axis, atomically.

    Written to a temporary file in the same folder, then renamed: a worker process that
    loads while another exports sees the old file, the new one, or none, never half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, image_size, image_size)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # "legacy TorchScript-based ONNX export", tracer notes
            torch.onnx.export(
                net,
                (example,),
                tmp,
                dynamo=False,  # the TorchScript exporter: offline, about a second, no onnxscript
                opset_version=OPSET,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}},
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def session_options(threads: int) -> ort.SessionOptions:
    """``threads`` intra-op threads (``EncoderSettings.onnx_threads``, else the worker's share of
    the cores), one inter-op thread, ops in sequence."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: they share the cores with the
    # worker's fetch and decode threads.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only
    return so


def open_session(path: Path, threads: int) -> ort.InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def run(session: Any, batch: np.ndarray) -> np.ndarray:
    """N×3×S×S float32 (C-contiguous) → N×512 float32; ORT releases the GIL while it runs."""
    return session.run([OUTPUT], {INPUT: batch})[0]


def check_against(session: Any, net: nn.Module, image_size: int) -> float:
    """The lowest cosine between ORT's and torch's vectors on a few random images.

    Raises OnnxUnavailable below MIN_COSINE or on a wrong shape."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((_CHECK_BATCH, 3, image_size, image_size), dtype=np.float32)
    with torch.inference_mode():
        want = net(torch.from_numpy(x)).float().numpy()
    got = np.asarray(run(session, x), dtype=np.float32)
    if got.shape != want.shape:
        raise OnnxUnavailable(f"ONNX output has shape {got.shape}, torch {want.shape}")
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    worst = float(np.nan_to_num(cos, nan=-1.0).min())
    if not worst >= MIN_COSINE:
        raise OnnxUnavailable(f"ONNX output differs from torch: cosine {worst:.6f} < {MIN_COSINE}")
    return worst


def load_session(
    net: nn.Module, *, model_version: str, fingerprint: str, image_size: int, cache_dir: Path, threads: int
) -> tuple[Any, Path, bool]:
    """A checked ONNX Runtime session for ``net``: from the cache, else exported now.

    Returns (session, file, exported). A cached file that does not load or does not match
    torch is replaced (with a warning); a fresh export that fails raises OnnxUnavailable.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise OnnxUnavailable(f"onnxruntime is not installed ({e})") from e
    path = cache_path(cache_dir, model_version, fingerprint)
    if path.is_file():
        try:
            session = open_session(path, threads)
            check_against(session, net, image_size)
            return session, path, False
        except Exception as e:  # noqa: BLE001 -- a corrupt or stale cache file: export again
            log.warning("encoder.runtime=onnxruntime: cached %s is unusable (%s); exporting again", path, e)
    try:
        export(net, path, image_size)
        session = open_session(path, threads)
    except OnnxUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 -- any exporter or ORT failure: the caller runs torch
        raise OnnxUnavailable(f"export to {path} failed: {type(e).__name__}: {e}") from e
    check_against(session, net, image_size)
    return session, path, True
