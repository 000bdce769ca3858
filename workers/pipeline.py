"""One worker process's pipeline: event → fetch → crop → embed → write.

Built once per process at worker start (model loaded, clients opened), then shared by every
task thread. ``handle`` is the whole job for one event and knows nothing about Celery.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import redis

from cardigan.duplicates import axis, signature, structure
from cardigan.errors import IndexRejected, PermanentError
from cardigan.event import Event, ImageRef, parse_event, primary_key
from cardigan.imaging.crop import preprocess_pixels
from cardigan.imaging.device_decode import ImageJob, device_crops
from cardigan.imaging.fetch import Fetcher, make_s3_client
from cardigan.imaging.localise import localiser_for
from cardigan.keys import OUTCOME_KEY, STATS_KEY
from cardigan.store.guard import VersionGuard, make_redis
from cardigan.store.index import Index
from cardigan.store.tombstones import Tombstones
from config.settings import Settings
from encoder import Encoder, build_encoder
from workers.batcher import MicroBatcher
from workers.detector import DetectorLoop, build_detector
from workers.writer import IndexWriter, Outcome, WriteOp

log = logging.getLogger(__name__)

# Per-process batch statistics, one hash field per process ("<host>:<pid>"), refreshed every
# STATS_INTERVAL_S: how full batches really are (`cardigan bench` reads it, under cardigan.keys.STATS_KEY).
# Cumulative counters.
STATS_INTERVAL_S = 1.0


@dataclass
class Result:
    product_id: str
    version: int
    type: str
    outcome: Outcome
    images: int

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class Pipeline:
    """Owns the model, the clients and the two batchers of one process."""

    def __init__(self, settings: Settings, *, encoder: Encoder | None = None) -> None:
        self.settings = settings
        s = settings
        self.state = make_redis(s.effective_state_url)
        self.guard = VersionGuard(self.state, lock_ttl_ms=s.worker.lock_ttl_ms)
        self.index = Index.from_settings(s)
        self.live = self.index.ensure()
        self.fetcher = Fetcher(
            make_s3_client(s.s3_endpoint_url, s.s3_region),
            max_bytes=s.limits.max_image_bytes,
            local_root=s.local_root,
            max_pool=s.worker.fetch_threads + s.worker.concurrency,
            buckets=s.allowed_buckets,
            deadline_s=s.limits.fetch_deadline_s,
        )
        self.encoder = encoder or build_encoder(s.encoder)
        self.encoder.load()
        self.localiser = localiser_for(self.encoder, s.crop)  # busy photos without a bbox; reuses the trunk
        self.writer = IndexWriter(
            self.index,
            self.guard,
            self.state,
            max_images=s.limits.max_images,
            live=self.live,
            tombstones=Tombstones(self.state, retention_s=s.worker.tombstone_retention_s),
            handoff=self._start_detector(),
        )
        self._prep_pool = ThreadPoolExecutor(s.worker.fetch_threads, thread_name_prefix="fetch")
        # items are uint8 S×S×3 crops (the encoder normalises each batch once, on the GPU there),
        # or, with encoder.decode="device", fetched bytes that the batch decodes on the device
        self._decode_on_device = s.encoder.decode == "device"
        self.embedder: MicroBatcher[np.ndarray | ImageJob, np.ndarray] = MicroBatcher(
            self._embed, max_items=s.encoder.batch_size, max_wait_s=s.encoder.batch_wait_ms / 1000, name="embed"
        ).start()
        self.write_batcher: MicroBatcher[WriteOp, Outcome | IndexRejected] = MicroBatcher(
            self.writer.write_batch,
            max_items=s.worker.write_batch_size,
            max_wait_s=s.worker.write_wait_ms / 1000,
            name="write",
            isolate_failures=False,
        ).start()
        self._stats_key = STATS_KEY.format(alias=s.collection)
        self._stats_field = f"{socket.gethostname()}:{os.getpid()}"
        self._stats_stop = threading.Event()
        threading.Thread(target=self._report_stats, name="stats", daemon=True).start()
        log.info(
            "pipeline ready: model %s on %s, index %s (live %s)", self.encoder.model_version, self.encoder.device, s.collection, self.live
        )

    def _start_detector(self) -> DetectorLoop | None:
        """Double-listing detection runs beside indexing (workers/detector.py); None when off."""
        self.detector: DetectorLoop | None = None
        if self.settings.duplicates.enabled:
            self.detector = build_detector(self.settings, self.index, self.state).start()
        return self.detector

    def close(self) -> None:
        self._stats_stop.set()
        if self.detector is not None:
            self.detector.stop()
        self.embedder.stop()
        self.write_batcher.stop()
        self.publish_stats()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self.index.close()
        self.state.close()

    def publish_stats(self) -> None:
        """Write this process's cumulative batch statistics to the state store (best effort)."""
        doc = {"embed": asdict(self.embedder.stats), "write": asdict(self.write_batcher.stats), "time": time.time()}
        try:
            pipe = self.state.pipeline(transaction=False)
            pipe.hset(self._stats_key, self._stats_field, json.dumps(doc))
            pipe.expire(self._stats_key, 7 * 24 * 3600)
            pipe.execute()
        except redis.RedisError:
            log.debug("batch statistics not published", exc_info=True)

    def _report_stats(self) -> None:
        while not self._stats_stop.wait(STATS_INTERVAL_S):
            self.publish_stats()

    # -- the job -----------------------------------------------------------------------

    def handle(self, raw: Any, *, collection: str | None = None) -> Result:
        """Index or delete one product; raises PermanentError or TransientError.

        ``collection``: write there only (a reindex snapshot), not to the live write targets.
        """
        lim = self.settings.limits
        ev = parse_event(raw, max_images=lim.max_images, max_id_len=lim.max_product_id_len)
        if ev.type != "delete" and self._already_newer(ev, collection):
            # cheap early exit for duplicates and late arrivals; the guard re-checks at write
            if collection is None and self._recorded_live(ev):  # a redelivery: hand-off again
                self.writer.requeue(ev.product_id, ev.published_at_ms)
            return self._recorded(Result(ev.product_id, ev.version, ev.type, "stale", 0), collection)
        if ev.type == "delete":
            op = WriteOp(ev.product_id, ev.version, "delete", published_at_ms=ev.published_at_ms, collection=collection)
        else:
            op = WriteOp(ev.product_id, ev.version, "upsert", self._rows(ev), published_at_ms=ev.published_at_ms, collection=collection)
        # the batcher raises an IndexRejected result (Milvus refused this op's rows alone)
        outcome = cast(Outcome, self.write_batcher.submit(op).result())
        return self._recorded(Result(ev.product_id, ev.version, ev.type, outcome, len(op.rows)), collection)

    def _recorded(self, res: Result, collection: str | None) -> Result:
        """Keep a live event's outcome for ``cardigan events show`` (one key per product, with a
        TTL so the state store stays bounded; best effort: the index is the truth)."""
        ttl = self.settings.worker.outcome_ttl_s
        if collection is None and ttl > 0:
            doc = {"version": res.version, "type": res.type, "outcome": res.outcome, "vectors": res.images, "time": time.time()}
            try:
                self.state.set(OUTCOME_KEY.format(alias=self.settings.collection, product_id=res.product_id), json.dumps(doc), ex=ttl)
            except redis.RedisError:
                log.debug("outcome not recorded", exc_info=True)
        return res

    def _recorded_live(self, ev: Event) -> bool:
        """This very version is the live one recorded (its worker may have died before handing
        it to duplicate detection); False when detection is off."""
        if self.detector is None:
            return False
        recs = [self.guard.versions(c, [ev.product_id])[ev.product_id] for c in self.writer.targets()]
        return any(r is not None and r[0] == ev.version for r in recs)

    def _already_newer(self, ev: Event, collection: str | None = None) -> bool:
        targets = [collection] if collection else self.writer.targets()
        recs = [self.guard.versions(c, [ev.product_id])[ev.product_id] for c in targets]
        return all(r is not None and r[0] >= ev.version for r in recs)

    def _prepare(self, img: ImageRef, i: int) -> np.ndarray | ImageJob:
        field = f"images[{i}]"
        data = self.fetcher.fetch(img.uri, field=f"{field}.uri")
        if self._decode_on_device:
            return ImageJob(data, img.bbox, field)  # decoded with its batch, in _embed
        pixels, _method = preprocess_pixels(
            data,
            img.bbox,
            size=self.settings.encoder.image_size,
            max_pixels=self.settings.limits.max_image_pixels,
            max_bytes=self.settings.limits.max_decode_bytes,
            field_prefix=field,
            localiser=self.localiser,
        )
        return pixels

    def _rows(self, ev: Event) -> list[dict[str, Any]]:
        # fetch + decode of a product's images overlap each other and other tasks' forward passes
        crops = [f.result() for f in [self._prep_pool.submit(self._prepare, img, i) for i, img in enumerate(ev.images)]]
        vectors = [f.result() for f in [self.embedder.submit(c) for c in crops]]
        mv = self.encoder.model_version
        return [
            {
                "pk": primary_key(ev.product_id, i),
                "product_id": ev.product_id,
                "image_index": i,
                "image_uri": img.uri,
                "crop": _crop_doc(img, crop),
                "version": ev.version,
                "model_version": mv,
                "attributes": ev.attributes,
                "embedding": vec.tolist(),
            }
            for i, (img, crop, vec) in enumerate(zip(ev.images, crops, vectors))
        ]

    def _embed(self, items: list[np.ndarray | ImageJob]) -> list[np.ndarray | PermanentError]:
        t0 = time.perf_counter()
        if not self._decode_on_device:
            out: list[np.ndarray | PermanentError] = list(self.encoder.embed_pixels(cast(list[np.ndarray], items)))
        else:
            lim = self.settings.limits
            crops = device_crops(
                cast(list[ImageJob], items), size=self.encoder.image_size, max_pixels=lim.max_image_pixels,
                max_bytes=lim.max_decode_bytes, device=self.encoder.device,
            )  # fmt: skip
            good = [c for c in crops if not isinstance(c, PermanentError)]
            vectors = iter(self.encoder.embed_pixels(good) if good else ())
            # a bad image fails its own event (the batcher raises it there), not its neighbours
            out = [c if isinstance(c, PermanentError) else next(vectors) for c in crops]
        log.debug("embedded %d images in %.1f ms", len(items), (time.perf_counter() - t0) * 1000)
        return out


def _crop_doc(img: ImageRef, crop: np.ndarray | ImageJob) -> dict[str, Any]:
    """The row's crop JSON: the bbox (a reindex crops again from it) and, when the crop was made
    on this host, its colour signature, structure descriptor and colour axis for double-listing
    detection (cardigan/duplicates/signature.py, structure.py, axis.py; a device-decoded crop
    never reaches the host, so its rows go without them; a flat crop has no axis)."""
    doc: dict[str, Any] = {"bbox": list(img.bbox) if img.bbox else None}
    if isinstance(crop, np.ndarray):
        doc[signature.SIG_KEY] = signature.encode(signature.colour_signature(crop))
        doc[structure.ST_KEY] = structure.encode(structure.structure(crop))
        if (ax := axis.colour_axis(crop)) is not None:
            doc[axis.AX_KEY] = axis.encode(ax)
    return doc
