"""How much JPEG draft decoding moves the vectors, and what it saves: ``python -m devkit.draft_parity``.

``cardigan.imaging.decode`` decodes a large JPEG at 1/2, 1/4 or 1/8 scale, keeping at least
``DRAFT_OVERSAMPLE`` times the model's input size. This compares, on the same photos, a full
decode, the draft at 2x (the rule before issue 14) and at 1x (the rule now): CPU ms per image
for decode + crop + resize, and the cosine between the vectors of a pretrained ImageNet trunk
(torchvision's mobilenet_v2, global-average-pooled features: random weights would exaggerate
small pixel changes). Photos: scikit-image's sample photos scaled to 1200-2000 px (catalog
photos are that large) when scikit-image is installed, and the bench's synthetic catalog.
Needs the mobilenet_v2 ImageNet file in torch's hub cache (encoder/offline_weights.py).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np

Photo = tuple[bytes, list[float] | None]


def _large_photos() -> list[Photo]:
    try:
        import skimage.data as sd
    except ImportError:
        return []
    from PIL import Image

    out: list[Photo] = []
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "cat",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "motorcycle_left",
    ):
        try:
            arr = getattr(sd, name)()
        except Exception:  # noqa: BLE001 -- a sample that needs a download (pooch) here: skip it
            continue
        if arr.ndim != 3:
            continue
        for side in (1200, 1600, 2000):
            im = Image.fromarray(arr[..., :3])
            k = side / max(im.size)
            im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            w, h = im.size
            out += [(buf.getvalue(), None), (buf.getvalue(), [w * 0.2, h * 0.15, w * 0.8, h * 0.9])]
    return out


def _catalog() -> list[Photo]:
    from devkit.catalog import generate_catalog

    products = generate_catalog(60, seed=1, prefix="q", workers=2)
    return [(img.data, list(img.bbox) if img.bbox else None) for p in products for img in p.images]


def main(size: int = 224) -> None:
    import torch
    import torchvision

    import cardigan.imaging.decode as dec
    from cardigan.imaging.crop import normalise, preprocess_pixels

    original = dec._draft_request

    def rule(k: float | None) -> Callable[..., tuple[int, int] | None]:
        if k is None:
            return lambda im, target, hint: None  # no draft: a full decode
        return lambda im, target, hint: original(im, max(1, round(target * k / dec.DRAFT_OVERSAMPLE)), hint)

    net = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()

    def vectors(pixels: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            f = net.features(torch.from_numpy(normalise(np.stack(pixels)))).mean((2, 3))
            return torch.nn.functional.normalize(f, dim=1).numpy()

    try:
        for label, photos in (("photos scaled to 1200-2000 px", _large_photos()), ("bench catalog, 256-640 px", _catalog())):
            if not photos:
                continue
            res: dict[float | None, tuple[np.ndarray, float]] = {}
            for k in (None, 2.0, 1.0):
                dec._draft_request = rule(k)
                pixels = [preprocess_pixels(d, b, size=size, max_pixels=40_000_000)[0] for d, b in photos]
                best = float("inf")
                for _ in range(3):
                    t = time.process_time()
                    for d, b in photos:
                        preprocess_pixels(d, b, size=size, max_pixels=40_000_000)
                    best = min(best, (time.process_time() - t) / len(photos) * 1000)
                res[k] = (vectors(pixels), best)
            full = res[None][0]
            print(
                f"{label}: {len(photos)} images at {size} px; CPU ms/image: full {res[None][1]:.2f}, draft 2x {res[2.0][1]:.2f}, 1x {res[1.0][1]:.2f}"
            )
            for k in (2.0, 1.0):
                c = np.sum(res[k][0] * full, axis=1)
                print(f"  draft {k:g}x vs full decode: cosine mean {c.mean():.5f}, min {c.min():.5f}")
            c = np.sum(res[1.0][0] * res[2.0][0], axis=1)
            print(f"  draft 1x vs 2x (the stored vectors before): cosine mean {c.mean():.5f}, min {c.min():.5f}")
    finally:
        dec._draft_request = original


if __name__ == "__main__":
    main()
