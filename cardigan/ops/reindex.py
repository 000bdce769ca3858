"""Blue/green reindex: build ``<alias>_vN+1`` beside the live collection, verify it, switch.

The steps, each recorded in Redis so an interrupted run resumes where it stopped:

1. **begin**: create the new collection; copy the live guard's tombstones into the new one's
   guard (a late, stale modify must not resurrect a deleted product there); put both
   collections in the write targets, so every live event from now on reaches both, each
   behind its own version guard.
2. **fill**: publish the snapshot as bulk tasks (several products each) pinned to the new
   collection, with flow control (``max_in_flight`` chunks published and not yet done) and a
   cursor per chunk. A snapshot event carries the version it was read at, so it never
   overwrites a newer live event, and a live event always beats an older snapshot.
3. **verify**: a catch-up pass re-sends whatever the live guard has newer than the new one
   (races around step 1, writes in flight while the snapshot read them), then every product
   is checked (vectors at the recorded version, images 0..n-1, the same count as the live
   collection at the same version, the encoder's model version) and a sample of searches
   must find their own product.
4. **switch**: the alias moves in one step; the write targets become the new collection
   alone; the old collection is dropped unless ``keep_old``.

The snapshot from the live index reads each product's guard record *before* its rows: rows
at that version are then complete (the guard is recorded after the write); anything else is
a write in flight and is left to the catch-up pass.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from cardigan.errors import CardiganError
from cardigan.event import primary_key
from cardigan.keys import BULK_TASK, REINDEX_DONE_KEY, REINDEX_STATE_KEY, TARGETS_KEY
from cardigan.ops.snapshot import (
    Item,
    SourceSpec,
    events_from_collection,
    index_items,
    manifest_items,
    s3_items,
    wire,
)
from cardigan.store.guard import VersionGuard, make_redis
from cardigan.store.index import Index, collection_name, collection_number, escape_filter_string
from config.settings import Settings

log = logging.getLogger(__name__)


Phase = Literal["filling", "verifying", "switching", "switched", "done", "aborted"]
ACTIVE_PHASES = ("filling", "verifying", "switching")

# A chunk counts once, and only for the run that published it: a late chunk of an aborted
# run, or a redelivered one, cannot move this run's progress.
_CHUNK_DONE = """
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return -1 end
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[4])
  return 1
end
return 0
"""


class ReindexError(CardiganError):
    """The reindex cannot go on; the message says what to do."""

    kind = "reindex"


class Interrupted(ReindexError):
    kind = "interrupted"


# -- progress, in Redis -------------------------------------------------------------------


class ReindexState:
    """One alias's reindex run: phase, collections, source, cursor and counters."""

    def __init__(self, r: redis.Redis, alias: str) -> None:
        self._r = r
        self.key = REINDEX_STATE_KEY.format(alias=alias)
        self.done_key = REINDEX_DONE_KEY.format(alias=alias)
        self._chunk_done = r.register_script(_CHUNK_DONE)

    def get(self) -> dict[str, str]:
        return dict(self._r.hgetall(self.key))  # type: ignore[arg-type]

    def begin(self, fields: dict[str, Any]) -> None:
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self.key, self.done_key)
        pipe.hset(self.key, mapping={k: str(v) for k, v in fields.items()})
        pipe.execute()

    def update(self, **fields: Any) -> None:
        self._r.hset(self.key, mapping={**{k: str(v) for k, v in fields.items()}, "updated_at": str(time.time())})

    def published(self, *, chunks: int, cursor: str, events: int, skipped: int, rejected: int, counter: str = "published") -> None:
        """A chunk went out: move the cursor and the counters in one step."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self.key, mapping={"chunks": str(chunks), "cursor": cursor, "updated_at": str(time.time())})
        pipe.hincrby(self.key, counter, events)
        pipe.hincrby(self.key, "sent", events)
        pipe.hincrby(self.key, "skipped", skipped)
        pipe.hincrby(self.key, "rejected", rejected)
        pipe.execute()

    def chunk_done(self, run: str, chunk: int, n: int) -> bool:
        """Called by the bulk task when a chunk is finished; False if it was counted already."""
        return int(self._chunk_done(keys=[self.key, self.done_key], args=[run, str(chunk), str(n), str(time.time())])) == 1

    def chunks_done(self) -> int:
        return int(self._r.scard(self.done_key))


def reindex_progress(r: redis.Redis, alias: str) -> dict[str, Any] | None:
    """The last reindex of ``alias`` for `cardigan status`: phase, collections, counters."""
    st = ReindexState(r, alias).get()
    if not st:
        return None
    ints = ("total", "published", "repaired", "sent", "done", "chunks", "skipped", "rejected", "tombstones")
    out: dict[str, Any] = {k: st.get(k) for k in ("phase", "old", "new", "source", "source_arg", "model_version", "message")}
    out.update({k: int(st.get(k) or 0) for k in ints})
    out.update({k: float(st[k]) for k in ("started_at", "updated_at", "finished_at") if st.get(k)})
    out["keep_old"] = st.get("keep_old") == "1"
    return out


# -- verification ---------------------------------------------------------------------------


@dataclass
class Check:
    """What the verification of the new collection found."""

    products: int = 0
    vectors: int = 0
    deleted: int = 0
    repaired: int = 0
    searches: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        head = "verified" if self.ok else f"NOT verified ({len(self.mismatches)} problems)"
        return f"{head}: {self.products} products, {self.vectors} vectors, {self.deleted} tombstones, {self.repaired} caught up, {self.searches} sample searches"


# -- the run ------------------------------------------------------------------------------


ProgressFn = Callable[[dict[str, str]], None]


class Reindexer:
    """Drives one alias's reindex; every step can be repeated after an interruption."""

    def __init__(self, settings: Settings, *, app: Any = None, settle_s: float = 2.0, check_every_s: float = 30.0) -> None:
        from encoder import model_version_for

        s = settings
        self.s = s
        self.r = make_redis(s.effective_state_url)
        self.guard = VersionGuard(self.r, lock_ttl_ms=s.worker.lock_ttl_ms)
        self.index = Index.from_settings(s)
        self.state = ReindexState(self.r, s.collection)
        self.targets_key = TARGETS_KEY.format(alias=s.collection)
        self.model_version = model_version_for(s.encoder)
        self.max_images = s.limits.max_images
        self.settle_s = settle_s
        self.check_every_s = check_every_s
        self.stop = threading.Event()  # set by SIGINT: finish the chunk in hand, then stop
        self._app = app

    @property
    def app(self) -> Any:
        if self._app is None:
            from config.celery_app import create_app

            self._app = create_app(self.s)
        return self._app

    def close(self) -> None:
        self.index.close()
        self.r.close()

    # -- begin ---------------------------------------------------------------------------

    def current(self) -> dict[str, str]:
        return self.state.get()

    def begin(self, spec: SourceSpec, *, keep_old: bool, total: int | None = None) -> dict[str, str]:
        """Create the new collection, seed its guard, start writing live events to both."""
        st = self.current()
        if st.get("phase") in ACTIVE_PHASES:
            raise ReindexError(
                f"a reindex of {self.s.collection} into {st.get('new')} is already {st['phase']} "
                f"({st.get('done', 0)}/{st.get('total', '?')} products): `cardigan reindex --resume` continues it, "
                "`cardigan reindex --abort` drops it"
            )
        old = self.index.ensure()
        # never reuse a name, not even an aborted run's: its late chunks must find no target
        used = [old, *self.index.collections(), st.get("new") or ""]
        new = collection_name(self.s.collection, max(collection_number(c) for c in used) + 1)
        self.index.create_collection(new)
        tombstones, live_products = self._copy_tombstones(old, new)
        run = uuid.uuid4().hex[:12]
        self.state.begin(
            {
                "run": run, "phase": "filling", "old": old, "new": new, "source": spec.kind, "source_arg": spec.arg,
                "model_version": self.model_version, "total": live_products if total is None else total, "tombstones": tombstones,
                "published": 0, "repaired": 0, "sent": 0, "done": 0, "chunks": 0, "skipped": 0, "rejected": 0, "cursor": "",
                "keep_old": int(keep_old), "started_at": time.time(), "updated_at": time.time(),
            }
        )  # fmt: skip
        self._set_targets([old, new])
        log.info("reindex %s: %s -> %s from %s (model %s)", run, old, new, spec.describe(), self.model_version)
        time.sleep(self.settle_s)  # batches that read the old targets finish; the catch-up does the rest
        return self.current()

    def _copy_tombstones(self, old: str, new: str) -> tuple[int, int]:
        """Deleted products stay deleted in the new collection; returns (tombstones, live products)."""
        tombs: dict[str, tuple[int, str]] = {}
        n_tomb = n_live = 0
        for pid, val in self.r.hscan_iter(self.guard._vkey(old), count=1000):  # streamed: no full copy in memory
            ver, _, kind = str(val).partition(":")
            if kind == "delete":
                tombs[str(pid)] = (int(ver), kind)
                n_tomb += 1
            else:
                n_live += 1
            if len(tombs) >= 1000:
                self.guard.record(new, tombs)
                tombs = {}
        self.guard.record(new, tombs)
        return n_tomb, n_live

    def _set_targets(self, names: list[str]) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.targets_key)
        pipe.sadd(self.targets_key, *names)
        pipe.execute()

    # -- fill ----------------------------------------------------------------------------

    def items(self, st: dict[str, str], s3: Any = None) -> Iterator[Item]:
        after = st.get("cursor") or None
        lim = self.s.limits
        if st["source"] == "index":
            return index_items(self.index, self.guard, st["old"], after=after, max_images=lim.max_images)
        if st["source"] == "manifest":
            return manifest_items(Path(st["source_arg"]), after=after, max_images=lim.max_images, max_id_len=lim.max_product_id_len)
        if s3 is None:
            from cardigan.imaging.fetch import make_s3_client

            s3 = make_s3_client(self.s.s3_endpoint_url, self.s.s3_region)
        return s3_items(s3, st["source_arg"], after=after, max_images=lim.max_images, max_id_len=lim.max_product_id_len)

    def fill(
        self,
        items: Iterable[Item],
        *,
        chunk: int,
        max_in_flight: int,
        on_progress: ProgressFn | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        """Publish the snapshot from the recorded cursor on, then wait until workers finish it."""
        st = self.current()
        self._set_targets([st["old"], st["new"]])  # a resumed run re-asserts them
        buf: list[Item] = []
        last_check = time.monotonic()
        for item in items:
            if item.rejected and on_reject:
                on_reject(item.rejected)
            buf.append(item)
            if len(buf) >= chunk:
                self._send(buf, max_in_flight=max_in_flight, on_progress=on_progress)
                buf = []
                if time.monotonic() - last_check > self.check_every_s:
                    self._check_models()
                    last_check = time.monotonic()
        if buf:
            self._send(buf, max_in_flight=max_in_flight, on_progress=on_progress)
        self.wait(on_progress)
        self._check_models()
        self.state.update(phase="verifying")

    def _send(self, buf: list[Item], *, max_in_flight: int, on_progress: ProgressFn | None, counter: str = "published") -> None:
        st = self.current()
        events = [it.event for it in buf if it.event is not None]
        skipped = sum(1 for it in buf if it.event is None and not it.rejected)
        rejected = sum(1 for it in buf if it.rejected)
        seq = int(st.get("chunks") or 0)
        if events:
            self._wait_room(max_in_flight, on_progress)
            if self.stop.is_set():
                raise Interrupted("interrupted")
            self.app.send_task(
                BULK_TASK,
                args=[[wire(e) for e in events]],
                kwargs={"collection": st["new"], "run": st["run"], "chunk": seq, "size": len(events)},
                queue=self.s.bulk_queue,
                routing_key=self.s.bulk_queue,
                argsrepr=f"{len(events)} events -> {st['new']} (chunk {seq})",
                retry=True,
                retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3},
            )
            seq += 1
        self.state.published(chunks=seq, cursor=buf[-1].cursor, events=len(events), skipped=skipped, rejected=rejected, counter=counter)
        if self.stop.is_set():
            raise Interrupted("interrupted")

    def _wait_room(self, max_in_flight: int, on_progress: ProgressFn | None) -> None:
        while True:
            st = self.current()
            if int(st.get("chunks") or 0) - self.state.chunks_done() < max_in_flight or self.stop.is_set():
                return
            if on_progress:
                on_progress(st)
            time.sleep(0.1)

    def wait(self, on_progress: ProgressFn | None = None, stall_warn_s: float = 120.0) -> None:
        """Until every published chunk is done (workers on the bulk queue do the work)."""
        last_done, since = -1, time.monotonic()
        while True:
            st = self.current()
            if on_progress:
                on_progress(st)
            done = int(st.get("done") or 0)
            if done >= int(st.get("sent") or 0):
                return
            if self.stop.is_set():
                raise Interrupted("interrupted")
            if done != last_done:
                last_done, since = done, time.monotonic()
            elif time.monotonic() - since > stall_warn_s:
                log.warning(
                    "no progress for %.0f s: is a worker consuming %s with model %s? (`cardigan status`, `cardigan dead list`)",
                    time.monotonic() - since, self.s.bulk_queue, self.model_version,
                )  # fmt: skip
                since = time.monotonic()
            time.sleep(0.2)

    def _check_models(self) -> None:
        """Fail fast when a worker with another model writes into the new collection."""
        st = self.current()
        flt = f"model_version != {escape_filter_string(self.model_version)}"
        rows = self.index.client.query(st["new"], filter=flt, output_fields=["pk", "model_version"], limit=1, consistency_level="Strong")
        if rows:
            raise ReindexError(
                f"{st['new']} has vectors of model {rows[0]['model_version']} (e.g. {rows[0]['pk']}), but this reindex builds "
                f"{self.model_version}: a worker runs another model. Roll every worker to the same CARDIGAN_ENCODER__* settings "
                "as this command (docs/operations.md, 'Reindex'), then `cardigan reindex --abort` and start again."
            )

    # -- verify --------------------------------------------------------------------------

    def catch_up(self, *, chunk: int, max_in_flight: int, rounds: int = 5, on_progress: ProgressFn | None = None) -> int:
        """Re-send what the live guard has newer than the new one; returns products re-sent."""
        st = self.current()
        sent = 0
        for _ in range(rounds):
            lag = self._lagging(st["old"], st["new"])
            if not lag:
                break
            events = events_from_collection(self.index, self.guard, st["old"], lag, self.max_images)
            items = [Item(st.get("cursor", ""), ev) for ev in events.values() if ev is not None]
            for start in range(0, len(items), chunk):
                self._send(items[start : start + chunk], max_in_flight=max_in_flight, on_progress=on_progress, counter="repaired")
            sent += len(items)
            self.wait(on_progress)
            time.sleep(min(self.settle_s, 1.0))
        return sent

    def _lagging(self, old: str, new: str) -> list[str]:
        """Products whose live record is newer than the new collection's (or missing there)."""
        out: set[str] = set()
        page: dict[str, tuple[int, str]] = {}

        def flush() -> None:
            theirs = self.guard.versions(new, list(page))
            out.update(p for p, rec in page.items() if theirs[p] is None or theirs[p][0] < rec[0])  # type: ignore[index]
            page.clear()

        for pid, val in self.r.hscan_iter(self.guard._vkey(old), count=1000):
            ver, _, kind = str(val).partition(":")
            page[str(pid)] = (int(ver), kind)
            if len(page) >= 500:
                flush()
        if page:
            flush()
        return sorted(out)

    def verify(self, *, samples: int = 5, rechecks: int = 3) -> Check:
        """Every product of the new collection against its guard and the live collection."""
        st = self.current()
        old, new = st["old"], st["new"]
        chk = Check(repaired=int(st.get("repaired") or 0))
        suspects: dict[str, str] = {}
        sample: list[str] = []
        # every product with vectors in the new collection, in id order
        batch: list[str] = []
        last = None
        for row in self.index.iter_rows(new, batch=1000, fields=["pk", "product_id"]):
            chk.vectors += 1
            pid = str(row["product_id"])
            if pid != last:  # point reads below fetch all of a product's keys at once
                last = pid
                batch.append(pid)
            if len(batch) >= 200:
                suspects.update(self._check(batch, old, new))
                batch = []
        suspects.update(self._check(batch, old, new))
        # every product the guards know: missing or behind in the new collection, tombstones
        for name in (new, old):
            page: list[str] = []
            for pid, _ in self.r.hscan_iter(self.guard._vkey(name), count=1000):
                page.append(str(pid))
                if len(page) >= 200:
                    suspects.update(self._check(page, old, new))
                    page = []
            suspects.update(self._check(page, old, new))
        # products change under a live index: only what stays wrong is wrong
        for _ in range(rechecks):
            if not suspects:
                break
            time.sleep(1.0)
            pids = sorted(suspects)
            suspects = {}
            for start in range(0, len(pids), 200):
                suspects.update(self._check(pids[start : start + 200], old, new))
        chk.mismatches = [f"{pid}: {why}" for pid, why in sorted(suspects.items())]
        for pid, val in self.r.hscan_iter(self.guard._vkey(new), count=1000):
            if str(val).endswith(":delete"):
                chk.deleted += 1
            else:
                chk.products += 1
                if len(sample) < samples:
                    sample.append(str(pid))
        chk.searches, failures = self._sample_searches(sample, new)
        chk.mismatches += failures
        if chk.products and not chk.searches:
            chk.mismatches.append("no sample search could run: the new collection has no readable vectors")
        return chk

    def _check(self, pids: list[str], old: str, new: str) -> dict[str, str]:
        """Point reads, guard first: the problems of these products now."""
        if not pids:
            return {}
        pids = sorted(set(pids))
        live_v = self.guard.versions(old, pids)
        new_v = self.guard.versions(new, pids)
        keys = [primary_key(p, i) for p in pids for i in range(self.max_images)]
        fields = ["product_id", "image_index", "image_uri", "version", "model_version"]
        rows_new: dict[str, list[dict[str, Any]]] = {}
        for r in self.index.get(keys, fields, new):
            rows_new.setdefault(r["product_id"], []).append(r)
        same = [p for p in pids if live_v[p] is not None and live_v[p] == new_v[p] and live_v[p][1] != "delete"]  # type: ignore[index]
        rows_old: dict[str, list[dict[str, Any]]] = {}
        if same:
            for r in self.index.get([primary_key(p, i) for p in same for i in range(self.max_images)], fields, old):
                rows_old.setdefault(r["product_id"], []).append(r)
        out: dict[str, str] = {}
        for pid in pids:
            lv, nv = live_v[pid], new_v[pid]
            got = sorted(rows_new.get(pid, []), key=lambda r: int(r["image_index"]))
            if lv is not None and (nv is None or nv[0] < lv[0]):
                out[pid] = f"behind the live collection (live v{lv[0]} {lv[1]}, new {'nothing' if nv is None else f'v{nv[0]} {nv[1]}'})"
            elif nv is None:
                if got:
                    out[pid] = f"{len(got)} vectors but no version record"
            elif nv[1] == "delete":
                if got:
                    out[pid] = f"deleted at v{nv[0]} but {len(got)} vectors remain"
            elif not got:
                out[pid] = f"recorded at v{nv[0]} but has no vectors"
            elif {int(r["version"]) for r in got} != {nv[0]}:
                out[pid] = f"vectors at versions {sorted({int(r['version']) for r in got})}, recorded v{nv[0]}"
            elif [int(r["image_index"]) for r in got] != list(range(len(got))):
                out[pid] = f"images {[int(r['image_index']) for r in got]}, expected 0..{len(got) - 1}"
            elif {r["model_version"] for r in got} != {self.model_version}:
                out[pid] = f"model {sorted({r['model_version'] for r in got})}, expected {self.model_version}"
            elif pid in rows_old:
                live_rows = sorted(rows_old[pid], key=lambda r: int(r["image_index"]))
                if [r["image_uri"] for r in live_rows] != [r["image_uri"] for r in got]:
                    out[pid] = f"{len(got)} images, the live collection has {len(live_rows)} at the same version v{nv[0]}"
        return out

    def _sample_searches(self, pids: list[str], new: str) -> tuple[int, list[str]]:
        """A product's own vector must find it: the index is built and answers."""
        ran, failures = 0, []
        for pid in pids:
            rows = self.index.get_product(pid, self.max_images, collection=new)
            if not rows:
                continue  # deleted meanwhile
            hits = self.index.search([rows[0]["embedding"]], 5, collection=new, consistency="Strong")[0]
            ran += 1
            if pid not in {h["product_id"] for h in hits}:
                failures.append(f"search with {pid}'s own vector did not find it (got {[h['product_id'] for h in hits]})")
        return ran, failures

    # -- switch, abort -------------------------------------------------------------------

    def switch(self) -> dict[str, str]:
        """Alias to the new collection, writes to it alone, then drop the old (unless kept)."""
        st = self.current()
        old, new = st["old"], st["new"]
        self.state.update(phase="switching")
        self.index.switch_alias(new)
        self._set_targets([new])
        self.state.update(phase="switched", switched_at=time.time())
        log.info("alias %s now points at %s", self.s.collection, new)
        if st.get("keep_old") != "1":
            time.sleep(self.settle_s)  # writes that read the old targets land before the drop
            if self.index.client.has_collection(old):
                self.index.drop(old)
            self.r.delete(self.guard._vkey(old))
        self.state.update(phase="done", finished_at=time.time())
        return self.current()

    def abort(self) -> dict[str, str]:
        """Drop the collection being built; live writes go to the live collection alone again."""
        st = self.current()
        if st.get("phase") not in ACTIVE_PHASES:
            raise ReindexError(f"no reindex of {self.s.collection} in progress (last: {st.get('phase', 'none')})")
        old, new = st["old"], st["new"]
        if self.index.live_collection() == new:
            raise ReindexError(f"the alias already points at {new}: `cardigan reindex --resume` finishes the switch")
        self._set_targets([old])
        self.state.update(phase="aborted", finished_at=time.time())
        time.sleep(self.settle_s)
        if self.index.client.has_collection(new):
            self.index.drop(new)
        self.r.delete(self.guard._vkey(new))
        return self.current()
