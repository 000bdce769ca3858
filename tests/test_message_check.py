"""The consumer's message check, driven with real kombu messages over the in-memory transport.

In the style of dramatiq's stub broker: the publisher sends through kombu's ``memory://``
transport, the test takes the message back off the queue, and ``MessageCheck`` judges it, with
no broker server and no worker. The end-to-end versions (a real worker storing the dead letters)
are in test_hostile_e2e and test_redis_envelope_e2e.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from cardigan.errors import InvalidEvent
from cardigan.keys import INDEX_TASK
from cardigan.ops.publish import Publisher
from config.celery_app import create_app
from config.settings import Settings
from workers.envelope import BadEnvelope
from workers.message_check import MalformedTask, MessageCheck, RefusedContent, UndecodableMessage, UnknownMessage, UnknownTask

EVENT = {"type": "add", "product_id": "p-1", "version": 1, "images": [{"uri": "s3://shop-images/p-1.jpg"}]}


@pytest.fixture()
def stub() -> Iterator[tuple[Celery, Settings, Connection]]:
    """An app on a private in-memory broker queue (kombu's memory transport is per process)."""
    s = Settings(broker_url="memory://", queue=f"q-{uuid.uuid4().hex[:8]}")
    app = create_app(s)
    app.loader.import_default_modules()  # tasks.index, tasks.bulk: what a worker imports at start
    with app.connection_for_write() as conn:
        yield app, s, conn


def _take(conn: Connection, s: Settings) -> Message:
    queue = Queue(s.queue, Exchange("cardigan", type="direct", durable=True), routing_key=s.queue)
    message = queue.bind(conn.default_channel).get(no_ack=True, accept=["json"])
    assert message is not None, "nothing on the stub queue"
    return message


def _raw(conn: Connection, s: Settings, body: Any, *, headers: dict[str, Any], serializer: str = "json", **kw: Any) -> None:
    exchange = Exchange("cardigan", type="direct", durable=True)
    producer = conn.Producer()
    producer.publish(
        body, exchange=exchange, routing_key=s.queue, serializer=serializer, headers=headers,
        declare=[Queue(s.queue, exchange, routing_key=s.queue)], **kw,
    )  # fmt: skip


def _check(app: Celery) -> MessageCheck:
    return MessageCheck(known=dict(app.tasks), tasks=app.tasks, max_eta_s=app.cardigan_settings.worker.max_eta_s)


def _headers(name: str = INDEX_TASK, **extra: Any) -> dict[str, Any]:
    return {"task": name, "id": uuid.uuid4().hex, "retries": 0, "eta": None, "expires": None, **extra}


def test_a_published_event_passes(stub: tuple[Celery, Settings, Connection]) -> None:
    app, s, conn = stub
    Publisher(s, app).publish(EVENT, producer=conn.Producer())
    problem, kept = _check(app).check(_take(conn, s))
    assert problem is None and kept is None


@pytest.mark.parametrize(
    ("body", "headers", "error", "words"),
    [
        ("a string", _headers(), MalformedTask, "body must be [args, kwargs, embed]"),
        ([[EVENT], {}, None, "extra"], _headers(), MalformedTask, "got a list of 4"),
        ([[EVENT], {}, "embed"], _headers(), MalformedTask, "embed must be an object"),
        ([[EVENT, "surplus"], {}, None], _headers(), MalformedTask, "arguments do not match task"),
        ([[EVENT], {}, None], _headers(name="celery.chord"), UnknownTask, "unknown task 'celery.chord'"),
        ([[EVENT], {}, None], _headers(name="shop.sync"), UnknownTask, "this worker runs cardigan."),
        ([[EVENT], {}, None], {"task": INDEX_TASK}, MalformedTask, "task id ('id') is missing"),
        ([[EVENT], {}, None], _headers(retries=None), BadEnvelope, "retries"),
        ([[EVENT], {}, None], _headers(eta="2999-01-01T00:00:00+00:00"), BadEnvelope, "eta"),
        ([[EVENT], {}, {"callbacks": [{"task": "celery.chord"}]}], _headers(), BadEnvelope, "callbacks"),
        ({"no": "task"}, {}, UnknownMessage, "not a Celery task message"),
    ],
)
def test_messages_celery_would_drop_or_choke_on_are_named(
    stub: tuple[Celery, Settings, Connection], body: Any, headers: dict[str, Any], error: type[Exception], words: str
) -> None:
    app, s, conn = stub
    _raw(conn, s, body, headers=headers)
    problem, kept = _check(app).check(_take(conn, s))
    assert isinstance(problem, error), problem
    assert words in problem.reason, problem.reason
    json.dumps(kept)  # what the dead letter keeps is JSON


def test_the_event_is_kept_for_replay_when_only_the_envelope_is_wrong(stub: tuple[Celery, Settings, Connection]) -> None:
    app, s, conn = stub
    _raw(conn, s, [[EVENT], {}, None], headers=_headers(retries="many"))
    problem, kept = _check(app).check(_take(conn, s))
    assert isinstance(problem, BadEnvelope)
    assert kept == EVENT


def test_pickle_is_refused_and_never_unpickled(stub: tuple[Celery, Settings, Connection]) -> None:
    app, s, conn = stub

    class Boom:
        def __reduce__(self) -> Any:
            return (pytest.fail, ("unpickled",))

    exchange = Exchange("cardigan", type="direct", durable=True)
    conn.Producer().publish(
        pickle.dumps(Boom()), exchange=exchange, routing_key=s.queue, content_type="application/x-python-serialize",
        content_encoding="binary", headers=_headers(), declare=[Queue(s.queue, exchange, routing_key=s.queue)],
    )  # fmt: skip
    problem, kept = _check(app).check(_take(conn, s))
    assert isinstance(problem, RefusedContent) and "only JSON is accepted" in problem.reason
    assert isinstance(kept, str) and kept.startswith("b'")  # the raw bytes' repr


def test_malformed_json_is_undecodable(stub: tuple[Celery, Settings, Connection]) -> None:
    app, s, conn = stub
    exchange = Exchange("cardigan", type="direct", durable=True)
    conn.Producer().publish(
        b'[[{"type": "add"', exchange=exchange, routing_key=s.queue, content_type="application/json",
        content_encoding="utf-8", headers=_headers(), declare=[Queue(s.queue, exchange, routing_key=s.queue)],
    )  # fmt: skip
    problem, _ = _check(app).check(_take(conn, s))
    assert isinstance(problem, UndecodableMessage) and "malformed JSON body" in problem.reason


def test_the_publisher_refuses_before_the_broker(stub: tuple[Celery, Settings, Connection]) -> None:
    app, s, _ = stub
    with pytest.raises(InvalidEvent, match="product_id"):
        Publisher(s, app).publish({**EVENT, "product_id": "bad id with spaces"})
