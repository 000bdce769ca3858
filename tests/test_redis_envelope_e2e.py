"""docs/message-format.md's Redis envelope, published as a Go or Java producer would.

The producer part uses nothing but ``json``, ``base64``, ``uuid`` and a plain Redis ``LPUSH``
(no kombu, no celery); a real worker on a real Valkey server must index the events it builds.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from cardigan.ops.verify import Expected
from tests.harness import Namespace, wait_until
from tests.test_index_e2e import add, converge

pytestmark = pytest.mark.e2e


def envelope(event: dict, queue: str) -> str:
    """The list item, exactly as the document describes it."""
    task_id = str(uuid.uuid4())
    body = [[event], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return json.dumps(
        {
            "body": base64.b64encode(json.dumps(body).encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "go",
                "task": "cardigan.index_event",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "argsrepr": f"{event['type']} {event['product_id']} v{event['version']}",
                "kwargsrepr": "{}",
                "origin": "catalog@elsewhere",
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


def test_e2e_plain_lpush_envelope_is_indexed(ns: Namespace) -> None:
    queue = ns.settings.queue
    # the images are put into S3 by the test's helper; the messages are built by hand
    events = [add(ns, "env-1", 1, 2), add(ns, "env-2", 4, 1), {"type": "delete", "product_id": "env-2", "version": 5}]
    ns.start_worker(concurrency=4)
    producer = redis.Redis.from_url(ns.env["CARDIGAN_BROKER_URL"])  # plain redis-py, no kombu
    try:
        for ev in events:
            producer.lpush(queue, envelope(ev, queue))
        converge(ns, {"env-1": Expected(1, 2), "env-2": None})
        assert ns.dead().count() == 0, [d.reason for d in ns.dead().list()]

        # a JSON body the document forbids (another content type) is refused and kept, not run
        bad = json.loads(envelope({"type": "delete", "product_id": "env-3", "version": 1}, queue))
        bad["content-type"] = "application/x-python-serialize"
        producer.lpush(queue, json.dumps(bad))
        wait_until(lambda: ns.dead().count() == 1, 120, "the refused message to be dead-lettered")

        # list items that are not kombu envelopes at all: dead letters too, and the worker goes on
        producer.lpush(queue, "hello, not json")
        producer.lpush(queue, json.dumps({"body": "e30=", "properties": {}}))
        wait_until(lambda: ns.dead().count() == 3, 120, "the two raw items to be dead-lettered")
        raw = [d for d in ns.dead().list() if d.kind == "undecodable"]
        assert len(raw) == 2 and all("docs/message-format.md" in d.reason for d in raw), [d.reason for d in raw]
        assert any("hello, not json" in str(d.event) for d in raw)
        producer.lpush(queue, envelope(add(ns, "env-4", 1, 1), queue))
        converge(ns, {"env-1": Expected(1, 2), "env-2": None, "env-4": Expected(1, 1)})
    finally:
        producer.close()
