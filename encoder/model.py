"""The embedding network: a CNN trunk plus the seed deck's small head.

Deck (deep ranking, VisNet): ImageNet backbone → FC 1024 → FC 512, L2-normalised, trained
with a triplet hinge loss on euclidean distances. The trunk is pooled globally instead of
flattened, so one head fits any input size and any backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_DIM = 512
HIDDEN_DIM = 1024
DROPOUT = 0.4

#: names the head's shape; part of every model version, so changing the head changes it
HEAD_SPEC = f"gap-fc{HIDDEN_DIM}-relu-drop{DROPOUT}-fc{EMBEDDING_DIM}-l2"


class EmbeddingNet(nn.Module):
    """trunk → global average pool → FC(feat→1024) → ReLU → Dropout(0.4) → FC(1024→512) → L2."""

    def __init__(self, trunk: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(feature_dim, HIDDEN_DIM)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(DROPOUT)
        self.fc2 = nn.Linear(HIDDEN_DIM, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×3×H×W normalised images → N×512 unit vectors (float32, even under autocast)."""
        x = self.pool(self.trunk(x)).flatten(1)
        x = self.dropout(self.relu(self.fc1(x)))
        # Normalise in float32: in fp16/bf16 the unit norm is only good to ~1e-3.
        return F.normalize(self.fc2(x).float(), dim=1)


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Initialise every parameter and buffer of ``module`` from ``generator`` alone.

    Why not torchvision's own init under ``torch.manual_seed``: that reads the global RNG
    (any other thread drawing from it during a load breaks the "same seed, same weights in
    every worker" promise) and uses ``normal_``, whose CPU kernel has a separate AVX2 code
    path (other machines, ARM included, can round differently). ``uniform_`` with a private
    generator is a serial, bit-reproducible stream. The scales follow torchvision's
    (Kaiming, fan-out, ReLU). Works on modules materialised with ``to_empty``: nothing is
    left uninitialised.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # torch's default Linear init, drawn from our generator.
            nn.init.kaiming_uniform_(m.weight, a=5**0.5, generator=generator)
            if m.bias is not None:
                bound = 1 / m.in_features**0.5
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if m.track_running_stats:
                m.reset_running_stats()
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            # A new backbone with a layer we do not know: refuse rather than leave garbage.
            raise NotImplementedError(f"init_weights: no seeded init for {name or 'module'} ({type(m).__name__})")


def calibrate_random(net: EmbeddingNet, generator: torch.Generator, size: int, n: int = 8) -> None:
    """Data-dependent init of a randomly initialised net, from seeded noise images.

    Why: a random torchvision trunk in eval mode has BatchNorm statistics of (0, 1) that
    match nothing, so activations vanish (mobilenet_v3_small pools to ~1e-9, efficientnet
    to ~1e-14) and the head's bias alone decides the output: every image gets the same
    vector. Here BatchNorm statistics are measured on ``n`` noise images, and the head's
    biases centre its outputs, so a random encoder still tells images apart (identical
    images → identical vectors, different images → different ones), which is what tests
    and demos need. The noise comes from ``uniform_`` (a serial, portable stream) and the
    pass runs in float64, so machine-specific rounding (thread split, SIMD width) stays far
    below float32 precision: every machine rounds to the same float32 weights.
    """
    noise = torch.empty(n, 3, 8, 8, dtype=torch.float64).uniform_(-1.7, 1.7, generator=generator)
    fine = torch.empty(n, 3, size, size, dtype=torch.float64).uniform_(-0.9, 0.9, generator=generator)
    x = F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) + fine

    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    net.double().eval()
    try:
        with torch.no_grad():
            for m in norms:  # only the norms train: no dropout, no stochastic depth
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one pass = this batch's statistics
                m.train()
            # One pass: the norms see batch statistics equal to the ones they keep.
            f = net.pool(net.trunk(x)).flatten(1)
            for m in norms:
                m.eval()
            h = net.fc1(f)
            net.fc1.bias -= h.mean(0)
            o = net.fc2(net.relu(net.fc1(f)))
            net.fc2.bias -= o.mean(0)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.float()
