"""The embedding network: a CNN trunk plus the seed deck's small head.

Deck (deep ranking, VisNet): ImageNet backbone → FC 1024 → FC 512, L2-normalised, trained
with a triplet hinge loss on euclidean distances. The trunk is pooled globally instead of
flattened, so one head fits any input size and any backbone.
"""

from __future__ import annotations

import math

import numpy as np
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


def _uniform(rng: np.random.Generator, shape: torch.Size, bound: float) -> torch.Tensor:
    """U(-bound, bound) as float32, the same bits on every machine.

    numpy's PCG64 stream is portable, and one multiply and one subtract in float64 are
    correctly rounded whatever the SIMD width; torch's ``uniform_`` is not (its vectorised
    kernels differ between AVX2, AVX-512 and plain builds in the last bits)."""
    u = rng.random(tuple(shape), dtype=np.float64)
    return torch.from_numpy((u * 2.0 - 1.0) * bound).float()


def _snap(t: torch.Tensor, scale: torch.Tensor, bits: int = 12) -> None:
    """Round ``t`` in place to a grid of ``scale`` / 2**``bits`` (the step a power of two).

    Why: a float64 forward pass rounds differently on different CPUs (SIMD width, BLAS), by
    about 1e-15 relative, and a statistic that is mathematically zero comes out as pure noise
    (1e-17 on one machine, -3e-17 on another). On a grid this coarse (1 part in 4096 of the
    value's natural scale, far finer than anything a random net needs), noise rounds to zero
    and a real value lands on the same step everywhere: every machine keeps the same float32s.
    """
    _, exponent = torch.frexp(scale.double())  # exact, unlike log2: scale = m * 2**exponent, m in [0.5, 1)
    step = torch.ldexp(torch.ones_like(scale, dtype=torch.float64), exponent - 1 - bits)
    t.copy_(torch.round(t.double() / step) * step + 0.0)  # + 0.0: noise that rounds to -0.0 becomes +0.0


def _floor_scale(t: torch.Tensor) -> torch.Tensor:
    """|t|, but never below 2**-20 of its largest entry (dead channels stay on a coarse grid)."""
    a = t.double().abs()
    return a.clamp(min=float(a.max()) * 2.0**-20 or 1.0)


def init_weights(module: nn.Module, rng: np.random.Generator) -> None:
    """Initialise every parameter and buffer of ``module`` from ``rng`` alone.

    Why not torchvision's own init under ``torch.manual_seed``: that reads the global RNG
    (any other thread drawing from it during a load breaks the "same seed, same weights in
    every worker" promise), and torch's random kernels round differently on different CPUs
    (AVX2, AVX-512, ARM): workers on mixed hosts would build different nets from the same
    seed. numpy's generator gives the same bits everywhere. The scales follow torchvision's
    (Kaiming uniform, fan-out, ReLU for convolutions; torch's default for linear layers).
    Works on modules materialised with ``to_empty``: nothing is left uninitialised.
    """
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.weight.shape[0] * m.weight[0][0].numel()
                m.weight.copy_(_uniform(rng, m.weight.shape, math.sqrt(2.0) * math.sqrt(3.0 / fan_out)))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                # torch's default Linear init (kaiming_uniform_ with a=sqrt(5)): bound 1/sqrt(fan_in)
                bound = 1.0 / math.sqrt(m.in_features)
                m.weight.copy_(_uniform(rng, m.weight.shape, bound))
                if m.bias is not None:
                    m.bias.copy_(_uniform(rng, m.bias.shape, bound))
            elif isinstance(m, nn.modules.batchnorm._NormBase):
                if m.affine:
                    m.weight.fill_(1.0)
                    m.bias.zero_()
                if m.track_running_stats:
                    m.reset_running_stats()
            elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                # A new backbone with a layer we do not know: refuse rather than leave garbage.
                raise NotImplementedError(f"init_weights: no seeded init for {name or 'module'} ({type(m).__name__})")


def calibrate_random(net: EmbeddingNet, rng: np.random.Generator, size: int, n: int = 8) -> None:
    """Data-dependent init of a randomly initialised net, from seeded noise images.

    Why: a random torchvision trunk in eval mode has BatchNorm statistics of (0, 1) that
    match nothing, so activations vanish (mobilenet_v3_small pools to ~1e-9, efficientnet
    to ~1e-14) and the head's bias alone decides the output: every image gets the same
    vector. Here BatchNorm statistics are measured on ``n`` noise images, and the head's
    biases centre its outputs, so a random encoder still tells images apart (identical
    images → identical vectors, different images → different ones), which is what tests
    and demos need. The noise comes from ``rng`` (portable), the pass runs in float64 and
    every value it sets is snapped to a coarse grid (:func:`_snap`): every machine
    ends with the same float32 weights.
    """
    coarse = torch.from_numpy(rng.uniform(-1.7, 1.7, size=(n, 3, 8, 8)))
    fine = torch.from_numpy(rng.uniform(-0.9, 0.9, size=(n, 3, size, size)))
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + fine

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
                _snap(m.running_var, _floor_scale(m.running_var))
                _snap(m.running_mean, torch.sqrt(m.running_var + m.eps))
            f = net.pool(net.trunk(x)).flatten(1)  # with the snapped statistics
            h = net.fc1(f)
            net.fc1.bias -= h.mean(0)
            _snap(net.fc1.bias, _floor_scale(net.fc1.bias))
            o = net.fc2(net.relu(net.fc1(f)))
            net.fc2.bias -= o.mean(0)
            _snap(net.fc2.bias, _floor_scale(net.fc2.bias))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.float()
