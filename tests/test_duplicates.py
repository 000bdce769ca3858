"""Double listings: pair selection and grouping (pure), and the pair store against a real Valkey."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from cardigan.duplicates.groups import groups
from cardigan.duplicates.pairs import Pair, PairStore
from cardigan.duplicates.score import Scoring, best_pairs
from cardigan.store.guard import make_redis
from devkit.stack import StackInfo


def P(a: str, b: str, score: float) -> Pair:
    return Pair.of(a, b, score, 1, 1, 0, 0, at=0.0)


# -- pure -------------------------------------------------------------------------------------


def test_pair_is_canonical_whichever_side_found_it() -> None:
    p = Pair.of("z", "a", 0.97, 5, 2, 3, 1, at=1.0)
    assert (p.a, p.b, p.a_version, p.b_version, p.a_image, p.b_image) == ("a", "z", 2, 5, 1, 3)
    assert p.key == Pair.of("a", "z", 0.5, 0, 0, 0, 0).key
    assert Pair.from_json(p.to_json()) == p


def test_best_pairs_keeps_the_best_image_match_and_skips_the_product_itself() -> None:
    rows = [
        {"product_id": "a", "image_index": 0, "version": 3},
        {"product_id": "a", "image_index": 1, "version": 3},
    ]
    hits = [
        [
            {"product_id": "a", "image_index": 1, "version": 3, "score": 0.99},
            {"product_id": "b", "image_index": 2, "version": 7, "score": 0.96},
        ],
        [
            {"product_id": "b", "image_index": 0, "version": 7, "score": 0.98},
            {"product_id": "c", "image_index": 0, "version": 1, "score": 0.961},
        ],
    ]
    best = best_pairs(rows, hits, Scoring(), at=0.0)
    assert set(best["a"]) == {"b", "c"}
    ab = best["a"]["b"]
    assert (ab.score, ab.a_image, ab.b_image, ab.a_version, ab.b_version) == (0.98, 1, 0, 3, 7)


def test_groups_are_connected_components_largest_first() -> None:
    pairs = [P("a", "b", 0.99), P("b", "c", 0.97), P("x", "y", 0.98), P("d", "e", 0.91)]
    gs = groups(pairs)
    assert [g.members for g in gs] == [("a", "b", "c"), ("x", "y"), ("d", "e")]
    assert gs[0].best.key == P("a", "b", 0).key and gs[0].id == "a"
    # a weak link below min_score does not join (or form) a group
    assert [g.members for g in groups(pairs, min_score=0.975)] == [("a", "b"), ("x", "y")]
    assert groups([]) == []


def test_a_chain_through_a_bridge_merges_two_groups() -> None:
    gs = groups([P("a", "b", 0.99), P("c", "d", 0.99), P("b", "c", 0.97)])
    assert len(gs) == 1 and gs[0].members == ("a", "b", "c", "d") and len(gs[0].pairs) == 3


# -- the store (real Valkey) ------------------------------------------------------------------


@pytest.fixture
def store(stack: StackInfo) -> PairStore:
    r = make_redis(stack.broker_url.rsplit("/", 1)[0] + "/12")
    return PairStore(r, f"dup_{uuid.uuid4().hex[:6]}")


def test_replace_adds_drops_and_reports_new_groups(store: PairStore) -> None:
    added, dropped, fresh = store.replace({"a": [P("a", "b", 0.97)]})
    assert (added, dropped, [g.members for g in fresh]) == (1, 0, [("a", "b")])
    assert [p.b for p in store.pairs_of("a")] == ["b"] and [p.a for p in store.pairs_of("b")] == ["a"]
    # c joins the existing group through b: a new pair, not a new group
    added, dropped, fresh = store.replace({"c": [P("c", "b", 0.96)]})
    assert (added, dropped, fresh) == (1, 0, [])
    assert {g.members for g in groups(store.all_pairs())} == {("a", "b", "c")}
    # b is modified: it now matches only c; its pair with a is dropped on both sides
    added, dropped, _ = store.replace({"b": [P("b", "c", 0.99)]})
    assert (added, dropped) == (0, 1)
    assert store.pairs_of("a") == [] and [p.score for p in store.pairs_of("c")] == [0.99]
    # c is deleted: all its pairs go
    assert store.remove_product("c") == 1
    assert store.count() == 0 and store.pairs_of("b") == []


def test_one_batch_that_finds_three_listings_announces_one_group(store: PairStore) -> None:
    added, _, fresh = store.replace({"a": [P("a", "b", 0.99), P("a", "c", 0.98)], "b": [P("b", "a", 0.99), P("b", "c", 0.97)]})
    assert added == 3 and [g.members for g in fresh] == [("a", "b", "c")]
    assert {g.members for g in groups(store.all_pairs())} == {("a", "b", "c")}


def test_pending_claim_retry_and_requeue(store: PairStore) -> None:
    store.enqueue({"a": int(time.time() * 1000) - 500, "b": int(time.time() * 1000)})
    got, token = store.claim(10, retry_s=0.3)
    assert sorted(got) == ["a", "b"]
    assert store.claim(10, retry_s=0.3)[0] == []  # claimed: nobody else takes them
    store.enqueue({"b": int(time.time() * 1000)})  # b written again while being checked
    lags = store.done(got, token)
    assert len(lags) == 1 and lags[0] >= 500  # a removed, with its lag from publish
    assert store.pending() == 1  # b stays: its newer write must be checked
    got2, token2 = store.claim(10, retry_s=0.3)
    assert got2 == ["b"]
    time.sleep(0.4)  # a failed check is not marked done: claimable again after retry_s
    assert store.claim(10, retry_s=0.3)[0] == ["b"]
    assert store.lags()[0] >= 500


def test_a_batch_not_full_lingers_until_its_oldest_product_has_waited(store: PairStore) -> None:
    assert store.claim_versions(3, retry_s=5, linger_ms=400)[2] is None  # nothing due: no batch to wait for
    store.enqueue({"a": 1, "b": 2}, {"a": 4})
    got, _, wait = store.claim_versions(3, retry_s=5, linger_ms=400)
    assert got == {} and 0 < wait <= 0.4  # two of three: the batch waits for more
    store.enqueue({"c": 3})
    got, token, wait = store.claim_versions(3, retry_s=5, linger_ms=400)
    assert got == {"a": 4, "b": None, "c": None} and wait == 0  # full: claimed at once
    assert sorted(store.done(list(got), token, checked=3)) == sorted(store.lags(3)) and store.counts() == {"checked": 3}
    store.enqueue({"d": 4})
    time.sleep(0.45)
    assert list(store.claim_versions(3, retry_s=5, linger_ms=400)[0]) == ["d"]  # waited long enough


# -- the detector loop (real Valkey and Milvus Lite server) -------------------------------------


def test_a_failed_check_is_counted_and_retried_until_it_succeeds(stack: StackInfo, store: PairStore) -> None:
    """The alias does not exist yet, so the first checks fail (as when Milvus is down); the
    products stay pending and are checked once it answers."""
    from cardigan.duplicates.detect import Detector
    from cardigan.store.index import Index
    from config.settings import DuplicateSettings
    from workers.detector import DetectorLoop

    index = Index(stack.milvus_uri, alias=store.alias)
    cfg = DuplicateSettings(retry_s=0.3, poll_ms=20)
    loop = DetectorLoop(Detector(index, store, threshold=0.99, max_images=4), store, cfg)
    now = int(time.time() * 1000)
    loop.start()
    try:
        loop.note({"x": now, "y": now})
        deadline = time.monotonic() + 20
        while loop.stats.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.stats.failures >= 1 and store.pending() == 2 and store.counts()["failures"] >= 1
        live = index.ensure()
        vec = [1.0] + [0.0] * 511
        rows = [
            {
                "pk": f"{p}#0",
                "product_id": p,
                "image_index": 0,
                "image_uri": "s3://b/k",
                "crop": {},
                "version": 3,
                "model_version": "m",
                "attributes": {},
                "embedding": vec,
            }
            for p in ("x", "y")
        ]
        index.upsert(live, rows)
        deadline = time.monotonic() + 60  # the loop backs off after failures (0.5 s, doubling)
        while store.count() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(p.a, p.b, p.a_version) for p in store.all_pairs()] == [("x", "y", 3)]
        assert store.pending() == 0 and loop.stats.pairs_added == 1
    finally:
        loop.stop()
        index.close()


def test_pairs_merging_groups_across_batches_announce_no_new_group(store: PairStore) -> None:
    """A group is new once: a later batch that joins a product to it, or merges two groups, updates it."""
    assert [g.members for g in store.replace({"a": [P("a", "b", 0.99)]})[2]] == [("a", "b")]
    assert [g.members for g in store.replace({"c": [P("c", "d", 0.99)]})[2]] == [("c", "d")]
    assert store.replace({"b": [P("b", "a", 0.99), P("b", "c", 0.98)]})[2] == []  # merges {a,b} and {c,d}
    assert store.replace({"e": [P("e", "d", 0.98)]})[2] == []  # joins it
    assert {g.members for g in store.groups()} == {("a", "b", "c", "d", "e")}
    # a new group whose pairs come in one batch is announced with all its members
    added, _, fresh = store.replace({"x": [P("x", "y", 0.99)], "z": [P("z", "y", 0.98)]})
    assert added == 2 and [g.members for g in fresh] == [("x", "y", "z")]


# -- the writer's hand-off and the detector's rows (real Valkey and Milvus Lite server) --------


def _upsert(pid: str, version: int, vec: list[float]) -> Any:
    from workers.writer import WriteOp

    row = {
        "pk": f"{pid}#0", "product_id": pid, "image_index": 0, "image_uri": f"s3://b/{pid}", "crop": {"bbox": None},
        "version": version, "model_version": "m", "attributes": {}, "embedding": vec,
    }  # fmt: skip
    return WriteOp(pid, version, "upsert", [row], published_at_ms=int(time.time() * 1000))


def test_written_products_are_queued_before_the_ack_and_checked_from_the_writers_rows(stack: StackInfo, store: PairStore) -> None:
    """The writer's own pipeline queues what it wrote (the detector thread is not even running:
    a worker killed now loses nothing); this process's detector then checks them from the rows
    the writer held, with no read-back, and a redelivered version is queued again."""
    from cardigan.duplicates.detect import Detector
    from cardigan.store.guard import VersionGuard
    from cardigan.store.index import Index
    from config.settings import DuplicateSettings
    from workers.detector import DetectorLoop
    from workers.writer import IndexWriter, WriteOp

    class CountingIndex(Index):
        reads = 0

        def get(self, ids: Any, fields: Any, collection: str | None = None, *, consistency: str | None = None) -> list[dict[str, Any]]:
            CountingIndex.reads += 1
            return super().get(ids, fields, collection, consistency=consistency)

    index = CountingIndex(stack.milvus_uri, alias=store.alias)
    try:
        live = index.ensure()
        loop = DetectorLoop(Detector(index, store, threshold=0.99, max_images=4), store, DuplicateSettings(linger_ms=0))  # not started
        writer = IndexWriter(index, VersionGuard(store.r), store.r, max_images=4, live=live, handoff=loop)
        vec = [1.0] + [0.0] * 511
        assert (
            writer.write_batch([_upsert("x", 3, vec), _upsert("y", 5, vec), _upsert("z", 1, [0.0, 1.0] + [0.0] * 510)]) == ["applied"] * 3
        )
        assert store.pending() == 3  # in Redis when write_batch returns, i.e. before the events are acked
        claimed, token, _ = store.claim_versions(10, retry_s=0.3)
        assert claimed == {"x": 3, "y": 5, "z": 1}
        store.done(list(claimed), token + 1)  # not done (a stale token): still pending
        time.sleep(0.35)
        reads = CountingIndex.reads
        assert loop.run_once() == 3
        assert CountingIndex.reads == reads, "rows held in memory were read back"
        assert [(p.a, p.b, p.a_version, p.b_version) for p in store.all_pairs()] == [("x", "y", 3, 5)]
        assert store.pending() == 0 and loop.stats.reads == 0
        # y deleted (no rows to read: its pairs just go), and a product queued without rows is read back
        assert writer.write_batch([WriteOp("y", 6, "delete", published_at_ms=int(time.time() * 1000))]) == ["applied"]
        store.enqueue({"z": int(time.time() * 1000)})  # e.g. a retry, or queued by another process
        assert loop.run_once() == 2 and CountingIndex.reads == reads + 1 and loop.stats.reads == 1
        assert store.count() == 0
        # killed after recording x v3 but before its hand-off: the redelivered event queues it again
        assert writer.write_batch([_upsert("x", 3, vec)]) == ["stale"]
        assert store.claim(10, retry_s=0.3)[0] == ["x"]
        writer.requeue("z", None)  # the pipeline's early exit for a redelivery
        assert store.claim(10, retry_s=0.3)[0] == ["z"]
        assert writer.write_batch([_upsert("z", 0, vec)]) == ["stale"] and store.claim(10, retry_s=0.3)[0] == []  # older: not queued
    finally:
        index.drop(live)
        index.close()


def test_the_detector_records_only_pairs_whose_score_clears_the_threshold(stack: StackInfo, store: PairStore) -> None:
    """Four listings of one vector: the range search finds every pair (cosine 1), the score
    decides. The same colours pass; colours 0.04 apart pass only because the crops' structure
    matches (a relit copy); another colour with the same structure does not."""
    import numpy as np

    from cardigan.duplicates import signature, structure
    from cardigan.duplicates.detect import Detector
    from cardigan.store.index import Index

    rng = np.random.default_rng(5)
    st = structure.encode(structure.structure(np.repeat(np.repeat(rng.integers(0, 255, (14, 14, 3), np.uint8), 16, 0), 16, 1)))
    sig = {"x": 0.0, "y": 0.0, "relit": 0.04 / np.sqrt(6), "recolour": 0.1}  # distance from x: 0, 0, 0.04, 0.245
    index = Index(stack.milvus_uri, alias=store.alias)
    live = index.ensure()
    try:
        rows = [
            {
                "pk": f"{p}#0",
                "product_id": p,
                "image_index": 0,
                "image_uri": "s3://b/k",
                "crop": {"bbox": None, "sig": signature.encode(np.full(6, 0.3 + d, np.float32)), "st": st},
                "version": 1,
                "model_version": "m",
                "attributes": {},
                "embedding": [1.0] + [0.0] * 511,
            }
            for p, d in sig.items()
        ]
        index.upsert(live, rows)
        scoring = Scoring(colour_weight=1.2, structure_slack=0.05, structure_floor=0.93)
        Detector(index, store, threshold=0.97, max_images=4, scoring=scoring).check(list(sig))
        got = {(p.a, p.b): p.score for p in store.all_pairs()}
        assert set(got) == {("x", "y"), ("relit", "x"), ("relit", "y")}
        assert min(got.values()) > 0.97
        # without the structure the relit copy scores 1 - 1.2 * 0.04 = 0.952: dropped on a re-check
        Detector(index, store, threshold=0.97, max_images=4, scoring=Scoring(colour_weight=1.2)).check(list(sig))
        assert {(p.a, p.b) for p in store.all_pairs()} == {("x", "y")}
    finally:
        index.drop(live)
        index.close()
