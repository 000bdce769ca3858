"""A small catalog of REAL photographs: products cut from the photos that ship with scikit-image.

No package ships fashion product photos, but ``skimage.data`` ships about twenty real
photographs (astronaut, chelsea, coffee, rocket, brick, gravel, …). Each photo is cut into a
``grid`` × ``grid`` of regions; each region is one product, whose category is the
photo it came from (neighbouring regions share colours and texture, not pixels: the hard,
same-category negatives). A product's photos are ``views`` shots of its region: another framing (crop, scale,
aspect), a small rotation, other light (brightness, contrast, saturation), blur and JPEG quality.

Used by the training tests and to measure training on real pixels::

    python -m devkit.photo_catalog --out /tmp/photos            # JPEGs + events.jsonl (file:// URIs)
    CARDIGAN_LOCAL_ROOT=/tmp/photos cardigan train --manifest /tmp/photos/events.jsonl --out enc.pt
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

# Colour photographs first, then grey ones (made RGB). Left out: synthetic drawings
# (checkerboard, binary blobs, phantom), tiny ones, and the ones that need a download.
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "brick", "camera", "cell", "clock", "coins", "grass", "gravel", "moon", "page", "text",
)  # fmt: skip


@dataclass(frozen=True)
class PhotoImage:
    """One photo of a product: JPEG bytes (no bbox: the product fills the shot)."""

    data: bytes
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class PhotoProduct:
    """A region of one real photograph, and its shots; ``category`` is the photograph's name."""

    product_id: str
    category: str
    images: list[PhotoImage]


def _source(name: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.convert("RGB")
    img.thumbnail((512, 512))
    return img


def _shot(region: Image.Image, rng: np.random.Generator, size: int, turns: bool) -> bytes:
    """One photo of a region: new framing, small rotation, other light, blur, JPEG; with
    ``turns``, also turned by a quarter, a half or three quarters at random (a shift between
    one product's photos that an ImageNet trunk does not shrug off, as shop vs street photos)."""
    w, h = region.size
    scale = rng.uniform(0.8, 1.0)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    cw = int(min(w, max(8, w * np.sqrt(scale * aspect))))
    ch = int(min(h, max(8, h * np.sqrt(scale / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = region.crop((x0, y0, x0 + cw, y0 + ch)).rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR)
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    if turns:
        img = img.rotate(90 * int(rng.integers(0, 4)))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.7, 1.3)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.2))))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(60, 95)))
    return buf.getvalue()


def photo_products(
    *, grid: int = 3, views: int = 4, size: int = 128, seed: int = 0, turns: bool = False, photos: tuple[str, ...] = PHOTOS
) -> list[PhotoProduct]:
    """``len(photos) × grid²`` products with ``views`` photos each; the same for the same seed."""
    out = []
    for name in photos:
        src = _source(name)
        w, h = src.size
        cw, ch = w / grid, h / grid
        for r in range(grid):
            for c in range(grid):
                # each region is its own cell, no shared pixels: a neighbour is a look-alike
                # (same colours, same texture), never a partial copy
                box = (int(c * cw), int(r * ch), int((c + 1) * cw), int((r + 1) * ch))
                region = src.crop(box)
                pid = f"photo-{name.replace('_', '-')}-{r}{c}"
                rng = np.random.default_rng([seed, *pid.encode()])
                out.append(PhotoProduct(pid, name, [PhotoImage(_shot(region, rng, size, turns)) for _ in range(views)]))
    return out


def events(products: list[PhotoProduct], uri_of: dict[tuple[str, int], str], version: int = 1) -> list[dict[str, object]]:
    """``add`` events (the event contract) for ``products``, images at ``uri_of[(product_id, n)]``."""
    return [
        {
            "type": "add",
            "product_id": p.product_id,
            "version": version,
            "images": [{"uri": uri_of[(p.product_id, n)]} for n in range(len(p.images))],
            "attributes": {"category": p.category},
        }
        for p in products
    ]


def write_catalog(root: Path, products: list[PhotoProduct]) -> Path:
    """``root/<product_id>/<n>.jpg`` and ``root/events.jsonl`` with ``file://`` URIs (serve it
    with ``CARDIGAN_LOCAL_ROOT=root``); returns the manifest's path."""
    root = root.absolute()
    uris = {}
    for p in products:
        (root / p.product_id).mkdir(parents=True, exist_ok=True)
        for n, img in enumerate(p.images):
            path = root / p.product_id / f"{n}.jpg"
            path.write_bytes(img.data)
            uris[(p.product_id, n)] = path.as_uri()
    manifest = root / "events.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in events(products, uris)))
    return manifest


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", action="store_true", help="turn each photo by a random multiple of 90 degrees")
    a = ap.parse_args()
    products = photo_products(grid=a.grid, views=a.views, size=a.size, seed=a.seed, turns=a.turns)
    manifest = write_catalog(a.out, products)
    print(f"{len(products)} products, {sum(len(p.images) for p in products)} photos; manifest {manifest}")


if __name__ == "__main__":
    main()
