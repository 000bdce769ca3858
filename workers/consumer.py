"""Messages Celery cannot turn into a task become dead letters, not log lines.

Out of the box, Celery's consumer logs and acks a body it cannot decode, and rejects (on Redis:
deletes) a message with a refused content type (pickle), an unknown task name or no task header.
Each of those is an event that vanished. Worse (measured with Celery 5.7): a JSON body of the
wrong shape (``"a string"`` instead of ``[args, kwargs, embed]``) stops the worker and, restored,
the next one; a message without an ``id`` header makes the consumer restart in a loop; wrong
arguments fail the task with a TypeError and the message is acked. Poison for the whole fleet.

This consumer checks every task message before Celery's strategy sees it, and stores anything it
cannot run as a dead letter (the raw body as a capped ``repr``: refused content is never decoded,
so a pickle is never unpickled), then acks it. If the dead letter cannot be stored (state store
down), the message is left unacked: the broker delivers it again later. Wired in
``config/celery_app.py`` as ``worker_consumer``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from vine import promise

from cardigan.errors import PermanentError
from workers import redelivery
from workers.envelope import check_embed, check_envelope, check_task_id, neutralise

log = logging.getLogger(__name__)

MAX_BODY_REPR = 4096  # characters of a refused body kept in its dead letter
MAX_EVENT_JSON = 64 * 1024  # a decoded payload bigger than this is kept as a capped repr
OWN_TASKS = "cardigan."  # the only task names a worker runs


class RefusedContent(PermanentError):
    """A serializer we do not accept (pickle, yaml, msgpack …): never decoded."""

    kind = "refused_content"


class UndecodableMessage(PermanentError):
    """The body does not parse as its declared content type (malformed JSON)."""

    kind = "undecodable"


class MalformedTask(PermanentError):
    """Valid JSON, but not a Celery protocol-2 task message our task can run."""

    kind = "malformed_task"


class UnknownTask(PermanentError):
    """A task name no worker here runs (a typo, a message for another system)."""

    kind = "unknown_task"


class UnknownMessage(PermanentError):
    """Not a task message at all (no ``task`` header, no protocol-1 payload)."""

    kind = "unknown_message"


def body_repr(message: Message) -> str:
    """The raw body as received, never decoded: ``repr`` of the bytes, capped."""
    body = message.body
    text = repr(body[: MAX_BODY_REPR + 1] if isinstance(body, bytes | str) else body)
    return text if len(text) <= MAX_BODY_REPR else text[:MAX_BODY_REPR] + "…"


def _capped(value: Any) -> Any:
    """A decoded payload as JSON when it is small, else a capped repr (dead letters are small)."""
    try:
        if len(json.dumps(value)) <= MAX_EVENT_JSON:
            return value
    except (TypeError, ValueError):
        pass
    return repr(value)[:MAX_BODY_REPR]


def _kept_event(payload: Any, hybrid: bool) -> Any:
    """What a refused task message keeps: the event when it is there (a fixed copy can be replayed)."""
    args = payload.get("args") if hybrid and isinstance(payload, dict) else (payload[0] if isinstance(payload, list | tuple) and payload else None)
    if isinstance(args, list | tuple) and len(args) >= 1 and isinstance(args[0], dict):
        return _capped(args[0])
    return _capped(payload)


def _headers(message: Message) -> dict[str, Any]:
    headers = message.headers
    return headers if isinstance(headers, dict) else {}


def _refusal(message: Message, exc: Exception) -> PermanentError:
    """Name the problem: a refused serializer, or a body that does not parse."""
    ctype = message.content_type or "(none)"
    if isinstance(exc, ContentDisallowed):
        return RefusedContent(f"refused content type {ctype}: only JSON is accepted")
    if ctype == "application/json":
        return UndecodableMessage(f"malformed JSON body: {exc}")
    return UndecodableMessage(f"cannot decode body of content type {ctype}: {exc}")


class Consumer(CeleryConsumer):
    """Celery's consumer, with every message it would drop or choke on dead-lettered first."""

    # -- surviving a broker restart ---------------------------------------------------------

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An ack or reject that runs after the connection was lost and collected (a task that
        # finished during a broker restart) goes through the dead channel, and kombu 5.7's Redis
        # channel raises AttributeError there ('NoneType' object has no attribute 'hostname').
        # Celery logs connection errors on ack/reject and goes on, but any other exception is
        # "unrecoverable": the worker exits. The message is still in the broker's unacked set and
        # comes back once the closed channel's heartbeat stops (workers/redelivery.py; the
        # version guard makes the redo harmless),
        # so it is treated like the connection error it is. Only Request.acknowledge/reject use
        # this tuple (celery.worker.strategy).
        self.connection_errors = (*self.connection_errors, AttributeError)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Celery's handler, minus a crash: the worker must reconnect, not die.

        After a Redis broker drops the connection, Celery collects the connection and then closes
        it; kombu 5.7's Redis channel then tries to restore the prefetched messages through the
        collected connection (``client`` is None) and raises AttributeError, which Celery treats
        as unrecoverable. Those messages are still in the broker's unacked set, owned by the closed
        channel, and come back within seconds (workers/redelivery.py), so the close can be given up.
        """
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as e:
            log.warning("closing the lost broker connection failed (%s); its prefetched messages return when its heartbeat stops", e)

    def connection_for_read(self, heartbeat: Any = None) -> Any:
        """The broker connection; on Redis, with owned deliveries (workers/redelivery.py)."""
        return self.ensure_connected(redelivery.install(self.app.connection_for_read(heartbeat=heartbeat)))

    # -- the check before Celery's strategy ------------------------------------------------

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], Any]:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Message) -> Any:
            problem, event = self._check(message)
            if problem is not None:
                return self._dead_letter(message, problem, event)
            return handle(message)

        return on_task_received

    def _check(self, message: Message) -> tuple[PermanentError | None, Any]:
        """(problem, what to keep as the event) for a message, or (None, None) when Celery can run it.

        Protocol 2 names the task in a header, so an unknown task is refused before its body is
        decoded; protocol 1 (no headers) names it in the body. Either way the body must decode
        as JSON and carry arguments the task accepts: Celery assumes both and crashes otherwise.
        """
        headers = _headers(message)
        name, task_id = headers.get("task"), headers.get("id")
        protocol_1 = name is None
        if name is not None and not self._runnable(name):
            return self._unknown(name), body_repr(message)  # kept raw: never decoded for a task we do not run
        try:
            payload = message.payload  # kombu refuses any content type not in accept_content
        except Exception as exc:  # noqa: BLE001 - every decode failure is a dead letter
            return _refusal(message, exc), body_repr(message)
        if protocol_1:  # the task message is the body
            if not isinstance(payload, dict) or "task" not in payload:
                return UnknownMessage("not a Celery task message (no 'task' header or field): sent to the wrong queue?"), _capped(payload)
            name, task_id = payload["task"], payload.get("id")
            if not self._runnable(name):
                return self._unknown(name), _capped(payload)
        if not isinstance(task_id, str) or not task_id:
            return MalformedTask("the task id ('id') is missing"), _capped(payload)
        hybrid = isinstance(payload, dict) and (protocol_1 or "args" in payload)  # Celery converts these
        envelope = payload if hybrid else headers  # where Celery reads retries, eta, expires from
        try:
            check_task_id(task_id)
            check_envelope(envelope, max_eta_s=self.app.cardigan_settings.worker.max_eta_s)
        except PermanentError as problem:
            return problem, _kept_event(payload, hybrid)
        if hybrid:
            args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
            try:  # Celery builds the workflow of a protocol-1 body from its own keys
                check_embed({k: payload.get(k) for k in ("callbacks", "errbacks", "chain", "chord")})
            except PermanentError as problem:
                return problem, _kept_event(payload, hybrid)
        elif isinstance(payload, list | tuple) and len(payload) == 3:
            args, kwargs, embed = payload
            if not (embed is None or isinstance(embed, dict)):
                return MalformedTask(f"body [args, kwargs, embed]: embed must be an object, got {type(embed).__name__}"), _capped(payload)
            try:
                check_embed(embed)
            except PermanentError as problem:
                return problem, _kept_event(payload, hybrid)
        else:
            got = f"a list of {len(payload)}" if isinstance(payload, list | tuple) else type(payload).__name__
            return MalformedTask(f"body must be [args, kwargs, embed] (Celery message protocol 2), got {got}"), _capped(payload)
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            return MalformedTask(
                f"args must be a list and kwargs an object, got {type(args).__name__} and {type(kwargs).__name__}"
            ), _capped(payload)
        check = getattr(self.app.tasks[name], "__header__", None)
        if check is not None:
            try:
                check(*args, **kwargs)
            except TypeError as exc:
                # keep the event itself when it is there, so a fixed copy can be replayed
                kept = args[0] if len(args) >= 1 and isinstance(args[0], dict) else payload
                return MalformedTask(f"arguments do not match task {name}: {exc}"), _capped(kept)
        neutralise(envelope)  # type: ignore[arg-type]
        return None, None

    def _runnable(self, name: Any) -> bool:
        """Only Cardigan's own tasks: Celery's built-ins (celery.map, celery.group, celery.chord,
        celery.accumulate …) are registered in every app, and would run whatever a sender asks."""
        return isinstance(name, str) and name.startswith(OWN_TASKS) and name in self.strategies

    def _unknown(self, name: Any) -> UnknownTask:
        known = ", ".join(sorted(n for n in self.strategies if n.startswith(OWN_TASKS)))
        return UnknownTask(f"unknown task {name!r}: this worker runs {known}")

    # -- Celery's own callbacks: what the check above leaves to them ---------------------

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dead_letter(message, _refusal(message, exc), body_repr(message))

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        err = _refusal(message, exc) if isinstance(exc, ContentDisallowed) else MalformedTask(f"invalid task message: {exc}")
        self._dead_letter(message, err, body_repr(message))

    def on_unknown_message(self, body: Any, message: Message) -> None:
        err = UnknownMessage("not a Celery task message (no 'task' header or field): sent to the wrong queue?")
        self._dead_letter(message, err, _capped(body) if body is not None else body_repr(message))

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name = _headers(message).get("task") or (body.get("task") if isinstance(body, dict) else None)
        self._dead_letter(message, self._unknown(name), body_repr(message))

    # -- storing ------------------------------------------------------------------------

    def _dead_letter(self, message: Message, err: PermanentError, event: Any) -> None:
        """Store, then ack; if storing fails, leave the message unacked for a later delivery."""
        from workers import runtime  # the worker's state store client (shared, lazy)

        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        task_id = _headers(message).get("id")
        if task_id is None:  # protocol 1: the id is in the (JSON) body
            try:
                payload = message.payload  # decoded already, or refused (never unpickled)
            except Exception:  # noqa: BLE001 - undecodable: no id to read
                payload = None
            task_id = (payload if isinstance(payload, dict) else event if isinstance(event, dict) else {}).get("id")
        task_id = task_id if isinstance(task_id, str) else None
        try:
            dl = runtime.dead_letters().add(
                reason=err.reason, kind=err.kind, event=event, field=err.field, task_id=task_id, queue=delivery.get("routing_key"),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - never drop it: the broker will deliver it again
            log.error("could not store a dead letter (%s) for message %s: %s; left unacked", err.kind, task_id, exc)
            return
        log.warning("dead letter %s (%s): %s", dl.id, err.kind, err.reason)
        message.ack_log_error(log, self.connection_errors)
