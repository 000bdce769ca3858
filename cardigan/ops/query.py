"""Read side: "find products that look like this photo" and "similar items"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cardigan.errors import InvalidEvent
from cardigan.event import is_product_id
from cardigan.imaging.crop import FindsProduct, preprocess
from cardigan.store.index import Index
from encoder import Encoder


@dataclass
class Hit:
    product_id: str
    image_index: int
    image_uri: str
    score: float
    version: int
    model_version: str
    attributes: dict[str, Any]

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Hit:
        return cls(
            row["product_id"],
            int(row["image_index"]),
            row["image_uri"],
            float(row["score"]),
            int(row["version"]),
            row["model_version"],
            row.get("attributes") or {},
        )


def best_per_product(rows: list[dict[str, Any]], k: int, exclude: str | None = None) -> list[Hit]:
    """One hit per product (its best image), highest score first."""
    best: dict[str, Hit] = {}
    for row in rows:
        h = Hit.from_row(row)
        if h.product_id == exclude:
            continue
        if h.product_id not in best or h.score > best[h.product_id].score:
            best[h.product_id] = h
    return sorted(best.values(), key=lambda h: -h.score)[:k]


def search_image(
    index: Index,
    encoder: Encoder,
    data: bytes,
    *,
    k: int,
    max_pixels: int,
    bbox: tuple[float, float, float, float] | None = None,
    localiser: FindsProduct | None = None,
) -> list[Hit]:
    """Embed a query photo like an indexed one (same crop and model) and search.

    ``localiser``: the workers' (``localiser_for(encoder, settings.crop)``), so a busy photo is
    cropped the same way on both sides."""
    tensor, _ = preprocess(data, bbox, size=encoder.image_size, max_pixels=max_pixels, field_prefix="query", localiser=localiser)
    vec = encoder.embed(tensor.unsqueeze(0))[0]
    rows = index.search([vec.tolist()], k * 4)[0]
    return best_per_product(rows, k)


def near_ids(product_id: str) -> list[str]:
    """Ids a person may have meant: the trailing number zero-padded or unpadded (``demo-152`` →
    ``demo-0152``), or another letter case. Each is a lookup by primary key, so the list is short."""
    out: list[str] = []
    m = re.match(r"^(.*?)(\d+)$", product_id)
    if m:
        head, digits = m.groups()
        n = digits.lstrip("0") or "0"
        out += [head + n.zfill(w) for w in range(len(n), len(n) + 5)]
    out += [product_id.lower(), product_id.upper()]
    unique = dict.fromkeys(out)
    unique.pop(product_id, None)
    return [c for c in unique if is_product_id(c)]


def similar_products(index: Index, product_id: str, *, k: int, max_images: int) -> list[Hit]:
    """Products that look like this one: search with each of its vectors, best per product."""
    if not is_product_id(product_id):
        raise InvalidEvent(f"not a valid product id: {product_id!r}", field="product_id")
    own = index.get_product(product_id, max_images)
    if not own:
        hint = next((f"; did you mean {c!r}?" for c in near_ids(product_id) if index.get_product(c, 1)), "")
        raise InvalidEvent(f"product {product_id!r} is not in the index{hint}", field="product_id")
    rows = [r for hits in index.search([r["embedding"] for r in own], k * 4 + len(own)) for r in hits]
    return best_per_product(rows, k, exclude=product_id)
