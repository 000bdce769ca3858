"""Training the embedding net with the seed deck's triplet hinge loss, sized for a CPU.

Deep ranking (the deck, VisNet): for a query photo q of a product, a positive p (another
photo of the same product) and a negative n (a photo of another product), minimise
``max(0, g + D(q, p) - D(q, n))`` with D the euclidean distance between unit embeddings.
Here a batch holds ``batch`` products with two photos each, and every photo is an anchor
once; its negative is mined in the batch (semi-hard by default), so one forward pass of
2·batch images yields 2·batch triplets. Products with a category (the event's
``attributes.category``) come in small same-category groups, and an anchor's negative is mined
among its own category's products when the batch has any: the look-alikes a search must tell apart.

A run is a fixed number of steps, so its result does not depend on the machine's load; it
saves its state (model, optimiser, step, RNG) every ``save_every`` steps and ``resume`` picks it
up, giving the same checkpoint as a run that was never interrupted. Photos come in as bytes
(:class:`Photo`): the catalog sources (manifest, index, S3 prefix) live in
``cardigan.ops.trainset``.

Train and index see the same pixels: every photo goes through the caller's ``prepare``
(:data:`Prepare`; ``cardigan.ops.trainset.prepare_photo`` is the worker's own decode → crop → resize),
so this package imports nothing from ``cardigan``. Every photo gets random crops, flips and colour jitter
(``torchvision.transforms.v2``); a product with one photo is paired with an augmented copy.

CPU budget: training runs on small crops (``train_size``, e.g. 96 px, while workers embed at
224: global pooling makes the net size-agnostic) and starts by re-measuring BatchNorm
statistics on real photos. The first ``freeze`` trunk blocks can be frozen, and then their
output is computed once per photo and view (``views`` augmented copies) instead of at every
step. Measured on a busy 2-core CPU, a minute of full fine-tuning beat freezing 4 blocks and
training the head alone, and batches of 32 products beat twice as many steps of 16.

The result is one :func:`encoder.save_checkpoint` file holding the whole net, BatchNorm
running statistics included (re-measured on training photos after the last step), so
``CARDIGAN_ENCODER__WEIGHTS=<path>`` is all a worker needs; its model version names the
checkpoint's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from torch import nn
from torchvision.transforms import v2

from config.settings import EncoderSettings, LimitSettings
from encoder.checkpoint import save_checkpoint
from encoder.encoder import Encoder, model_version_for
from encoder.model import EMBEDDING_DIM, EmbeddingNet
from encoder.normalise import IMAGENET_MEAN, IMAGENET_STD

Mining = Literal["semihard", "hardest", "all"]
HIT_KS = (1, 5)
TRAIN_PREFIX = "train"  # product ids of the training catalog: never the demo's "demo-…"
_EMBED_BATCH = 64
_BN_IMAGES = 512  # training photos that re-measure the BatchNorm statistics after training
_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


Prepare = Callable[[bytes, Sequence[float] | None, int, int], torch.Tensor | None]
"""(photo bytes, bbox, size, max_pixels) -> the normalised CHW crop a worker would embed, or None
for a photo the worker would reject. The callers (``cardigan.ops.trainset.prepare_photo``) supply
the workers' own decode → crop → resize, so train and index see the same pixels, and the encoder
package needs nothing from ``cardigan``."""


class Photo(Protocol):
    """One photo: encoded bytes and where the product is (None: crop like the worker does)."""

    @property
    def data(self) -> bytes: ...

    @property
    def bbox(self) -> Sequence[float] | None: ...


class Product(Protocol):
    """A product and its photos (``SyntheticProduct`` fits, and so does :class:`TrainProduct`)."""

    @property
    def product_id(self) -> str: ...

    @property
    def images(self) -> Sequence[Photo]: ...


@dataclass(frozen=True)
class TrainProduct:
    """A training product from any source: photos of one product, at least one; ``category``
    (the event's ``attributes.category``) steers negative mining to look-alike products."""

    product_id: str
    images: Sequence[Photo]
    category: str | None = None


def category_of(product: Product) -> str | None:
    """The product's category when it has one (SyntheticProduct and TrainProduct may)."""
    cat = getattr(product, "category", None)
    return str(cat) if cat else None


@dataclass
class TrainReport:
    """What a training run did and how retrieval on held-out products changed."""

    backbone: str
    image_size: int  # what workers embed at, and the held-out set is measured at
    train_size: int  # the crops trained on
    products: int  # training products
    photos: int  # training photos (after preprocessing; skipped ones are counted apart)
    skipped_photos: int
    heldout_products: int
    steps: int
    batch: int
    lr: float
    margin: float
    freeze: int
    seed: int
    losses: list[float]  # one per step
    active: list[float]  # share of triplets with a non-zero loss, per step
    hit_before: dict[int, float]  # k -> hit@k on the held-out queries, untrained net
    hit_after: dict[int, float]
    stopped_by: Literal["steps", "time budget", "paused"]
    prep_s: float  # decode/crop/augment/cache
    train_s: float  # optimisation steps and the BatchNorm re-measurement
    eval_s: float  # held-out retrieval, before and after
    total_s: float
    resumed_from: int = 0  # the step a --resume run started at (0: from the start)
    state: Path | None = None  # the resumable training state (model, optimiser, step, RNG)
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None
    model_version: str | None = None
    net: EmbeddingNet | None = field(default=None, repr=False, compare=False)  # the trained net, in eval mode

    def summary(self) -> str:
        """One line: hit@k before → after, steps and time."""
        hits = ", ".join(f"hit@{k} {self.hit_before.get(k, float('nan')):.0%} → {self.hit_after.get(k, float('nan')):.0%}" for k in HIT_KS)
        return (
            f"{hits} on {self.heldout_products} held-out products; {self.steps} steps of {self.batch} triplet pairs "
            f"in {self.train_s:.0f}s ({self.total_s:.0f}s in all) on {self.products} products"
        )


# --------------------------------------------------------------------------- data


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """A normalised crop back to its 8-bit pixels (exact: the crop was 8-bit before)."""
    return (x.unsqueeze(0) * _STD + _MEAN).mul_(255).round_().clamp_(0, 255).to(torch.uint8)[0]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """N×3×S×S uint8 or [0, 1] float → what the net takes (the worker's ImageNet mean/std)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return (x - _MEAN) / _STD


def _preprocess_all(photos: Sequence[Photo], prepare: Prepare, size: int, max_pixels: int, workers: int = 2) -> list[torch.Tensor | None]:
    """Each photo through ``prepare`` (the worker's preprocessing); None for a photo the worker would reject."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL releases the GIL
        return list(pool.map(lambda p: prepare(p.data, p.bbox, size, max_pixels), photos))


def make_augment(size: int) -> v2.Transform:
    """Random crop, flip and brightness/contrast/saturation jitter of one uint8 crop: what
    differs between two photos of one product (framing, side, lighting)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.55, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            # No hue jitter: colour is much of what tells products apart, and on the CPU the
            # hue shift alone cost more than the crops, flips and other jitter together.
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ]
    )


def _augmented(images: torch.Tensor, augment: v2.Transform) -> torch.Tensor:
    """A normalised float batch of augmented copies (the global torch RNG draws the crops)."""
    return _normalise(torch.stack([augment(img) for img in images]))


# --------------------------------------------------------------------------- model pieces


def build_net(settings: EncoderSettings) -> EmbeddingNet:
    """The net exactly as a worker's Encoder builds it (seeded init and BN calibration for
    random weights, a pretrained trunk, or a checkpoint), on the CPU in float32."""
    return Encoder(settings)._build()  # same package: one build path for train and serve


@contextlib.contextmanager
def _trunk_from(net: EmbeddingNet, start: int) -> Iterator[None]:
    """Run ``net`` from trunk block ``start`` on (inputs: cached block outputs).

    Swaps in a slice sharing the same modules, so :meth:`EmbeddingNet.forward` is reused as is
    and the state_dict keys are untouched once restored.
    """
    if start == 0:
        yield
        return
    trunk = net.trunk
    assert isinstance(trunk, nn.Sequential)
    net.trunk = trunk[start:]
    try:
        yield
    finally:
        net.trunk = trunk


def _trunk_blocks(net: EmbeddingNet) -> int:
    return len(net.trunk) if isinstance(net.trunk, nn.Sequential) else 1


def _norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _embed(net: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Embeddings of a normalised batch, in eval mode, in chunks (memory stays flat)."""
    net.eval()
    out = [net(x[i : i + _EMBED_BATCH].to(device)).float().cpu() for i in range(0, len(x), _EMBED_BATCH)]
    return torch.cat(out) if out else torch.empty(0, EMBEDDING_DIM)


@torch.no_grad()
def _remeasure_batchnorm(net: EmbeddingNet, x: torch.Tensor, batch: int, device: torch.device) -> None:
    """BatchNorm running statistics as the plain average over training batches ("precise BN").

    The running averages kept during training trail the weights (momentum 0.1 over the last
    few dozen steps); the checkpoint should carry statistics of the final weights.
    """
    norms = _norms(net)
    momenta = [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch below
        m.train()
    try:
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            if len(chunk) > 1:
                net(chunk.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        net.eval()


# --------------------------------------------------------------------------- loss


def triplet_loss(
    emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    mining: Mining = "semihard",
    categories: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Mean of ``max(0, g + D(a, p) - D(a, n))`` over anchors; the share of active triplets.

    ``emb`` is 2B unit rows, row i and row i+B are the two photos of one product (each the
    other's positive); negatives are the rows of other products. Mining picks, per anchor:
    ``semihard``: the closest negative farther than the positive (FaceNet), else the farthest;
    ``hardest``: the closest negative; ``all``: every negative, averaged over active triplets.
    ``categories`` (one integer per row, -1: none): the negative is taken from the anchor's own
    category when one there qualifies (``semihard``: farther than the positive; ``hardest``: any),
    so a cardigan learns against other cardigans, not shoes; otherwise from every other product.
    (Semi-hard falls back to the whole batch, not to a too-hard negative of the category: with a
    few look-alikes per batch that fallback collapsed the embeddings in our runs.)
    """
    n = emb.shape[0]
    half = n // 2
    # Euclidean distance of unit vectors: sqrt(2 - 2cos); clamped so the gradient stays finite.
    dist = (2 - 2 * emb @ emb.T).clamp_min(1e-12).sqrt()
    idx = torch.arange(n, device=emb.device)
    pos = dist[idx, (idx + half) % n]
    neg_mask = labels.view(-1, 1) != labels.view(1, -1)
    preferred = None
    if categories is not None and mining != "all":
        same = (categories.view(-1, 1) == categories.view(1, -1)) & (categories.view(-1, 1) >= 0)
        preferred = neg_mask & same
    big = torch.finfo(dist.dtype).max
    if mining == "all":
        losses = F.relu(margin + pos.view(-1, 1) - dist)[neg_mask]
        active = losses > 0
        loss = losses[active].mean() if active.any() else losses.sum() * 0
        return loss, float(active.float().mean())
    if mining == "hardest":
        pool = neg_mask if preferred is None else torch.where(preferred.any(1, keepdim=True), preferred, neg_mask)
        d_an = dist.masked_fill(~pool, big).min(1).values
    elif mining == "semihard":
        farther = neg_mask & (dist > pos.view(-1, 1))
        if preferred is not None:  # a semi-hard look-alike first, else the whole batch's rule
            farther_own = farther & preferred
            farther = torch.where(farther_own.any(1, keepdim=True), farther_own, farther)
        outside = dist.masked_fill(~farther, big).min(1).values
        inside = dist.masked_fill(~neg_mask, -big).max(1).values
        d_an = torch.where(farther.any(1), outside, inside)
    else:
        raise ValueError(f"mining must be semihard, hardest or all, not {mining!r}")
    losses = F.relu(margin + pos - d_an)
    return losses.mean(), float((losses > 0).float().mean())


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalSet:
    """Held-out retrieval: street-photo queries against every catalog photo of their products."""

    gallery: torch.Tensor  # normalised crops
    gallery_products: list[int]
    queries: torch.Tensor
    query_products: list[int]
    n_products: int
    query_self: list[int] | None = None  # per query, its own row in the gallery (left out of its ranking)


def make_eval_set(products: Sequence[Product], prepare: Prepare, size: int, max_pixels: int, workers: int = 2) -> EvalSet:
    """Queries from :func:`devkit.catalog.query_photo` (a new street photo of each product)."""
    from devkit.catalog import SyntheticProduct, query_photo

    synthetic = [p for p in products if isinstance(p, SyntheticProduct)]
    if len(synthetic) != len(products):
        raise TypeError("held-out products must be SyntheticProducts: their query photos are rendered with catalog.query_photo")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queries = list(pool.map(query_photo, synthetic))
    photos = [img for p in products for img in p.images]
    owners = [i for i, p in enumerate(products) for _ in p.images]
    crops = _preprocess_all([*photos, *queries], prepare, size, max_pixels, workers)
    g = [(c, o) for c, o in zip(crops[: len(photos)], owners, strict=True) if c is not None]
    q = [(c, i) for i, c in enumerate(crops[len(photos) :]) if c is not None]
    empty = torch.empty(0, 3, size, size)
    return EvalSet(
        gallery=torch.stack([c for c, _ in g]) if g else empty,
        gallery_products=[o for _, o in g],
        queries=torch.stack([c for c, _ in q]) if q else empty,
        query_products=[i for _, i in q],
        n_products=len(products),
    )


def make_heldout_set(products: Sequence[Product], prepare: Prepare, size: int, max_pixels: int, workers: int = 2) -> EvalSet:
    """Held-out retrieval for catalog products of any source, leave one out: every photo of a
    product with two or more photos queries the gallery of all held-out photos but itself, and
    must find its product through another of its photos (what a shopper's new photo meets in
    the index). A product with one photo is only a distractor."""
    photos = [img for p in products for img in p.images]
    owners = [i for i, p in enumerate(products) for _ in p.images]
    crops = _preprocess_all(photos, prepare, size, max_pixels, workers)
    kept = [(c, o) for c, o in zip(crops, owners, strict=True) if c is not None]
    count: dict[int, int] = {}
    for _, o in kept:
        count[o] = count.get(o, 0) + 1
    selves = [j for j, (_, o) in enumerate(kept) if count[o] > 1]
    empty = torch.empty(0, 3, size, size)
    gallery = torch.stack([c for c, _ in kept]) if kept else empty
    return EvalSet(
        gallery=gallery,
        gallery_products=[o for _, o in kept],
        queries=gallery[selves] if selves else empty,
        query_products=[kept[j][1] for j in selves],
        n_products=len(products),
        query_self=selves,
    )


def heldout_set(products: Sequence[Product], prepare: Prepare, size: int, max_pixels: int, workers: int = 2) -> EvalSet:
    """Synthetic products are queried with a new street photo; any other products with one of their own."""
    from devkit.catalog import SyntheticProduct

    if products and all(isinstance(p, SyntheticProduct) for p in products):
        return make_eval_set(products, prepare, size, max_pixels, workers)
    return make_heldout_set(products, prepare, size, max_pixels, workers)


def hit_rates(net: nn.Module, ev: EvalSet, device: torch.device, ks: Sequence[int] = HIT_KS) -> dict[int, float]:
    """Share of queries whose product is among the ``k`` best products (best photo per product),
    ranked like :func:`cardigan.ops.query.search_image` ranks the index."""
    if not len(ev.queries) or not len(ev.gallery):
        return {k: float("nan") for k in ks}
    sims = _embed(net, ev.queries, device) @ _embed(net, ev.gallery, device).T  # cosine: unit rows
    if ev.query_self is not None:
        sims[torch.arange(len(ev.queries)), torch.tensor(ev.query_self)] = -2.0  # a query never finds itself
    per_product = torch.full((len(ev.queries), ev.n_products), -2.0)
    owners = torch.tensor(ev.gallery_products)
    per_product.scatter_reduce_(1, owners.expand(len(ev.queries), -1), sims, reduce="amax")
    truth = torch.tensor(ev.query_products)
    rank = (per_product > per_product[torch.arange(len(truth)), truth].unsqueeze(1)).sum(1)  # 0: first
    return {k: float((rank < k).float().mean()) for k in ks}


# --------------------------------------------------------------------------- training


def train_triplets(
    settings: EncoderSettings,
    products: Sequence[Product],
    *,
    heldout: Sequence[Product] = (),
    steps: int = 1000,
    batch: int = 32,
    lr: float = 5e-3,
    margin: float = 0.2,
    seed: int = 0,
    time_budget_s: float | None = None,
    out: str | Path | None = None,
    freeze: int = 0,
    recalibrate: bool | None = None,
    views: int = 4,
    mining: Mining = "semihard",
    weight_decay: float = 1e-4,
    log_every: int = 20,
    max_pixels: int | None = None,
    train_size: int | None = None,
    console: Console | None = None,
    state: str | Path | None = None,
    save_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    same_category: bool = True,
    trunk_lr: float | None = None,
    prepare: Prepare | None = None,
) -> TrainReport:
    """Train the net ``settings`` describes on ``products`` with the triplet hinge loss.

    Runs ``steps`` optimisation steps (cosine learning rate over them). Deterministic for a
    seed on the CPU: every random draw comes from ``seed``, and the global torch RNG is restored
    afterwards. ``time_budget_s`` (not the default) also stops at a wall clock, and then the
    result depends on the machine's load. ``heldout`` products are measured before and after:
    recall@1 and @5 of a query photo (:func:`heldout_set`). ``out``: where the checkpoint goes
    (nothing is written without it). ``train_size``: train on crops this big (default
    ``settings.image_size``, the size workers embed at and the held-out set is measured at):
    global pooling makes the net size-agnostic, and small crops train several times faster.

    Resumable: with ``state`` (a file) and ``save_every`` > 0 the model, optimiser, step, losses
    and both RNG states are saved every ``save_every`` steps (and when ``stop_after`` pauses the
    run); ``resume`` continues from that file, and the result equals an uninterrupted run.
    ``same_category``: batches group products of one category and negatives are mined there.

    From trained weights (ImageNet or a checkpoint: ``settings.weights`` is not ``random``) the
    trunk fine-tunes gently: its BatchNorm statistics stay as they are (no recalibration, norms
    in eval mode while training) and its learning rate is ``trunk_lr`` × ``lr`` (default 0.1);
    the new head learns at ``lr``. From random weights everything trains at ``lr`` and the
    BatchNorm statistics are measured on the training photos (``recalibrate``).
    """
    t_start = time.perf_counter()
    console = console or Console(stderr=True)
    if prepare is None:
        raise TypeError("train_triplets needs prepare=: the workers' decode → crop → resize (cardigan.ops.trainset.prepare_photo)")
    plan = _plan(
        settings, products, steps=steps, batch=batch, lr=lr, margin=margin, seed=seed, freeze=freeze, recalibrate=recalibrate,
        views=views, mining=mining, weight_decay=weight_decay, max_pixels=max_pixels, train_size=train_size, state=state,
        resume=resume, same_category=same_category, trunk_lr=trunk_lr,
    )  # fmt: skip
    net, device = plan.net, plan.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and the augmentations draw from the global RNG
        rng = random.Random(f"train:{seed}")
        t = time.perf_counter()
        with console.status("preparing training photos…"):
            data = _prepare_data(plan.usable, prepare, plan.tsize, plan.max_pixels, batch=batch, same_category=same_category)
            ev = heldout_set(heldout, prepare, plan.size, plan.max_pixels) if heldout else None
            augment = make_augment(plan.tsize)
            net.to(device)
        prep_s = time.perf_counter() - t

        t = time.perf_counter()
        with _status(console, ev is not None, f"measuring recall@k on {len(heldout)} held-out products…"):
            before = hit_rates(net, ev, device) if ev else {}
        eval_s = time.perf_counter() - t

        t = time.perf_counter()
        with console.status("calibrating and caching…"):
            cache = _calibrate_and_cache(net, data, rng, augment, recalibrate=plan.recalibrate, freeze=freeze, views=views, device=device)
        prep_s += time.perf_counter() - t

        t = time.perf_counter()
        loop = _train(
            plan, data, cache, augment, rng, console, settings=settings, steps=steps, lr=lr, margin=margin, mining=mining, views=views,
            weight_decay=weight_decay, freeze=freeze, time_budget_s=time_budget_s, stop_after=stop_after, log_every=log_every,
            save_every=save_every, resume=resume,
        )  # fmt: skip
        train_s = time.perf_counter() - t
        net.requires_grad_(True)
        net.eval()

        t = time.perf_counter()
        paused = loop.stopped_by == "paused"
        with _status(console, ev is not None and not paused, f"measuring recall@k on {len(heldout)} held-out products…"):
            after = hit_rates(net, ev, device) if ev and not paused else {}
        eval_s += time.perf_counter() - t

    report = _report(
        settings, plan, data, loop, heldout=heldout, lr=lr, margin=margin, freeze=freeze, seed=seed, before=before, after=after,
        prep_s=prep_s, train_s=train_s, eval_s=eval_s,
    )  # fmt: skip
    if out is not None and not paused:
        _save(report, net, settings, out)
    report.total_s = round(time.perf_counter() - t_start, 2)
    report.net = net
    return report


@dataclass
class _Plan:
    """A run's checked arguments and the net it starts from (built before the run's RNG fork)."""

    usable: list[Product]
    size: int  # the size workers embed at, and the held-out set is measured at
    tsize: int  # the size training crops are
    max_pixels: int
    device: torch.device
    net: EmbeddingNet
    pretrained: bool
    recalibrate: bool
    trunk_lr: float
    run_id: str
    state_path: Path | None


@dataclass
class _Data:
    """Training photos as the worker crops them (8-bit), and how they group into products and categories."""

    images: torch.Tensor  # N×3×S×S uint8
    by_product: dict[int, list[int]]  # product -> rows of images
    product_ids: list[int]
    skipped: int  # photos the worker would reject
    pairs_per_step: int
    product_cat: dict[int, int]  # product -> category code, -1 without one
    by_category: dict[int, list[int]]
    grouped: bool  # batches come in same-category groups


@dataclass
class _Loop:
    """What the optimisation loop did."""

    losses: list[float]
    actives: list[float]
    start: int  # the step it resumed from
    stopped_by: Literal["steps", "time budget", "paused"]


def _plan(
    settings: EncoderSettings, products: Sequence[Product], *, steps: int, batch: int, lr: float, margin: float, seed: int,
    freeze: int, recalibrate: bool | None, views: int, mining: Mining, weight_decay: float, max_pixels: int | None,
    train_size: int | None, state: str | Path | None, resume: bool, same_category: bool, trunk_lr: float | None,
) -> _Plan:  # fmt: skip
    """Check the arguments, build the starting net and name the run (its state file says which run it is)."""
    if batch < 2:
        raise ValueError("batch must be at least 2 products (a triplet needs another product's photo)")
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if resume and state is None:
        raise ValueError("resume needs the state file to resume from")
    usable = [p for p in products if len(p.images) > 0]
    if len(usable) < 2:
        raise ValueError(f"training needs at least 2 products with photos, got {len(usable)}")
    size = settings.image_size
    tsize = train_size or size
    max_pixels = max_pixels or LimitSettings().max_image_pixels
    encoder = Encoder(settings)
    device = encoder.device
    net = build_net(settings)
    blocks = _trunk_blocks(net)
    if not 0 <= freeze <= blocks:
        raise ValueError(f"freeze must be 0..{blocks} trunk blocks for {settings.backbone} ({blocks}: train the head only), got {freeze}")
    state_path = Path(state) if state is not None else None
    pretrained = settings.weights != "random"
    if recalibrate is None:
        recalibrate = not pretrained
    if trunk_lr is None:
        trunk_lr = 0.1 if pretrained else 1.0
    run_id = _run_id(
        settings, usable, steps, batch, lr, margin, seed, freeze, views, mining, weight_decay, tsize, same_category, recalibrate, trunk_lr
    )
    return _Plan(usable, size, tsize, max_pixels, device, net, pretrained, recalibrate, trunk_lr, run_id, state_path)


def _prepare_data(usable: Sequence[Product], prepare: Prepare, tsize: int, max_pixels: int, *, batch: int, same_category: bool) -> _Data:
    """Every photo cropped exactly like the worker crops it, grouped by product and category."""
    photos = [img for p in usable for img in p.images]
    owners = [i for i, p in enumerate(usable) for _ in p.images]
    crops = _preprocess_all(photos, prepare, tsize, max_pixels)
    kept = [(c, o) for c, o in zip(crops, owners, strict=True) if c is not None]
    skipped = len(crops) - len(kept)
    by_product: dict[int, list[int]] = {}
    for j, (_, o) in enumerate(kept):
        by_product.setdefault(o, []).append(j)
    product_ids = sorted(by_product)
    if len(product_ids) < 2:
        raise ValueError(f"fewer than 2 products have a usable photo ({skipped} of {len(crops)} photos failed to decode or crop)")
    images = torch.stack([_to_uint8(c) for c, _ in kept])
    pairs_per_step = min(batch, len(product_ids))
    names = sorted({c for p in usable if (c := category_of(p))})
    cat_code = {c: i for i, c in enumerate(names)}
    product_cat = {i: cat_code.get(category_of(usable[i]) or "", -1) for i in product_ids}
    by_category: dict[int, list[int]] = {}
    for i in product_ids:
        if product_cat[i] >= 0:
            by_category.setdefault(product_cat[i], []).append(i)
    grouped = same_category and any(len(v) > 1 for v in by_category.values())
    return _Data(images, by_product, product_ids, skipped, pairs_per_step, product_cat, by_category, grouped)


def _calibrate_and_cache(
    net: EmbeddingNet,
    data: _Data,
    rng: random.Random,
    augment: v2.Transform,
    *,
    recalibrate: bool,
    freeze: int,
    views: int,
    device: torch.device,
) -> torch.Tensor | None:
    """BatchNorm statistics of real photos (``recalibrate``); the frozen blocks' output per photo and view."""
    if recalibrate:
        # BatchNorm statistics of real photos at the training size, not of the noise a
        # random net was calibrated on: the first steps then start from sane activations.
        sample = rng.sample(range(len(data.images)), min(_BN_IMAGES, len(data.images)))
        _remeasure_batchnorm(net, _normalise(data.images[sample]), 2 * data.pairs_per_step, device)
    # ---- frozen blocks: their output, once per photo and view (view 0: the plain crop)
    if not freeze:
        return None
    assert isinstance(net.trunk, nn.Sequential)
    prefix = net.trunk[:freeze]
    prefix.requires_grad_(False)
    return _cache_prefix(prefix, data.images, augment, views, device)


def _optimiser(net: EmbeddingNet, *, lr: float, trunk_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the trunk at ``trunk_lr`` × ``lr``, the head at ``lr``."""
    trunk_ids = {id(p) for p in net.trunk.parameters()}
    groups = [
        {"params": [p for p in net.parameters() if p.requires_grad and id(p) in trunk_ids], "lr_scale": trunk_lr},
        {"params": [p for p in net.parameters() if p.requires_grad and id(p) not in trunk_ids], "lr_scale": 1.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def _train_loop(
    plan: _Plan, data: _Data, cache: torch.Tensor | None, augment: v2.Transform, opt: torch.optim.Optimizer, rng: random.Random,
    progress: Progress, task: TaskID, *, steps: int, start: int, losses: list[float], actives: list[float], lr: float,
    margin: float, mining: Mining, views: int, time_budget_s: float | None, stop_after: int | None, log_every: int,
    save_every: int, t: float,
) -> _Loop:  # fmt: skip
    """The optimisation steps, from ``start``: cosine learning rate after a short warm-up, a
    mined triplet loss per batch, the state saved every ``save_every`` steps."""
    net, device, state_path = plan.net, plan.device, plan.state_path
    warmup = max(1, min(20, steps // 10))
    stopped_by: Literal["steps", "time budget", "paused"] = "steps"
    pair_labels = torch.arange(data.pairs_per_step).repeat(2).to(device)
    for step in range(start, steps):
        elapsed = time.perf_counter() - t
        if time_budget_s is not None and elapsed >= time_budget_s:
            stopped_by = "time budget"
            break
        if stop_after is not None and step - start >= stop_after:
            stopped_by = "paused"
            break
        done = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        for group in opt.param_groups:
            group["lr"] = lr * scale * group["lr_scale"]
        chosen = _choose(rng, data.product_ids, data.by_category, data.product_cat, data.pairs_per_step, data.grouped)
        x = _batch(rng, data.by_product, chosen, data.images, cache, augment, views)
        cats = torch.tensor([data.product_cat[i] for i in chosen] * 2, device=device) if data.grouped else None
        net.train()
        if plan.pretrained:  # keep the trunk's trained statistics: batches are small and few
            for m in _norms(net):
                m.eval()
        emb = net(x.to(device))
        loss, active = triplet_loss(emb, pair_labels, margin, mining, cats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        actives.append(active)
        elapsed = time.perf_counter() - t
        done = max((step + 1) / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        progress.update(task, completed=min(1.0, done), step=step + 1, loss=losses[-1])
        if log_every and ((step + 1) % log_every == 0 or step == 0):
            recent = losses[-log_every:]
            progress.console.log(
                f"step {step + 1}: loss {sum(recent) / len(recent):.4f} (last {len(recent)}), {active:.0%} triplets active, lr {lr * scale:.2e}"
            )
        if state_path is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save_state(state_path, plan.run_id, step + 1, net, opt, rng, losses, actives)
    return _Loop(losses, actives, start, stopped_by)


def _train(
    plan: _Plan, data: _Data, cache: torch.Tensor | None, augment: v2.Transform, rng: random.Random, console: Console, *,
    settings: EncoderSettings, steps: int, lr: float, margin: float, mining: Mining, views: int, weight_decay: float, freeze: int,
    time_budget_s: float | None, stop_after: int | None, log_every: int, save_every: int, resume: bool,
) -> _Loop:  # fmt: skip
    """The optimiser, the progress bar, a resume, the loop; then a paused run's state, or the final BatchNorm statistics."""
    t = time.perf_counter()
    net, device, state_path = plan.net, plan.device, plan.state_path
    opt = _optimiser(net, lr=lr, trunk_lr=plan.trunk_lr, weight_decay=weight_decay)
    losses: list[float] = []
    actives: list[float] = []
    start = 0
    with (
        _trunk_from(net, freeze),
        Progress(
            TextColumn("training {task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.fields[step]}/{task.fields[steps]}, loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        if resume:  # inside _trunk_from: the state holds the trained blocks only, as saved
            assert state_path is not None
            start, losses, actives = _load_state(state_path, plan.run_id, net, opt, rng)
            progress.console.log(f"resumed from {state_path} at step {start}/{steps}")
        # the bar follows the steps (or a time budget, when one is given and nearer)
        task = progress.add_task(
            f"{settings.backbone}@{plan.tsize}px",
            total=1.0,
            completed=start / steps if steps else 1.0,
            step=start,
            steps=steps,
            loss=float("nan"),
        )
        loop = _train_loop(
            plan, data, cache, augment, opt, rng, progress, task, steps=steps, start=start, losses=losses, actives=actives, lr=lr,
            margin=margin, mining=mining, views=views, time_budget_s=time_budget_s, stop_after=stop_after, log_every=log_every,
            save_every=save_every, t=t,
        )  # fmt: skip
        if loop.stopped_by == "paused":
            assert state_path is not None
            _save_state(state_path, plan.run_id, len(loop.losses), net, opt, rng, loop.losses, loop.actives)
        elif not plan.pretrained:
            # BatchNorm statistics of the final weights, on plain crops of training photos
            sample = rng.sample(range(len(data.images)), min(_BN_IMAGES, len(data.images)))
            plain = cache[sample, 0] if cache is not None else _normalise(data.images[sample])
            _remeasure_batchnorm(net, plain, 2 * data.pairs_per_step, device)
    return loop


def _report(
    settings: EncoderSettings, plan: _Plan, data: _Data, loop: _Loop, *, heldout: Sequence[Product], lr: float, margin: float,
    freeze: int, seed: int, before: dict[int, float], after: dict[int, float], prep_s: float, train_s: float, eval_s: float,
) -> TrainReport:  # fmt: skip
    return TrainReport(
        backbone=settings.backbone,
        image_size=plan.size,
        train_size=plan.tsize,
        products=len(data.product_ids),
        photos=len(data.images),
        skipped_photos=data.skipped,
        heldout_products=len(heldout),
        steps=len(loop.losses),
        batch=data.pairs_per_step,
        lr=lr,
        margin=margin,
        freeze=freeze,
        seed=seed,
        losses=loop.losses,
        active=loop.actives,
        hit_before=before,
        hit_after=after,
        stopped_by=loop.stopped_by,
        prep_s=round(prep_s, 2),
        train_s=round(train_s, 2),
        eval_s=round(eval_s, 2),
        total_s=0.0,
        resumed_from=loop.start,
        state=plan.state_path,
    )


def _save(report: TrainReport, net: EmbeddingNet, settings: EncoderSettings, out: str | Path) -> None:
    """The checkpoint file, and the model version workers will name it by."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    report.checkpoint = path
    report.checkpoint_sha256 = save_checkpoint(net.cpu(), path)
    report.model_version = model_version_for(settings.model_copy(update={"weights": str(path)}))


# --------------------------------------------------------------------------- resumable state

_STATE_FORMAT = 1


def _run_id(settings: EncoderSettings, products: Sequence[Product], *args: object) -> str:
    """What a saved state belongs to: the starting net, the data and the recipe. A resume with
    anything else would silently train a different model, so it is refused."""
    h = hashlib.sha256()
    h.update(json.dumps([model_version_for(settings), settings.image_size, [str(a) for a in args]]).encode())
    for p in products:
        h.update(p.product_id.encode() + b"\x00")
        for img in p.images:
            h.update(hashlib.sha256(img.data).digest())
            h.update(repr(tuple(img.bbox) if img.bbox is not None else None).encode())
    return h.hexdigest()


def _save_state(
    path: Path,
    run_id: str,
    step: int,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    rng: random.Random,
    losses: list[float],
    actives: list[float],
) -> None:
    """Everything the next step depends on, written atomically (a kill mid-save keeps the last one)."""
    version, internal, gauss = rng.getstate()
    data = {
        "format": _STATE_FORMAT,
        "run_id": run_id,
        "step": step,
        "net": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "opt": opt.state_dict(),
        "rng": [version, list(internal), gauss],
        "torch_rng": torch.get_rng_state(),
        "losses": list(losses),
        "actives": list(actives),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def _load_state(
    path: Path, run_id: str, net: nn.Module, opt: torch.optim.Optimizer, rng: random.Random
) -> tuple[int, list[float], list[float]]:
    if not path.is_file():
        raise ValueError(f"--resume: no training state at {path} (runs save one with --save-every)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT:
        raise ValueError(f"--resume: {path} is not a training state of this version")
    if data["run_id"] != run_id:
        raise ValueError(f"--resume: {path} was saved by a run with other data, settings or options; run without --resume to start over")
    net.load_state_dict(data["net"])
    opt.load_state_dict(data["opt"])
    version, internal, gauss = data["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(data["torch_rng"])
    return int(data["step"]), list(data["losses"]), list(data["actives"])


def _choose(
    rng: random.Random, product_ids: list[int], by_category: dict[int, list[int]], product_cat: dict[int, int], n: int, grouped: bool
) -> list[int]:
    """``n`` products for one step. Grouped: products come in pairs of one category (a look-alike
    for the negative mining), categories drawn in proportion to their size."""
    if not grouped:
        return rng.sample(product_ids, n)
    chosen: list[int] = []
    taken: set[int] = set()
    group = 2  # pairs of look-alikes: every anchor has one, and the batch stays diverse
    while len(chosen) < n:
        anchor = rng.choice(product_ids)
        if anchor in taken:
            continue
        pool = [i for i in by_category.get(product_cat[anchor], [anchor]) if i not in taken and i != anchor]
        picks = [anchor, *rng.sample(pool, min(len(pool), group - 1, n - len(chosen) - 1))]
        chosen.extend(picks)
        taken.update(picks)
    return chosen


def _status(console: Console, show: bool, text: str) -> contextlib.AbstractContextManager[object]:
    return console.status(text) if show else contextlib.nullcontext()


def _cache_prefix(prefix: nn.Module, images: torch.Tensor, augment: v2.Transform, views: int, device: torch.device) -> torch.Tensor:
    """N×V×C×h×w outputs of the frozen blocks: view 0 the plain crop, the others augmented."""
    prefix.eval()  # frozen means frozen: its BatchNorm keeps the statistics it has
    out = []
    with torch.no_grad():
        for i in range(0, len(images), _EMBED_BATCH):
            chunk = images[i : i + _EMBED_BATCH]
            vs = [_normalise(chunk)] + [_augmented(chunk, augment) for _ in range(max(1, views) - 1)]
            out.append(torch.stack([prefix(v.to(device)).cpu() for v in vs], dim=1))
    return torch.cat(out)


def _batch(
    rng: random.Random,
    by_product: dict[int, list[int]],
    chosen: list[int],
    images: torch.Tensor,
    cache: torch.Tensor | None,
    augment: v2.Transform,
    views: int,
) -> torch.Tensor:
    """2n inputs: rows i and n+i are two photos of product ``chosen[i]`` (one photo: two augmentations)."""
    first, second = [], []
    for pid in chosen:
        own = by_product[pid]
        a, b = rng.sample(own, 2) if len(own) > 1 else (own[0], own[0])
        first.append(a)
        second.append(b)
    if cache is None:
        return _augmented(images[first + second], augment)
    v = max(1, views)
    picks = []
    for a, b in zip(first, second, strict=True):
        va, vb = rng.sample(range(v), 2) if (a == b and v > 1) else (rng.randrange(v), rng.randrange(v))
        picks.append((a, va, b, vb))
    rows = [cache[a, va] for a, va, _, _ in picks] + [cache[b, vb] for _, _, b, vb in picks]
    return torch.stack(rows)


# --------------------------------------------------------------------------- synthetic catalog


def synthetic_training_set(
    n_products: int,
    *,
    heldout: int,
    seed: int,
    street_photos: int = 1,
    workers: int = 2,
) -> tuple[list[TrainProduct], list[Product]]:
    """A catalog of ``n_products + heldout`` products (ids ``train-…``, never the demo's):
    the first ``n_products`` to train on, each with ``street_photos`` extra street shots (what
    shoppers upload), and ``heldout`` untouched products to measure retrieval on."""
    from devkit.catalog import generate_catalog, query_photo

    catalog = generate_catalog(n_products + heldout, seed=seed, prefix=TRAIN_PREFIX, workers=workers)
    train, held = catalog[:n_products], catalog[n_products:]
    # Street shots from query streams 1.. (stream 0 is what evaluations query with).
    jobs = [(p, i) for p in train for i in range(1, street_photos + 1)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        street = list(pool.map(lambda a: query_photo(a[0], a[1]), jobs))
    extra: dict[str, list[Photo]] = {}
    for (p, _), img in zip(jobs, street, strict=True):
        extra.setdefault(p.product_id, []).append(img)
    products = [TrainProduct(p.product_id, [*p.images, *extra.get(p.product_id, [])]) for p in train]
    return products, list(held)
