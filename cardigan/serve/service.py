"""What the search service does, without HTTP: one encoder, batched embeds and searches.

Built once at app start (the model loads once), closed at shutdown. Every read goes through
the alias (``CARDIGAN_COLLECTION``), so a blue/green reindex switch is picked up by the next
query with no restart. Concurrent requests share forward passes through the workers' own
:class:`~workers.batcher.MicroBatcher`, and share Milvus search calls through a second one.

Near-duplicates ("double listings") are what the workers' duplicate detection recorded in the
state Redis (cardigan/duplicates): its pairs, and the groups they form, scoring at least
``duplicate_threshold`` (``serve.duplicate_threshold``, or the detector's own threshold when
that is higher: weaker pairs are not recorded). Nothing is searched or scanned per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cardigan import procstat
from cardigan.duplicates.groups import groups as find_groups
from cardigan.duplicates.pairs import PairStore
from cardigan.errors import IndexUnavailable, InvalidEvent
from cardigan.event import primary_key
from cardigan.imaging.crop import preprocess
from cardigan.imaging.decode import sniff_format
from cardigan.imaging.fetch import Fetcher, make_s3_client
from cardigan.imaging.localise import Localiser, localiser_for
from cardigan.ops.query import Hit, best_per_product
from cardigan.serve.filters import BadRequest, filter_expression
from cardigan.store.guard import make_redis
from cardigan.store.index import Index
from cardigan.store.schema import OUTPUT_FIELDS
from config.settings import Settings
from encoder import Encoder, build_encoder
from workers.batcher import MicroBatcher

log = logging.getLogger(__name__)

SearchItem = tuple[list[float], int, str]  # vector, limit, filter expression

IMAGE_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "avif": "image/avif",
}


_STAGES = (
    ("prep", "decode+crop"),  # SearchService._prep: decode, crop, resize; index reads
    ("serve-embed", "model"),  # the embed batcher: torch.stack + forward
    ("serve-search", "milvus client"),  # the search batcher: gRPC request and response parsing
    ("MainThread", "http"),  # uvicorn's event loop: HTTP, multipart, routing, JSON
)


def _stage(thread_name: str | None) -> str:
    return "native" if thread_name is None else next((st for prefix, st in _STAGES if thread_name.startswith(prefix)), "other")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by stage (Linux /proc): where a query's CPU goes.

    Threads Python does not know (torch's intra-op pool, gRPC's) count as "native"."""
    return procstat.thread_cpu(_stage)


@dataclass
class DuplicateGroup:
    """Products whose images are near-identical; ``score`` is the closest pair's."""

    products: list[str]
    score: float


class SearchService:
    """Owns the model, the index client, the image fetcher and two batchers."""

    def __init__(self, settings: Settings, *, encoder: Encoder | None = None) -> None:
        self.settings = settings  # no I/O here: start() does it
        self.encoder = encoder or build_encoder(settings.encoder)
        self.index: Index | None = None
        self.fetcher: Fetcher | None = None
        self.embedder: MicroBatcher[torch.Tensor, np.ndarray] | None = None
        self.searcher: MicroBatcher[SearchItem, list[dict[str, Any]]] | None = None
        self.localiser: Localiser | None = None  # the workers' crop of busy photos (start())
        self.pairs: PairStore | None = None  # the recorded double listings (start())
        self._prep = ThreadPoolExecutor(max(2, settings.worker.fetch_threads // 2), thread_name_prefix="prep")
        self.started_at = 0.0
        self._connect_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> SearchService:
        """Load the model (once) and start the batchers; Milvus is connected in the background,
        so a Milvus that is down at start leaves the service up and ``/readyz`` saying why."""
        s = self.settings
        t0 = time.perf_counter()
        self.encoder.load()
        self.localiser = localiser_for(self.encoder, s.crop)  # same trunk, same settings as the workers
        self.fetcher = Fetcher(  # the workers' limits: same bucket allow-list, same overall deadline
            make_s3_client(s.s3_endpoint_url, s.s3_region),
            max_bytes=s.limits.max_image_bytes,
            local_root=s.local_root,
            buckets=s.allowed_buckets,
            deadline_s=s.limits.fetch_deadline_s,
        )
        self.embedder = MicroBatcher(
            self._embed, max_items=s.encoder.batch_size, max_wait_s=s.encoder.batch_wait_ms / 1000, name="serve-embed"
        ).start()
        # no wait: a search batch fills by itself while the previous Milvus call runs
        self.searcher = MicroBatcher(
            self._search, max_items=s.serve.search_batch, max_wait_s=0.0, name="serve-search", isolate_failures=False
        ).start()
        # the state Redis of the workers, where duplicate detection records pairs (no I/O yet)
        self.pairs = PairStore(make_redis(s.effective_state_url), s.collection, lag_samples=0)
        threading.Thread(target=self._connect_quietly, name="milvus-connect", daemon=True).start()
        self.started_at = time.time()
        log.info(
            "search service: model %s on %s loaded in %.1fs; alias %s",
            self.encoder.model_version,
            self.encoder.device,
            time.perf_counter() - t0,
            s.collection,
        )
        return self

    def _connect_quietly(self) -> None:
        try:
            self._index()
        except IndexUnavailable as e:
            log.warning("Milvus not reachable yet (%s); /readyz says so until it is", e.reason)

    def close(self) -> None:
        for b in (self.embedder, self.searcher):
            if b is not None:
                b.stop()
        self._prep.shutdown(wait=False, cancel_futures=True)
        if self.index is not None:
            self.index.close()
        if self.pairs is not None:
            self.pairs.r.close()

    def ready(self) -> dict[str, Any]:
        """Model loaded and Milvus answering (raises IndexUnavailable when it does not)."""
        idx = self._index()
        try:
            live = idx.live_collection()
        except Exception as e:  # noqa: BLE001 - any gRPC failure means "not ready"
            raise IndexUnavailable(f"Milvus does not answer: {type(e).__name__}") from e
        return {
            "model_loaded": self.encoder.loaded,
            "model_version": self.encoder.model_version,
            "alias": idx.alias,
            "live_collection": live,
        }

    # -- batched stages -----------------------------------------------------------------

    def _embed(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.encoder.embed(torch.stack(tensors)))

    def _search(self, items: list[SearchItem]) -> list[list[dict[str, Any]]]:
        """One Milvus call per distinct filter, at the largest limit asked; each gets its own."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (_, _, expr) in enumerate(items):
            groups[expr].append(i)
        out: list[list[dict[str, Any]]] = [[] for _ in items]
        for expr, members in groups.items():
            limit = max(items[i][1] for i in members)
            res = self._index().search([items[i][0] for i in members], limit, filter=expr)
            for i, rows in zip(members, res):
                out[i] = rows[: items[i][1]]
        return out

    def _index(self) -> Index:
        """The index client, connected on first need (and again after a failed attempt)."""
        if self.index is None:
            with self._connect_lock:
                if self.index is None:
                    s = self.settings
                    self.index = Index.from_settings(s)
        return self.index

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._prep, fn, *args)

    async def _search_many(self, vectors: list[list[float]], limit: int, expr: str) -> list[list[dict[str, Any]]]:
        assert self.searcher is not None
        futs = [asyncio.wrap_future(self.searcher.submit((v, limit, expr))) for v in vectors]
        return list(await asyncio.gather(*futs))

    # -- queries ------------------------------------------------------------------------

    async def search(
        self, data: bytes, *, k: int, bbox: tuple[float, float, float, float] | None, filters: dict[str, list[str]]
    ) -> list[Hit]:
        """A photo (same decode, crop and limits as the workers) to the k closest products."""
        expr = filter_expression(filters)
        s = self.settings
        tensor, _ = await self._run(
            lambda: preprocess(
                data,
                bbox,
                size=self.encoder.image_size,
                max_pixels=s.limits.max_image_pixels,
                field_prefix="file",
                localiser=self.localiser,
            )
        )
        assert self.embedder is not None
        vec = await asyncio.wrap_future(self.embedder.submit(tensor))
        (rows,) = await self._search_many([vec.tolist()], k * 4, expr)
        return best_per_product(rows, k)

    async def _own(self, product_id: str) -> list[dict[str, Any]]:
        own = await self._run(self._index().get_product, product_id, self.settings.limits.max_images)
        if not own:
            raise BadRequest(f"product {product_id!r} is not in the index", field="product_id", status=404)
        return list(own)

    async def similar(self, product_id: str, *, k: int, filters: dict[str, list[str]]) -> list[Hit]:
        """Products that look like this one: each of its vectors searched, best image per product."""
        expr = filter_expression(filters)
        own = await self._own(product_id)
        res = await self._search_many([r["embedding"] for r in own], k * 4 + len(own), expr)
        return best_per_product([r for rows in res for r in rows], k, exclude=product_id)

    @property
    def duplicate_threshold(self) -> float:
        """Pairs are recorded from the detector's threshold up; the service may show fewer."""
        return max(self.settings.serve.duplicate_threshold, self.settings.duplicates.threshold)

    async def duplicates(self, product_id: str, *, k: int) -> list[Hit]:
        """The recorded double listings of one product, best first: each other product's image
        that matched (404 when the product is not in the index)."""
        assert self.pairs is not None
        pairs = [p for p in await self._run(self.pairs.pairs_of, product_id) if p.score >= self.duplicate_threshold][:k]
        matched = {p.other(product_id): (p.b_image if p.other(product_id) == p.b else p.a_image, p.score) for p in pairs}
        keys = [primary_key(product_id, 0)] + sorted({primary_key(o, j) for o, (i, _) in matched.items() for j in (i, 0)})
        rows = await self._run(lambda: self._index().get(keys, OUTPUT_FIELDS))
        if not any(r["product_id"] == product_id for r in rows):
            raise BadRequest(f"product {product_id!r} is not in the index", field="product_id", status=404)
        # the image that matched (image 0 if the product has fewer images since); a pair of a
        # product deleted since is dropped by its next check: left out meanwhile
        shown: dict[str, dict[str, Any]] = {}
        for r in sorted(rows, key=lambda r: r["image_index"] != matched.get(r["product_id"], (0, 0))[0]):
            if r["product_id"] in matched:
                shown.setdefault(r["product_id"], r)
        hits = [Hit.from_row({**r, "score": matched[pid][1]}) for pid, r in shown.items()]
        return sorted(hits, key=lambda h: (-h.score, h.product_id))

    async def duplicate_groups(self, *, limit: int) -> tuple[list[DuplicateGroup], int]:
        """The recorded groups (largest, then strongest, first) and how many pairs are recorded."""
        assert self.pairs is not None
        pairs = list(await self._run(lambda: list(self.pairs.all_pairs())))  # type: ignore[union-attr]
        found = find_groups(pairs, min_score=self.duplicate_threshold)
        return [DuplicateGroup(list(g.members), g.best.score) for g in found[:limit]], len(pairs)

    async def products(self, ids: list[str]) -> dict[str, Hit]:
        """Image 0 of each product, for pages that show groups (missing ids are left out)."""
        pks = [primary_key(p, 0) for p in ids]
        rows = await self._run(lambda: self._index().get(pks, OUTPUT_FIELDS))
        return {r["product_id"]: Hit.from_row({**r, "score": 1.0}) for r in rows}

    async def image(self, product_id: str, image_index: int) -> tuple[bytes, str]:
        """A catalog image through the workers' fetcher: the browser needs no S3 access."""
        if not 0 <= image_index < self.settings.limits.max_images:
            raise BadRequest(f"must be 0..{self.settings.limits.max_images - 1}, got {image_index}", field="image_index")
        rows = await self._run(lambda: self._index().get([primary_key(product_id, image_index)], ["image_uri"]))
        if not rows:
            raise BadRequest(f"product {product_id!r} has no image {image_index} in the index", field="product_id", status=404)
        assert self.fetcher is not None
        data: bytes = await self._run(lambda: self.fetcher.fetch(rows[0]["image_uri"], field="image"))  # type: ignore[union-attr]
        fmt = sniff_format(data)
        if fmt not in IMAGE_TYPES:
            raise InvalidEvent("the stored object is not an image", field="image")
        return data, IMAGE_TYPES[fmt]
