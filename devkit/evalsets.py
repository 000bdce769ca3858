"""The labelled sets ``cardigan eval`` scores (:mod:`cardigan.ops.evaluate`).

- ``street2shop``: the demo's task on products no training run sees. A synthetic catalog of its
  own (ids ``eval-…``, seed :data:`EVAL_SEED`: not the demo's catalog, seed 0, nor the training
  catalog's ``train-…``); queries are new street photos, the gallery every shop photo.
- ``neardup``: real photographs that ship in packages (scikit-image's ``data`` module and
  scikit-learn's sample images, read from their files: no download). The gallery is the
  originals plus distractor crops of every photo; the queries are crops, rescales, JPEG
  re-encodes and light changes of the originals. A distractor cut from a query's own photo is
  junk for that query (ignored), a distractor of any other photo is a wrong answer.

Same arguments, same bytes: every random draw is seeded.
"""

from __future__ import annotations

import importlib.util
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from cardigan.ops.evaluate import EvalSet, Item

EVAL_SEED = 2000  # the street→shop set's catalog: never the demo's (0) or training's (1000)
EVAL_PREFIX = "eval"
SETS = ("street2shop", "neardup")

# Colour and grey photographs in scikit-image's wheel (files, not pooch downloads). Left out:
# drawings and synthetic pictures (logo, color, horse, text), the right half of the stereo pair
# (motorcycle_right would be a near-duplicate of motorcycle_left), and the multi-page TIFFs.
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png",
    "retina.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png",
    "page.png", "clock_motion.png", "cell.png", "microaneurysms.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
_DISTRACTORS_PER_PHOTO = 2


def street_to_shop(products: int = 100, *, seed: int = EVAL_SEED, workers: int | None = None) -> EvalSet:
    """A new street photo of each of ``products`` unseen products against all their shop photos."""
    from devkit.catalog import generate_catalog, query_photo

    workers = workers or os.cpu_count() or 1
    catalog = generate_catalog(products, seed=seed, prefix=EVAL_PREFIX, workers=workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queries = list(pool.map(query_photo, catalog))
    return EvalSet(
        name="street2shop",
        description=f"street photo → shop photos, {products} synthetic products never trained on (seed {seed})",
        queries=[Item(q.data, _box(q.bbox), p.product_id) for p, q in zip(catalog, queries, strict=True)],
        gallery=[Item(img.data, _box(img.bbox), p.product_id) for p in catalog for img in p.images],
    )


def _box(bbox: object) -> tuple[float, float, float, float] | None:
    return None if bbox is None else tuple(float(v) for v in bbox)  # type: ignore[return-value, attr-defined]


# --------------------------------------------------------------------------- real photographs


def _package_dir(package: str, sub: str) -> Path | None:
    """A package's data folder, found without importing the package (sklearn is slow to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    return path if path.is_dir() else None


def real_photos() -> dict[str, Image.Image]:
    """The shipped photographs by name (RGB), or an error saying what to install."""
    found: dict[str, Image.Image] = {}
    for package, sub, names in (("skimage", "data", SKIMAGE_PHOTOS), ("sklearn", "datasets/images", SKLEARN_PHOTOS)):
        folder = _package_dir(package, sub)
        if folder is None:
            continue
        for name in names:
            path = folder / name
            if path.is_file():
                with Image.open(path) as img:
                    found[f"{package}:{Path(name).stem}"] = img.convert("RGB")
    if len(found) < 2:
        raise RuntimeError(
            "the near-duplicate set needs real photographs from scikit-image (and scikit-learn, optional): "
            "pip install 'cardigan[devkit]' (or pip install scikit-image)"
        )
    return found


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, rng: np.random.Generator, share: float) -> Image.Image:
    """A crop of ``share`` of the area at a random place, the photo's aspect kept."""
    w, h = img.size
    cw, ch = max(8, round(w * share**0.5)), max(8, round(h * share**0.5))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def _scale(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(8, round(img.width * factor)), max(8, round(img.height * factor))), Image.Resampling.BILINEAR)


def _light(img: Image.Image, brightness: float, contrast: float) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(brightness)).enhance(contrast)


# (name, edit): what a re-upload, a thumbnail or another shop's copy of a photo does to it
EDITS: tuple[tuple[str, Callable[[Image.Image, np.random.Generator], bytes]], ...] = (
    ("crop80", lambda im, r: _jpeg(_crop(im, r, 0.8), 90)),
    ("crop60", lambda im, r: _jpeg(_crop(im, r, 0.6), 90)),
    ("half+q70", lambda im, r: _jpeg(_scale(im, 0.5), 70)),
    ("q20", lambda im, r: _jpeg(im, 20)),
    ("brighter", lambda im, r: _jpeg(_light(im, 1.35, 0.85), 90)),
    ("darker", lambda im, r: _jpeg(_light(im, 0.65, 1.15), 90)),
    ("crop70+third+q50+dim", lambda im, r: _jpeg(_light(_scale(_crop(im, r, 0.7), 0.33), 0.85, 1.0), 50)),
)


def near_duplicates(*, seed: int = EVAL_SEED, distractors: int = _DISTRACTORS_PER_PHOTO) -> EvalSet:
    """Edited copies of real photos (queries) against the originals and distractor crops."""
    photos = real_photos()
    queries: list[Item] = []
    gallery: list[Item] = []
    for name, img in photos.items():
        gallery.append(Item(_jpeg(img, 95), None, name, name))
        for e, (_edit, fn) in enumerate(EDITS):
            rng = np.random.default_rng([seed, e, *name.encode()])
            queries.append(Item(fn(img, rng), None, name, name))
        for d in range(distractors):
            rng = np.random.default_rng([seed, 1000 + d, *name.encode()])
            gallery.append(Item(_jpeg(_crop(img, rng, 0.3), 90), None, f"{name}#part{d}", name))
    return EvalSet(
        name="neardup",
        description=(
            f"{len(photos)} real photos ({', '.join(sorted({n.split(':')[0] for n in photos}))}): "
            f"{len(EDITS)} edits each ({', '.join(n for n, _ in EDITS)}) → originals + {distractors} distractor crops each"
        ),
        queries=queries,
        gallery=gallery,
    )


def build_sets(names: tuple[str, ...] | list[str] = SETS, *, products: int = 100) -> list[EvalSet]:
    """The named sets, in order (unknown names fail with the known ones)."""
    out = []
    for name in names:
        if name == "street2shop":
            out.append(street_to_shop(products))
        elif name == "neardup":
            out.append(near_duplicates())
        else:
            raise ValueError(f"unknown eval set {name!r}; known: {', '.join(SETS)}")
    return out
