"""Hostile messages at a real worker: whatever the headers, each message ends in exactly one
recorded outcome (applied, stale or one dead letter naming the field), nothing loops, nothing is
held for ever, and the good events sent in between are indexed.

The messages are raw kombu messages on the live queue, the way a producer in another language
sends them (docs/message-format.md): bad ``retries``, ``eta`` and ``expires`` headers, Celery's
built-in tasks, workflows in the embed, a reused task id, attributes Milvus cannot store, and a
bucket outside the allow-list. The issue's review saw loops, silent acks and a message held until
the year 2999 for these.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cardigan.ops.verify import Expected
from tests.harness import Namespace, wait_until
from tests.test_bad_input_e2e import encode, scene, send_raw, task_headers
from tests.test_index_e2e import converge

pytestmark = pytest.mark.e2e

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def body(event: Any, embed: dict[str, Any] | None = None) -> str:
    return json.dumps([[event], {}, embed or EMBED])  # NaN and lone surrogates pass json.dumps


def iso(delta_s: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta_s)).isoformat()


def test_e2e_hostile_envelopes_each_end_in_one_outcome(ns: Namespace) -> None:
    w = ns.start_worker()
    bucket = ns.settings.bucket

    def add(pid: str, version: int = 1, **attrs: Any) -> dict[str, Any]:
        uri = ns.put_image(f"hostile/{pid}.jpg", encode(scene(abs(hash(pid)) % 1000), "JPEG", quality=90))
        return {"type": "add", "product_id": pid, "version": version, "images": [{"uri": uri}], "attributes": {"k": "v", **attrs}}

    # (headers changes, event or raw body, expected dead letter (kind, field, words)); None: indexed
    cases: dict[str, tuple[dict[str, Any], Any, tuple[str, str | None, str] | None]] = {
        "retries-null": ({"retries": None}, add("h-retries-null"), ("bad_envelope", "retries", "must be an integer, got None")),
        "retries-negative": ({"retries": -5}, add("h-retries-neg"), ("bad_envelope", "retries", "between 0 and")),
        "retries-huge": ({"retries": 10**30}, add("h-retries-huge"), ("bad_envelope", "retries", "between 0 and")),
        "retries-string": ({"retries": "2"}, add("h-retries-str"), ("bad_envelope", "retries", "must be an integer")),
        "eta-2999": ({"eta": "2999-01-01T00:00:00+00:00"}, add("h-eta-2999"), ("bad_envelope", "eta", "s ahead")),
        "eta-overflow": ({"eta": "9999-12-31T23:59:59-14:00"}, add("h-eta-overflow"), ("bad_envelope", "eta", "")),
        "eta-garbage": ({"eta": "next tuesday"}, add("h-eta-garbage"), ("bad_envelope", "eta", "not an ISO 8601")),
        "expires-past": ({"expires": "2001-01-01T00:00:00+00:00"}, add("h-expired"), ("expired", "expires", "expired at 2001")),
        "timelimit-junk": ({"timelimit": {"soft": "never"}}, add("h-timelimit"), ("bad_envelope", "timelimit", "[soft, hard]")),
        "attr-nan": ({}, add("h-nan", price=math.nan), ("invalid_event", "attributes", "nan is not a finite number")),
        "attr-surrogate": ({}, add("h-surrogate", name="caf\ud800"), ("invalid_event", "attributes", "lone surrogate")),
        "attr-too-big": ({}, add("h-big", blob="x" * 70_000), ("invalid_event", "attributes", "over the Milvus JSON field limit")),
        "bucket-invalid": (
            {},
            {"type": "add", "product_id": "h-bucket-bad", "version": 1, "images": [{"uri": "s3://Not_A_Bucket/a.jpg"}]},
            ("invalid_event", "images[0].uri", "invalid bucket name"),
        ),
        "bucket-not-allowed": (
            {},
            {"type": "add", "product_id": "h-bucket-other", "version": 1, "images": [{"uri": "s3://another-bucket/a.jpg"}]},
            ("forbidden_uri", "images[0].uri", "bucket 'another-bucket' is not allowed"),
        ),
        # good ones, sent between the bad: a legitimate retries header, a near eta, a future expiry
        "ok-plain": ({}, add("ok-plain"), None),
        "ok-retries-3": ({"retries": 3}, add("ok-retries-3"), None),
        "ok-eta-soon": ({"eta": iso(3)}, add("ok-eta-soon"), None),
        "ok-expires-later": ({"expires": iso(3600)}, add("ok-expires-later"), None),
        "ok-delete": ({}, {"type": "delete", "product_id": "ok-delete", "version": 1}, None),
    }
    for task in ("celery.accumulate", "celery.map", "celery.starmap", "celery.chunks", "celery.group", "celery.chain", "celery.chord"):
        cases[task] = ({"task": task}, add(f"h-{task.replace('.', '-')}"), ("unknown_task", None, f"unknown task '{task}'"))
    workflow = {**EMBED, "chain": [{"task": "celery.accumulate", "args": [], "kwargs": {}, "options": {}}]}

    expected_dead: dict[str, tuple[str, tuple[str, str | None, str]]] = {}
    for name, (changes, event, outcome) in cases.items():
        headers = {**task_headers(), **changes}
        send_raw(ns, body(event), headers)
        if outcome is not None:
            expected_dead[headers["id"]] = (name, outcome)
    headers = task_headers()
    send_raw(ns, body(add("h-workflow"), workflow), headers)
    expected_dead[headers["id"]] = ("workflow-in-embed", ("bad_envelope", "embed", "workflows are not accepted (chain)"))
    p1 = str(uuid.uuid4())  # protocol 1: the envelope is in the body
    send_raw(ns, json.dumps({"task": "cardigan.index_event", "id": p1, "retries": None, "args": [add("h-p1")], "kwargs": {}}), {})
    expected_dead[p1] = ("protocol-1-retries-null", ("bad_envelope", "retries", "must be an integer"))
    p1w = str(uuid.uuid4())  # protocol 1 builds its workflow from the body's own keys
    send_raw(
        ns,
        json.dumps(
            {
                "task": "cardigan.index_event",
                "id": p1w,
                "retries": 0,
                "args": [add("h-p1w")],
                "kwargs": {},
                "callbacks": [{"task": "celery.accumulate", "args": [], "kwargs": {}}],
            }
        ),
        {},
    )
    expected_dead[p1w] = ("protocol-1-callbacks", ("bad_envelope", "embed", "workflows are not accepted (callbacks)"))

    # one task id reused for five versions of a product, each sent after the last was applied:
    # the worker's delivery counter is per message and goes with its outcome, so none is poison
    reused = str(uuid.uuid4())
    index = ns.index()
    for v in range(1, 6):
        send_raw(ns, body(add("ok-reused-id", v)), {**task_headers(), "id": reused, "root_id": reused})
        wait_until(lambda v=v: [r["version"] for r in index.get_product("ok-reused-id", 8)] == [v], 90, f"reused id, version {v}")

    goods = {pid: Expected(1, 1) for pid in ("ok-plain", "ok-retries-3", "ok-eta-soon", "ok-expires-later")}
    expected: dict[str, Expected | None] = {**goods, "ok-reused-id": Expected(5, 1), "ok-delete": None}
    expected.update({ev["product_id"]: None for _, ev, outcome in cases.values() if outcome is not None})
    converge(ns, expected, timeout=150)  # nothing held: the queue and the unacked set drain
    wait_until(lambda: ns.dead().count() >= len(expected_dead), 30, f"{len(expected_dead)} dead letters")

    dead = ns.dead().list()
    by_task: dict[str | None, list[Any]] = {}
    for d in dead:
        by_task.setdefault(d.task_id, []).append(d)
    problems = []
    for task_id, (name, (kind, field, words)) in expected_dead.items():
        got = by_task.pop(task_id, [])
        if len(got) != 1:
            problems.append(f"{name}: {len(got)} dead letters, want exactly 1")
            continue
        d = got[0]
        if d.kind != kind or words not in d.reason or (field is not None and d.field != field):
            problems.append(f"{name}: got kind={d.kind} field={d.field} reason={d.reason!r}; want {kind} {field} {words!r}")
        elif kind != "unknown_task" and name != "attr-too-big" and d.product_id is None:
            problems.append(f"{name}: the dead letter does not keep the event")
        elif kind == "unknown_task" and "h-celery-" not in str(d.event):  # the raw body, as a repr
            problems.append(f"{name}: the dead letter does not keep the body")
    assert not problems, "\n".join(problems)
    assert not by_task, f"unexpected dead letters: {[(d.kind, d.reason) for ds in by_task.values() for d in ds]}"

    r = ns.state()
    assert list(r.scan_iter("cardigan:deliveries:*")) == [], "delivery counters are deleted when the message ends"
    assert w.alive() and "Unrecoverable error" not in w.log_text()
    # the fleet goes on
    send_raw(ns, body(add("ok-after")), task_headers())
    converge(ns, {**expected, "ok-after": Expected(1, 1)})
    assert bucket == ns.settings.bucket
