"""Training sets from the user's own catalog: a manifest of events, the live index, an S3 prefix.

``cardigan train`` learns from the photos the workers index. Each source yields product states
(the event contract: product id, images by URI with an optional bbox, attributes), reduced to
each product's highest version (a delete removes the product). The images are then fetched with
the workers' own :class:`~cardigan.imaging.fetch.Fetcher` (bucket allow-list, byte limit,
deadline) and handed to :func:`encoder.train.train_triplets` as bytes, which crops them with the
workers' decode → crop (pixel limit first). A photo a worker would dead-letter is skipped and
counted, with its reason.

S3 layout (``--s3-prefix s3://bucket/prefix/``): ``prefix/<product_id>/<name>.jpg``, one folder
per product, every image in it a photo of that product (the layout ``cardigan reindex
--s3-prefix`` reads). No category: mining then draws negatives from the whole batch.

Held-out products (never trained on, to measure recall before and after) are chosen by a hash of
the product id, so the split is the same for every run and every source that holds the product.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cardigan.errors import CardiganError, TransientError
from cardigan.event import Event, ImageRef
from cardigan.imaging.fetch import Fetcher, make_s3_client
from cardigan.ops.snapshot import manifest_items, s3_items
from cardigan.store.index import Index
from config.settings import Settings

_ROW_FIELDS = ["product_id", "image_index", "image_uri", "crop", "version", "attributes"]


def prepare_photo(data: bytes, bbox: Sequence[float] | None, size: int, max_pixels: int) -> Any:
    """:data:`encoder.train.Prepare`: the worker's decode → crop → resize, so train and index see
    the same pixels; None for a photo the worker would dead-letter (corrupt, too big, bad bbox)."""
    from cardigan.imaging.crop import preprocess  # torch: imported by the commands that train

    try:
        return preprocess(data, bbox, size=size, max_pixels=max_pixels)[0]
    except CardiganError:
        return None


@dataclass(frozen=True)
class CatalogPhoto:
    """One fetched photo: its bytes and the event's bbox (None: the worker's own crop)."""

    data: bytes
    bbox: tuple[float, float, float, float] | None
    uri: str = ""


@dataclass(frozen=True)
class CatalogProduct:
    """A product to train on: what :class:`encoder.train.Product` asks for, plus its category."""

    product_id: str
    images: list[CatalogPhoto]
    category: str | None = None


@dataclass
class SourceStats:
    """What a source gave and what was left out, and why (shown after loading)."""

    events: int = 0
    rejected: list[str] = field(default_factory=list)  # lines/products that are not valid events
    deleted: int = 0  # products whose latest state is a delete
    products: int = 0
    photos: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # fetch failures by error kind
    failed_examples: list[str] = field(default_factory=list)


def latest_states(events: Iterable[Event], stats: SourceStats) -> list[Event]:
    """Each product's event of highest version (the index's own rule); deletes drop the product.

    Ties keep the later event, as a replayed manifest would. Product-id order: stable runs.
    """
    best: dict[str, Event] = {}
    for ev in events:
        stats.events += 1
        cur = best.get(ev.product_id)
        if cur is None or ev.version >= cur.version:
            best[ev.product_id] = ev
    out = []
    for pid in sorted(best):
        if best[pid].type == "delete":
            stats.deleted += 1
        elif best[pid].images:
            out.append(best[pid])
    return out


def manifest_events(path: Path, settings: Settings, stats: SourceStats) -> Iterator[Event]:
    """Events of a JSON-lines manifest (the event contract); invalid lines are counted, named."""
    if not path.is_file():
        raise FileNotFoundError(f"--manifest: no file at {path}")
    lim = settings.limits
    for item in manifest_items(path, after=None, max_images=lim.max_images, max_id_len=lim.max_product_id_len):
        if item.event is None:
            stats.rejected.append(f"{path.name} {item.rejected}")
        else:
            yield item.event


def index_events(index: Index, stats: SourceStats, collection: str | None = None, page: int = 1000) -> Iterator[Event]:
    """The products the index holds, as events: image URIs and crops stored with the vectors.

    Read with Milvus's query iterator (pages of ``page`` rows, Strong consistency), so a catalog
    of any size streams; a product whose rows are of mixed versions (a write in flight) keeps
    the rows of its highest version.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in index.iter_rows(collection, batch=page, fields=_ROW_FIELDS):
        rows.setdefault(str(row["product_id"]), []).append(row)
    for pid in sorted(rows):
        got = rows[pid]
        top = max(int(r["version"]) for r in got)
        cur = sorted((r for r in got if int(r["version"]) == top), key=lambda r: int(r["image_index"]))
        images = []
        for r in cur:
            bbox = (r.get("crop") or {}).get("bbox")
            images.append(ImageRef(uri=str(r["image_uri"]), bbox=tuple(bbox) if bbox else None))
        attributes = cur[0].get("attributes") or {}
        yield Event(type="modify", product_id=pid, version=top, images=images, attributes=attributes)


def s3_events(s3: Any, uri: str, settings: Settings, stats: SourceStats) -> Iterator[Event]:
    """One product per ``<prefix><product_id>/`` folder (the reindex layout)."""
    lim = settings.limits
    for item in s3_items(s3, uri, after=None, max_images=lim.max_images, max_id_len=lim.max_product_id_len):
        if item.event is None:
            stats.rejected.append(item.rejected or item.cursor)
        else:
            yield item.event


def category(ev: Event) -> str | None:
    """``attributes.category`` when it is a non-empty string."""
    cat = (ev.attributes or {}).get("category")
    return cat if isinstance(cat, str) and cat else None


def fetch_products(
    events: Sequence[Event],
    fetcher: Fetcher,
    stats: SourceStats,
    *,
    threads: int = 8,
    console: Console | None = None,
) -> list[CatalogProduct]:
    """Every image's bytes, fetched in parallel like a worker fetches; failures are counted by
    kind and the product keeps the photos that came. A transient failure (S3 unreachable)
    stops the load: training on whatever half came through would be a silent surprise."""
    jobs = [(i, j, img) for i, ev in enumerate(events) for j, img in enumerate(ev.images)]

    def one(job: tuple[int, int, ImageRef]) -> tuple[int, int, CatalogPhoto | CardiganError]:
        i, j, img = job
        try:
            data = fetcher.fetch(img.uri, field=f"images[{j}].uri")
        except TransientError:
            raise
        except CardiganError as e:  # permanent: the worker would dead-letter this image too
            return i, j, e
        return i, j, CatalogPhoto(data, img.bbox, img.uri)

    photos: dict[int, list[tuple[int, CatalogPhoto]]] = {}
    progress = Progress(
        TextColumn("fetching photos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console or Console(stderr=True)
    )
    with progress, ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        task = progress.add_task("fetch", total=len(jobs))
        for i, j, got in pool.map(one, jobs):  # counted here, in one thread
            progress.advance(task)
            if isinstance(got, CatalogPhoto):
                photos.setdefault(i, []).append((j, got))
                continue
            stats.failed[got.kind] += 1
            if len(stats.failed_examples) < 5:
                stats.failed_examples.append(f"{events[i].product_id} images[{j}]: {got}")
    out = []
    for i, ev in enumerate(events):
        got = [p for _, p in sorted(photos.get(i, []), key=lambda t: t[0])]
        if got:
            out.append(CatalogProduct(ev.product_id, got, category(ev)))
    stats.products = len(out)
    stats.photos = sum(len(p.images) for p in out)
    return out


def split_heldout(products: Sequence[CatalogProduct], share: float, seed: int) -> tuple[list[CatalogProduct], list[CatalogProduct]]:
    """(train, held out): about ``share`` of the products with two or more photos (a held-out
    query needs another photo of its product to find), chosen by a hash of seed and product id."""
    if not 0 <= share < 1:
        raise ValueError(f"--heldout-share must be in [0, 1), got {share}")
    train: list[CatalogProduct] = []
    held: list[CatalogProduct] = []
    for p in products:
        h = int.from_bytes(hashlib.sha256(f"{seed}\x1f{p.product_id}".encode()).digest()[:8], "big") / 2**64
        (held if len(p.images) > 1 and h < share else train).append(p)
    return train, held


def make_fetcher(settings: Settings, threads: int) -> Fetcher:
    """The workers' fetcher: the same bucket allow-list, byte limit and deadline."""
    s = settings
    return Fetcher(
        make_s3_client(s.s3_endpoint_url, s.s3_region, max_pool=threads),
        max_bytes=s.limits.max_image_bytes,
        local_root=s.local_root,
        max_pool=threads,
        buckets=s.allowed_buckets,
        deadline_s=s.limits.fetch_deadline_s,
    )


def load_catalog(
    settings: Settings,
    *,
    manifest: Path | None = None,
    from_index: bool = False,
    s3_prefix: str | None = None,
    max_products: int | None = None,
    threads: int = 8,
    console: Console | None = None,
) -> tuple[list[CatalogProduct], SourceStats]:
    """Products from the named sources (several may be given: a product in two keeps its
    highest version), fetched and ready for :func:`encoder.train.train_triplets`."""
    if manifest is None and not from_index and not s3_prefix:
        raise ValueError("name a source: --manifest FILE, --from-index or --s3-prefix s3://bucket/prefix/")
    stats = SourceStats()
    events: list[Event] = []
    if manifest is not None:
        events.extend(manifest_events(manifest, settings, stats))
    if from_index:
        index = Index.from_settings(settings)
        try:
            if index.live_collection() is None:
                raise ValueError(f"--from-index: the index {settings.collection!r} does not exist yet (nothing indexed)")
            events.extend(index_events(index, stats, index.live_collection()))
        finally:
            index.close()
    if s3_prefix:
        events.extend(s3_events(make_s3_client(settings.s3_endpoint_url, settings.s3_region), s3_prefix, settings, stats))
    states = latest_states(events, stats)
    if max_products is not None:
        states = states[:max_products]
    products = fetch_products(states, make_fetcher(settings, threads), stats, threads=threads, console=console)
    return products, stats
