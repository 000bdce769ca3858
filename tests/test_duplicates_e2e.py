"""Double listings found through real events: real worker, Valkey, Milvus Lite server, moto S3.

The test encoder has random weights, so only near-identical photos score near 1: the planted
double listings reuse a product's photos under other keys (what a second seller does), and the
threshold is raised to 0.995 so unrelated synthetic products never pair.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from kombu import Connection

from cardigan.duplicates import axis, structure
from cardigan.duplicates.groups import groups
from cardigan.duplicates.pairs import PairStore
from devkit.catalog import generate_catalog, render_product
from tests.harness import ROOT, Namespace, wait_until


def _event(ns: Namespace, kind: str, pid: str, version: int, photos: list[bytes], tag: str) -> dict[str, Any]:
    uris = [ns.put_image(f"dup/{pid}/{tag}/{i}.jpg", data) for i, data in enumerate(photos)]
    return {"type": kind, "product_id": pid, "version": version, "images": [{"uri": u} for u in uris], "attributes": {"category": "dress"}}


def _cli(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ns.env, "PYTHONPATH": str(ROOT), "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "cardigan.cli", "duplicates", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _members(store: PairStore) -> set[tuple[str, ...]]:
    return {g.members for g in groups(store.all_pairs())}


@pytest.mark.real_milvus
def test_double_listings_are_found_dropped_on_modify_and_delete_and_rescanned(ns: Namespace) -> None:
    tag = ns.settings.collection
    ns.set_env(CARDIGAN_DUPLICATES__THRESHOLD="0.995", CARDIGAN_DUPLICATES__EVENTS_QUEUE=f"dups.{tag}", CARDIGAN_DUPLICATES__POLL_MS="50")
    store = PairStore(ns.state(), ns.settings.collection)
    a, b, c = generate_catalog(3, prefix="orig")
    photos = {p.product_id: [img.data for img in p.images] for p in (a, b, c)}
    ns.start_worker(concurrency=4)
    events = [_event(ns, "add", pid, 1, ph, "v1") for pid, ph in photos.items()]
    # two more sellers list product a: all of its photos, and just its first one
    events.append(_event(ns, "add", "copy-1", 1, photos[a.product_id], "v1"))
    events.append(_event(ns, "add", "copy-2", 1, photos[a.product_id][:1], "v1"))
    t0 = time.time()
    ns.publish(events)
    group = tuple(sorted((a.product_id, "copy-1", "copy-2")))
    wait_until(lambda: group in _members(store), 120, "the double listings of a as one group")
    found_in = time.time() - t0
    assert _members(store) == {group}, "unrelated products paired"
    best = {p.other(a.product_id): p for p in store.pairs_of(a.product_id)}
    assert best["copy-1"].score > 0.995 and best["copy-1"].a_version == 1 and best["copy-1"].b_version == 1
    assert best["copy-2"].score > 0.995 and 0 in (best["copy-2"].a_image, best["copy-2"].b_image)
    assert store.lags(), "detection lag recorded"
    # every row carries its colour signature, structure descriptor and colour axis in the crop JSON: the same
    # photo, the same ones, and they decode
    index = ns.index()
    rows = {pid: index.get_product(pid, 4) for pid in (a.product_id, "copy-1")}
    index.close()
    sigs = {pid: [r["crop"]["sig"] for r in rs] for pid, rs in rows.items()}
    assert all(len(x) == 16 for x in sigs[a.product_id]) and sigs["copy-1"] == sigs[a.product_id]
    sts = {pid: [r["crop"]["st"] for r in rs] for pid, rs in rows.items()}
    assert sts["copy-1"] == sts[a.product_id] and all(structure.decode(x) is not None for x in sts["copy-1"])
    axes = {pid: [r["crop"].get(axis.AX_KEY) for r in rs] for pid, rs in rows.items()}  # a flat crop has none
    assert axes["copy-1"] == axes[a.product_id] and any(axis.decode(x) is not None for x in axes["copy-1"])

    # the CLI lists the group and shows a product's matches
    out = _cli(ns, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [g["members"] for g in doc["groups"]] == [list(group)] and doc["counts"]["pairs_added"] >= 3
    table = _cli(ns)
    assert table.returncode == 0 and "1 group(s)" in table.stdout and "copy-1" in table.stdout, table.stdout + table.stderr
    out = _cli(ns, "show", "copy-2", "--json")
    assert {m["product_id"] for m in json.loads(out.stdout)["matches"]} == {a.product_id, "copy-1"}

    env = {**os.environ, **ns.env, "PYTHONPATH": str(ROOT)}
    st = subprocess.run(
        [sys.executable, "-m", "cardigan.cli", "status", "--json", "--no-inspect"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    dp = json.loads(st.stdout)["duplicates"]
    assert (dp["groups_open"], dp["pairs_open"], dp["pending"]) == (1, 3, 0) and dp["lag_p99_ms"] is not None

    # one new group was announced on the duplicates queue, as JSON
    with Connection(ns.settings.broker_url) as conn:
        q = conn.SimpleQueue(f"dups.{tag}")
        msg = q.get(timeout=5)
        body = msg.payload
        msg.ack()
        q.close()
    assert body["event"] == "duplicate_group" and set(body["members"]) <= set(group)

    # the backfill finds the same group again from the index alone (pairs forgotten first)
    store.clear()
    out = _cli(ns, "scan")
    assert out.returncode == 0, out.stderr
    assert "pair(s) added" in out.stdout and _members(store) == {group}
    state = json.loads(ns.state().get(f"cardigan:dup:scan:{tag}"))
    assert state["done"] and state["products"] == 5

    # copy-1 changes its photos to another item: its pairs no longer hold and are dropped
    new_look = render_product("copy-1", 1, 2)
    ns.publish([_event(ns, "modify", "copy-1", 2, [i.data for i in new_look.images], "v2")])
    pair = tuple(sorted((a.product_id, "copy-2")))
    wait_until(lambda: _members(store) == {pair}, 60, "copy-1's pairs dropped after its modify")

    # copy-2 is taken down: its pair goes with it, and nothing is left
    ns.publish([{"type": "delete", "product_id": "copy-2", "version": 2}])
    wait_until(lambda: store.count() == 0, 60, "copy-2's pairs removed after its delete")
    assert store.pairs_of(a.product_id) == [] and store.pending() == 0
    print(f"\nfirst group recorded {found_in:.2f} s after publishing 5 adds (load {os.getloadavg()[0]:.1f})")
