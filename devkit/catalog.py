"""A deterministic synthetic catalog: the demo, the tests and the benchmark need products.

No real product photos can be shipped or downloaded here, and an encoder with random
weights finds nothing meaningful in random noise. So every product is one drawn *item*
(a garment or bag silhouette with its own colour and pattern) photographed 1–4 times on
different backgrounds, scales, positions and lighting: photos of the same item share most
of their pixels' statistics, photos of different items do not, and similarity search has
something real to find even with random weights.

Everything is seeded: the same ``(product_id, variant, seed)`` always gives the same JPEG
bytes, so a test can name the image it expects.

Object keys: the photos of variant 0 live at ``<prefix>/<product_id>/<n>.jpg``; a modified
look (variant v > 0) at ``<prefix>/<product_id>/v<v>/<n>.jpg``, so a stale event that is
replayed late still points at the photos it was published with, never at newer ones.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES: tuple[str, ...] = ("cardigan", "t-shirt", "dress", "bag", "trousers", "skirt")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks")
BACKGROUNDS: tuple[str, ...] = ("white", "plain", "street")
MAX_IMAGES = 4  # photos per product; well under the index's per-product key budget
MIN_SIDE, MAX_SIDE = 256, 640  # photo sides in pixels: small enough for CPU tests
DEFAULT_KEY_PREFIX = "catalog"

_ITEM_RES = 320  # the item is drawn once per look at this size, then resized per photo
_QUERY_STREAM = 1000  # rng stream offset for query photos: never equal to a catalog photo

BBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class SyntheticImage:
    """One JPEG photo; ``key`` is relative to the upload prefix; ``bbox`` set on busy backgrounds."""

    key: str
    data: bytes = field(repr=False)
    bbox: BBox | None


@dataclass(frozen=True)
class SyntheticProduct:
    """One item and its photos. ``seed`` is kept so more photos of the same look can be drawn."""

    product_id: str
    category: str
    images: list[SyntheticImage]
    variant: int
    seed: int = 0


# --------------------------------------------------------------------------- seeding


def _rng(seed: int, product_id: str, *parts: int | str) -> np.random.Generator:
    """An independent stream per (seed, product, parts): stable across processes (no ``hash()``)."""
    text = "\x1f".join([str(seed), product_id, *map(str, parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return np.random.default_rng(list(np.frombuffer(digest, dtype=np.uint32)))


def category_for(product_id: str, seed: int = 0) -> str:
    """The product's category: fixed per product, so a modify keeps it."""
    return CATEGORIES[int(_rng(seed, product_id, "category").integers(len(CATEGORIES)))]


# --------------------------------------------------------------------------- the item


@dataclass(frozen=True)
class _Look:
    category: str
    pattern: str
    base: tuple[int, int, int]
    accent: tuple[int, int, int]
    detail: tuple[int, int, int]
    period: float
    angle: float


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (round(r * 255), round(g * 255), round(b * 255))


def _make_look(category: str, rng: np.random.Generator) -> _Look:
    hue = float(rng.random())
    base = _hsv(hue, float(rng.uniform(0.45, 0.95)), float(rng.uniform(0.4, 0.95)))
    accent_kind = rng.integers(4)
    if accent_kind == 0:
        accent = (245, 245, 240)
    elif accent_kind == 1:
        accent = (30, 30, 35)
    else:  # a second hue, far enough from the first to read as a pattern
        accent = _hsv((hue + rng.uniform(0.25, 0.75)) % 1.0, float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.5, 1.0)))
    detail = tuple(int(c * 0.45) for c in base)
    return _Look(
        category=category,
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        base=base,
        accent=accent,
        detail=(detail[0], detail[1], detail[2]),
        period=float(rng.uniform(18, 48)),
        angle=float(rng.choice([0.0, 90.0, 45.0, -45.0])),
    )


def _points(spec: str) -> list[tuple[float, float]]:
    """``"x,y x,y …"`` -> polygon vertices: one line per shape reads better than a column."""
    return [(float(x), float(y)) for x, y in (p.split(",") for p in spec.split())]


# Silhouettes on the unit square (x right, y down).
_SHAPES: dict[str, list[tuple[float, float]]] = {
    "t-shirt": _points(".34,.12 .43,.12 .50,.18 .57,.12 .66,.12 .92,.30 .83,.43 .74,.37 .74,.92 .26,.92 .26,.37 .17,.43 .08,.30"),
    "cardigan": _points(
        ".33,.07 .44,.07 .50,.30 .56,.07 .67,.07 .86,.20 .96,.86 .85,.88 .76,.42 .76,.94 .24,.94 .24,.42 .15,.88 .04,.86 .14,.20"
    ),
    "dress": _points(".38,.05 .42,.05 .45,.16 .55,.16 .58,.05 .62,.05 .64,.22 .60,.42 .86,.95 .14,.95 .40,.42 .36,.22"),
    "bag": _points(".16,.40 .84,.40 .91,.90 .09,.90"),
    "trousers": _points(".25,.05 .75,.05 .82,.95 .58,.95 .50,.36 .42,.95 .18,.95"),
    "skirt": _points(".31,.15 .69,.15 .90,.85 .10,.85"),
}


_GRID: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates and fold shading of the item canvas, computed once per process."""
    global _GRID
    if _GRID is None:
        yy, xx = np.mgrid[0:_ITEM_RES, 0:_ITEM_RES].astype(np.float32)
        shade = (0.9 + 0.1 * np.cos((xx / _ITEM_RES - 0.5) * 2 * math.pi))[..., None]  # folds
        _GRID = (yy, xx, shade)
    return _GRID


def _texture(look: _Look) -> np.ndarray:
    """The fabric: a vectorised pattern in the look's two colours, with soft fold shading."""
    yy, xx, shade = _grid()
    p = look.period
    if look.pattern == "stripes":
        a = math.radians(look.angle)
        u = xx * math.cos(a) + yy * math.sin(a)
        mix = (((u / p) % 1.0) < 0.45).astype(np.float32)
    elif look.pattern == "dots":
        shift = (np.floor(yy / p) % 2) * (p / 2)  # staggered rows
        dx = ((xx + shift) % p) - p / 2
        dy = (yy % p) - p / 2
        mix = ((dx * dx + dy * dy) < (0.28 * p) ** 2).astype(np.float32)
    elif look.pattern == "checks":  # gingham: half-tone where the bands cross
        mix = ((np.floor(xx / p) % 2) + (np.floor(yy / p) % 2)) / 2.0
    else:
        mix = np.zeros_like(xx)
    base = np.asarray(look.base, np.float32)
    accent = np.asarray(look.accent, np.float32)
    rgb = base + (accent - base) * mix[..., None]
    return np.clip(rgb * shade, 0, 255).astype(np.uint8)


def _draw_item(look: _Look) -> Image.Image:
    """The item as RGBA on transparent ground: texture inside an anti-aliased silhouette."""
    res = _ITEM_RES
    big = res * 2  # draw the mask at 2x, then downsample: smooth edges for free
    mask = Image.new("L", (big, big), 0)
    md = ImageDraw.Draw(mask)
    md.polygon([(x * big, y * big) for x, y in _SHAPES[look.category]], fill=255)
    if look.category == "bag":  # the handle is part of the item
        md.arc((0.30 * big, 0.12 * big, 0.70 * big, 0.66 * big), 180, 360, fill=255, width=int(0.05 * big))
    mask = mask.resize((res, res), Image.Resampling.BILINEAR)

    item = Image.fromarray(_texture(look), "RGB")
    d = ImageDraw.Draw(item)
    s, det = res, look.detail
    w = max(2, res // 80)
    if look.category == "cardigan":  # placket and buttons: what makes it read as a cardigan
        d.line([(0.5 * s, 0.30 * s), (0.5 * s, 0.94 * s)], fill=det, width=w)
        for y in (0.40, 0.52, 0.64, 0.76, 0.88):
            r = 0.018 * s
            d.ellipse((0.5 * s - r + 2 * w, y * s - r, 0.5 * s + r + 2 * w, y * s + r), fill=det)
        d.rectangle((0.24 * s, 0.90 * s, 0.76 * s, 0.94 * s), fill=det)  # ribbed hem
    elif look.category == "t-shirt":
        d.arc((0.42 * s, 0.06 * s, 0.58 * s, 0.22 * s), 0, 180, fill=det, width=w * 2)
    elif look.category == "dress":
        d.rectangle((0.36 * s, 0.40 * s, 0.64 * s, 0.44 * s), fill=det)  # belt
    elif look.category == "bag":
        d.arc((0.30 * s, 0.12 * s, 0.70 * s, 0.66 * s), 180, 360, fill=det, width=int(0.05 * s))
        d.polygon([(0.16 * s, 0.40 * s), (0.84 * s, 0.40 * s), (0.5 * s, 0.62 * s)], outline=det, width=w)
    elif look.category in ("trousers", "skirt"):
        top = 0.05 if look.category == "trousers" else 0.15
        d.rectangle((0.0, top * s, s, (top + 0.05) * s), fill=det)  # waistband (the mask clips it)
        if look.category == "trousers":
            d.line([(0.5 * s, (top + 0.05) * s), (0.5 * s, 0.36 * s)], fill=det, width=w)
    item.putalpha(mask)
    return item


# --------------------------------------------------------------------------- the photo


def _gradient(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    """A vertical two-colour ramp: one column computed, then stretched (cheap)."""
    t = np.linspace(0.0, 1.0, size[1], dtype=np.float32)[:, None, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return Image.fromarray(col.astype(np.uint8), "RGB").resize(size, Image.Resampling.NEAREST)


_GRAIN: Image.Image | None = None


def _grain(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Film grain: a random window of one fixed noise tile (seeded, made once per process).

    PIL's ``effect_noise`` would be faster to write but uses C ``rand()``: not reproducible.
    """
    global _GRAIN
    if _GRAIN is None:
        tile = np.random.default_rng(12345).normal(128, 40, (2 * MAX_SIDE, 2 * MAX_SIDE))
        _GRAIN = Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8), "L").convert("RGB")
    x, y = int(rng.integers(0, MAX_SIDE)), int(rng.integers(0, MAX_SIDE))
    return _GRAIN.crop((x, y, x + size[0], y + size[1]))


def _background(kind: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """White studio, a plain coloured wall, or a busy "street" scene (where a bbox is needed)."""
    if kind == "white":
        v = int(rng.integers(238, 256))
        return _gradient(size, (v, v, v), (max(v - 14, 0),) * 3)  # type: ignore[arg-type]
    if kind == "plain":
        c = _hsv(float(rng.random()), float(rng.uniform(0.1, 0.45)), float(rng.uniform(0.6, 0.95)))
        darker = (int(c[0] * 0.85), int(c[1] * 0.85), int(c[2] * 0.85))
        return _gradient(size, c, darker)
    w, h = size
    sky = _hsv(float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.1, 0.5)), float(rng.uniform(0.6, 0.95)))
    ground = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.3)), float(rng.uniform(0.2, 0.5)))
    img = _gradient(size, sky, ground)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 22))):  # buildings, cars, passers-by
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        bw, bh = int(rng.integers(w // 10, w // 2)), int(rng.integers(h // 10, h // 2))
        col = _hsv(float(rng.random()), float(rng.uniform(0, 0.8)), float(rng.uniform(0.15, 0.95)))
        if rng.random() < 0.6:
            d.rectangle((x0, y0, x0 + bw, y0 + bh), fill=col)
        else:
            d.ellipse((x0, y0, x0 + bw, y0 + bh), fill=col)
    # blocky colour noise plus film grain: texture that trims and plain crops cannot remove
    blocks = rng.integers(0, 256, (h // 24 + 1, w // 24 + 1, 3), dtype=np.uint8)
    blocks_img = Image.fromarray(blocks, "RGB").resize(size, Image.Resampling.BILINEAR)
    img = Image.blend(img, blocks_img, 0.15)
    return Image.blend(img, _grain(size, rng), 0.10)


def _light(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and colour temperature of this photo's lighting.

    All three are per-channel linear maps, so one 768-entry lookup table does them in C.
    """
    brightness = rng.uniform(0.8, 1.2)
    contrast = rng.uniform(0.8, 1.2)
    warm = rng.uniform(-0.06, 0.06)
    mean = float(np.asarray(img.reduce(8), np.float32).mean())  # contrast pivots on the mean grey
    levels = np.arange(256, dtype=np.float32)
    lut = [np.clip(((levels - mean) * contrast + mean) * brightness * gain, 0, 255).astype(np.uint8) for gain in (1 + warm, 1.0, 1 - warm)]
    return img.point(np.concatenate(lut).tolist())


def _rotate_scale(item: Image.Image, side: int, angle: float) -> Image.Image:
    """Scale the square item to ``side``, then tilt it by ``angle`` degrees.

    Pillow's resize is SIMD-fast and smooths; a nearest-neighbour rotate of the smooth result
    looks the same as a bilinear one at half the cost of a single bilinear affine pass.
    """
    thing = item.resize((side, side), Image.Resampling.BILINEAR)
    if abs(angle) < 1:
        return thing
    return thing.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)


def _photo(item: Image.Image, rng: np.random.Generator, *, kind: str) -> tuple[bytes, BBox | None]:
    """Place the item on a background and shoot it; the bbox is given only for busy scenes."""
    w, h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1)), int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    canvas = _background(kind, (w, h), rng)
    short = min(w, h)
    if kind == "street":
        side = int(short * rng.uniform(0.4, 0.7))
    elif rng.random() < 0.2:  # a close crop: the item fills (and may leave) the frame
        side = int(short * rng.uniform(0.95, 1.15))
    else:
        side = int(short * rng.uniform(0.6, 0.92))
    thing = _rotate_scale(item, side, float(rng.uniform(-10, 10)))
    tw, th = thing.size
    if kind == "street":  # anywhere in the scene, fully inside
        x = int(rng.integers(0, max(w - tw, 0) + 1))
        y = int(rng.integers(0, max(h - th, 0) + 1))
    else:  # shop photos are roughly centred
        x = int((w - tw) / 2 + rng.uniform(-0.1, 0.1) * w)
        y = int((h - th) / 2 + rng.uniform(-0.1, 0.1) * h)
    alpha = thing.getchannel("A")
    if kind != "street":  # a soft contact shadow, drawn small and scaled up: cheap blur
        small = alpha.resize((max(tw // 8, 1), max(th // 8, 1)), Image.Resampling.BILINEAR)
        shadow = small.filter(ImageFilter.BoxBlur(2)).resize((tw, th), Image.Resampling.BILINEAR)
        shadow = shadow.point(lambda v: v * 0.35)
        canvas.paste((40, 40, 40), (x + side // 40, y + side // 30), shadow)
    canvas.paste(thing, (x, y), alpha)
    bbox: BBox | None = None
    if kind == "street":
        ax0, ay0, ax1, ay1 = alpha.getbbox() or (0, 0, tw, th)
        bbox = (max(x + ax0, 0), max(y + ay0, 0), min(x + ax1, w), min(y + ay1, h))
    buf = io.BytesIO()
    _light(canvas, rng).save(buf, "JPEG", quality=int(rng.integers(80, 95)))
    return buf.getvalue(), bbox


def _image_key(product_id: str, variant: int, index: int) -> str:
    return f"{product_id}/{index}.jpg" if variant == 0 else f"{product_id}/v{variant}/{index}.jpg"


def render_product(
    product_id: str,
    variant: int,
    n_images: int,
    seed: int = 0,
    *,
    category: str | None = None,
) -> SyntheticProduct:
    """Draw one look of a product and ``n_images`` photos of it; a new variant is a new look."""
    if not 1 <= n_images <= MAX_IMAGES:
        raise ValueError(f"n_images must be 1..{MAX_IMAGES}, got {n_images}")
    category = category or category_for(product_id, seed)
    if category not in _SHAPES:
        raise ValueError(f"unknown category {category!r}: expected one of {', '.join(CATEGORIES)}")
    item = _draw_item(_make_look(category, _rng(seed, product_id, "look", variant)))
    images = []
    for i in range(n_images):
        rng = _rng(seed, product_id, "photo", variant, i)
        # the first photo is usually the clean shop shot, the others anything
        p = [0.7, 0.2, 0.1] if i == 0 else [0.3, 0.3, 0.4]
        kind = BACKGROUNDS[int(rng.choice(3, p=p))]
        data, bbox = _photo(item, rng, kind=kind)
        images.append(SyntheticImage(key=_image_key(product_id, variant, i), data=data, bbox=bbox))
    return SyntheticProduct(product_id, category, images, variant, seed)


def query_photo(product: SyntheticProduct, index: int = 0) -> SyntheticImage:
    """A fresh street photo of the product's current look, never one of its catalog photos.

    What a shopper would upload to visual search: the demo searches with it and expects
    ``product`` near the top.
    """
    look = _make_look(product.category, _rng(product.seed, product.product_id, "look", product.variant))
    rng = _rng(product.seed, product.product_id, "photo", product.variant, _QUERY_STREAM + index)
    data, bbox = _photo(_draw_item(look), rng, kind="street")
    return SyntheticImage(key=f"queries/{product.product_id}/v{product.variant}/{index}.jpg", data=data, bbox=bbox)


def generate_catalog(n_products: int, *, seed: int = 0, prefix: str = "demo", workers: int = 2) -> list[SyntheticProduct]:
    """``n_products`` products ``<prefix>-0001`` … with 1–4 photos each; same seed, same bytes.

    Rendering runs on ``workers`` threads (PIL and numpy release the GIL); every photo has
    its own random stream, so the thread count never changes the result.
    """
    if n_products < 0:
        raise ValueError("n_products must be >= 0")
    if not prefix or not all(c.isalnum() or c in "-_." for c in prefix):
        raise ValueError(f"prefix must be letters, digits, '-', '_' or '.', got {prefix!r}")
    width = max(4, len(str(n_products)))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(1, n_products + 1)]
    counts = [int(_rng(seed, pid, "count").choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2])) for pid in ids]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda a: render_product(a[0], 0, a[1], seed), zip(ids, counts, strict=True)))


# --------------------------------------------------------------------------- storage


def object_key(prefix: str, image_key: str) -> str:
    """Where an image is stored: ``<prefix>/<key>`` (just ``<key>`` with an empty prefix)."""
    prefix = prefix.strip("/")
    return f"{prefix}/{image_key}" if prefix else image_key


def image_uri(bucket: str, key: str) -> str:
    """The ``s3://`` URI events carry for an object key."""
    return f"s3://{bucket}/{key}"


def file_uri(root: str | Path, key: str) -> str:
    """The ``file://`` URI of an object key under a local folder (absolute, percent-escaped)."""
    return (Path(root).resolve() / key).as_uri()


def _all_images(products: Iterable[SyntheticProduct]) -> list[SyntheticImage]:
    return [img for p in products for img in p.images]


def upload(
    products: Iterable[SyntheticProduct],
    s3_client: Any,
    bucket: str,
    *,
    prefix: str = DEFAULT_KEY_PREFIX,
    max_workers: int = 16,
) -> int:
    """Put every photo at ``s3://bucket/<prefix>/<key>``; returns the number of objects.

    A thread pool, because each PUT is a round trip and a boto3 client is thread-safe.
    """
    images = _all_images(products)

    def put(img: SyntheticImage) -> None:
        s3_client.put_object(Bucket=bucket, Key=object_key(prefix, img.key), Body=img.data, ContentType="image/jpeg")

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for _ in pool.map(put, images):  # consume, so the first failed PUT raises here
            pass
    return len(images)


def write_to_folder(products: Iterable[SyntheticProduct], root: str | Path, *, prefix: str = DEFAULT_KEY_PREFIX) -> int:
    """Local-folder mode: write every photo to ``<root>/<prefix>/<key>``; returns the count."""
    images = _all_images(products)
    for img in images:
        path = Path(root) / object_key(prefix, img.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(img.data)
    return len(images)


# --------------------------------------------------------------------------- the scenario


@dataclass(frozen=True)
class ExpectedProduct:
    """What the index must hold for a live product once every event has been processed."""

    version: int
    category: str
    variant: int
    uris: tuple[str, ...]
    product: SyntheticProduct = field(repr=False, compare=False)

    @property
    def n_images(self) -> int:
        return len(self.uris)


@dataclass
class Scenario:
    """A day of catalog changes: the events to publish and the state they must end in.

    ``uploads`` holds the new looks the modify events point at: store them (``upload`` or
    ``write_to_folder``) together with the catalog before publishing.
    """

    events: list[dict[str, Any]]
    expected: dict[str, ExpectedProduct | None]
    uploads: list[SyntheticProduct]
    duplicates: int = 0  # events published twice (exact copies)
    stale: int = 0  # events replayed after a newer version of their product

    @property
    def live(self) -> dict[str, ExpectedProduct]:
        """The products that must be searchable at the end."""
        return {pid: e for pid, e in self.expected.items() if e is not None}


def _event(kind: str, product: SyntheticProduct, version: int, uri_of: Any) -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    if kind != "delete":
        for img in product.images:
            ref: dict[str, Any] = {"uri": uri_of(img.key)}
            if img.bbox is not None:
                ref["bbox"] = list(img.bbox)
            images.append(ref)
    return {
        "type": kind,
        "product_id": product.product_id,
        "version": version,
        "images": images,
        "attributes": {"category": product.category},
    }


def _copy(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "images": [dict(i) for i in event["images"]], "attributes": dict(event["attributes"])}


def build_scenario(
    products: Sequence[SyntheticProduct],
    bucket_or_root: str | Path,
    *,
    modify_fraction: float = 0.2,
    delete_fraction: float = 0.1,
    seed: int = 0,
    uri_style: Literal["s3", "file"] = "s3",
    prefix: str = DEFAULT_KEY_PREFIX,
    duplicate_fraction: float = 0.05,
    stale_fraction: float = 0.25,
) -> Scenario:
    """Events in publish order: every add (version 1), then a shuffled wave of changes.

    The wave holds modifies (versions 2, 3: a new look, maybe a different photo count) and
    deletes (the product's highest version; some products are modified and then deleted).
    Because the wave is shuffled, a product's newer event often arrives before its older
    one; on top of that, ``duplicate_fraction`` of all events are published twice and
    ``stale_fraction`` of the changed products get an older event replayed after their
    newest. At least one of each whenever the catalog allows, so a test always meets them.
    """
    if not 0 <= modify_fraction <= 1 or not 0 <= delete_fraction <= 1:
        raise ValueError("modify_fraction and delete_fraction must be in [0, 1]")
    if uri_style == "s3":

        def uri_of(key: str) -> str:
            return image_uri(str(bucket_or_root), object_key(prefix, key))
    elif uri_style == "file":

        def uri_of(key: str) -> str:
            return file_uri(bucket_or_root, object_key(prefix, key))
    else:
        raise ValueError(f"uri_style must be 's3' or 'file', got {uri_style!r}")

    rng = random.Random(f"scenario:{seed}")
    by_id = {p.product_id: p for p in products}
    if len(by_id) != len(products):
        raise ValueError("product ids must be unique")
    order = list(by_id)
    rng.shuffle(order)
    n_mod = min(len(order), round(len(order) * modify_fraction))
    n_del = min(len(order), round(len(order) * delete_fraction))
    modified = order[:n_mod]
    overlap = min(n_mod, n_del // 3, max(len(order) - n_del, 0))  # modified, then deleted
    deleted = set(order[n_mod - overlap : n_mod - overlap + n_del])

    adds = [_event("add", p, 1, uri_of) for p in products]
    histories: dict[str, list[dict[str, Any]]] = {p.product_id: [adds[i]] for i, p in enumerate(products)}
    final_look = {p.product_id: p for p in products}
    uploads: list[SyntheticProduct] = []
    wave: list[dict[str, Any]] = []
    for pid in modified:
        base = by_id[pid]
        for step in range(1 if rng.random() < 0.7 else 2):
            look = render_product(pid, base.variant + step + 1, rng.randint(1, MAX_IMAGES), seed, category=base.category)
            uploads.append(look)
            final_look[pid] = look
            ev = _event("modify", look, len(histories[pid]) + 1, uri_of)
            histories[pid].append(ev)
            wave.append(ev)
    for pid in sorted(deleted):
        ev = _event("delete", final_look[pid], len(histories[pid]) + 1, uri_of)
        histories[pid].append(ev)
        wave.append(ev)
    rng.shuffle(wave)
    events = adds + wave

    # stale replays: an older event of a changed product, published after its newest one
    changed = [pid for pid in order if len(histories[pid]) > 1]
    replay = [pid for pid in changed if rng.random() < stale_fraction] or changed[:1]
    if deleted and deleted.isdisjoint(replay):  # always test the tombstone: an add after a delete
        replay.append(next(pid for pid in changed if pid in deleted))
    for pid in replay:
        newest = max(i for i, e in enumerate(events) if e["product_id"] == pid and e is histories[pid][-1])
        old = histories[pid][rng.randrange(len(histories[pid]) - 1)]
        events.insert(rng.randint(newest + 1, len(events)), _copy(old))
    # duplicates: exact copies, published some time after the original
    picks = [i for i in range(len(events)) if rng.random() < duplicate_fraction] or ([0] if events else [])
    for i in sorted(picks, reverse=True):
        events.insert(rng.randint(i + 1, len(events)), _copy(events[i]))

    expected: dict[str, ExpectedProduct | None] = {}
    for pid in by_id:
        last = histories[pid][-1]
        if last["type"] == "delete":
            expected[pid] = None
        else:
            look = final_look[pid]
            expected[pid] = ExpectedProduct(
                version=last["version"],
                category=look.category,
                variant=look.variant,
                uris=tuple(i["uri"] for i in last["images"]),
                product=look,
            )
    return Scenario(events, expected, uploads, duplicates=len(picks), stale=len(replay))
