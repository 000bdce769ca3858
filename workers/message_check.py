"""Is this broker message a task a worker can run? A pure check, testable without servers.

Out of the box, Celery's consumer logs and acks a body it cannot decode, and rejects (on Redis:
deletes) a message with a refused content type (pickle), an unknown task name or no task header.
Each of those is an event that vanished. Worse (measured with Celery 5.7): a JSON body of the
wrong shape (``"a string"`` instead of ``[args, kwargs, embed]``) stops the worker and, restored,
the next one; a message without an ``id`` header makes the consumer restart in a loop; wrong
arguments fail the task with a TypeError and the message is acked. Poison for the whole fleet.

:class:`MessageCheck` names the problem with any such message, and what to keep of it as the
dead letter's event (refused content is kept as a capped ``repr`` of the raw bytes: a pickle is
never unpickled). ``workers.consumer`` stores the dead letter and acks; ``tests/test_message_check``
drives this check with real kombu messages over the in-memory transport, in the style of dramatiq's
stub broker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from cardigan.errors import PermanentError
from workers.envelope import check_embed, check_envelope, check_task_id, neutralise

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


def capped(value: Any) -> Any:
    """A decoded payload as JSON when it is small, else a capped repr (dead letters are small)."""
    try:
        if len(json.dumps(value)) <= MAX_EVENT_JSON:
            return value
    except (TypeError, ValueError):
        pass
    return repr(value)[:MAX_BODY_REPR]


def kept_event(payload: Any, hybrid: bool) -> Any:
    """What a refused task message keeps: the event when it is there (a fixed copy can be replayed)."""
    args = (
        payload.get("args")
        if hybrid and isinstance(payload, dict)
        else (payload[0] if isinstance(payload, list | tuple) and payload else None)
    )
    if isinstance(args, list | tuple) and len(args) >= 1 and isinstance(args[0], dict):
        return capped(args[0])
    return capped(payload)


def headers_of(message: Message) -> dict[str, Any]:
    headers = message.headers
    return headers if isinstance(headers, dict) else {}


def refusal(message: Message, exc: Exception) -> PermanentError:
    """Name the problem: a refused serializer, or a body that does not parse."""
    ctype = message.content_type or "(none)"
    if isinstance(exc, ContentDisallowed):
        return RefusedContent(f"refused content type {ctype}: only JSON is accepted")
    if ctype == "application/json":
        return UndecodableMessage(f"malformed JSON body: {exc}")
    return UndecodableMessage(f"cannot decode body of content type {ctype}: {exc}")


@dataclass(frozen=True)
class MessageCheck:
    """The check before Celery's strategy: ``known`` are the task names this worker has a strategy
    for (a live mapping is fine), ``tasks`` the app's registry (for each task's argument check)."""

    known: Mapping[str, Any]
    tasks: Mapping[str, Any]
    max_eta_s: float

    def check(self, message: Message) -> tuple[PermanentError | None, Any]:
        """(problem, what to keep as the event) for a message, or (None, None) when Celery can run it.

        Protocol 2 names the task in a header, so an unknown task is refused before its body is
        decoded; protocol 1 (no headers) names it in the body. Either way the body must decode
        as JSON and carry arguments the task accepts: Celery assumes both and crashes otherwise.
        """
        headers = headers_of(message)
        name, task_id = headers.get("task"), headers.get("id")
        protocol_1 = name is None
        if name is not None and not self.runnable(name):
            return self.unknown(name), body_repr(message)  # kept raw: never decoded for a task we do not run
        try:
            payload = message.payload  # kombu refuses any content type not in accept_content
        except Exception as exc:  # noqa: BLE001 - every decode failure is a dead letter
            return refusal(message, exc), body_repr(message)
        if protocol_1:  # the task message is the body
            if not isinstance(payload, dict) or "task" not in payload:
                return UnknownMessage("not a Celery task message (no 'task' header or field): sent to the wrong queue?"), capped(payload)
            name, task_id = payload["task"], payload.get("id")
            if not self.runnable(name):
                return self.unknown(name), capped(payload)
        if not isinstance(task_id, str) or not task_id:
            return MalformedTask("the task id ('id') is missing"), capped(payload)
        hybrid = isinstance(payload, dict) and (protocol_1 or "args" in payload)  # Celery converts these
        envelope = payload if hybrid else headers  # where Celery reads retries, eta, expires from
        try:
            check_task_id(task_id)
            check_envelope(envelope, max_eta_s=self.max_eta_s)
        except PermanentError as problem:
            return problem, kept_event(payload, hybrid)
        if hybrid:
            args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
            try:  # Celery builds the workflow of a protocol-1 body from its own keys
                check_embed({k: payload.get(k) for k in ("callbacks", "errbacks", "chain", "chord")})
            except PermanentError as problem:
                return problem, kept_event(payload, hybrid)
        elif isinstance(payload, list | tuple) and len(payload) == 3:
            args, kwargs, embed = payload
            if not (embed is None or isinstance(embed, dict)):
                return MalformedTask(f"body [args, kwargs, embed]: embed must be an object, got {type(embed).__name__}"), capped(payload)
            try:
                check_embed(embed)
            except PermanentError as problem:
                return problem, kept_event(payload, hybrid)
        else:
            got = f"a list of {len(payload)}" if isinstance(payload, list | tuple) else type(payload).__name__
            return MalformedTask(f"body must be [args, kwargs, embed] (Celery message protocol 2), got {got}"), capped(payload)
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            return MalformedTask(
                f"args must be a list and kwargs an object, got {type(args).__name__} and {type(kwargs).__name__}"
            ), capped(payload)
        check = getattr(self.tasks[name], "__header__", None)
        if check is not None:
            try:
                check(*args, **kwargs)
            except TypeError as exc:
                # keep the event itself when it is there, so a fixed copy can be replayed
                kept = args[0] if len(args) >= 1 and isinstance(args[0], dict) else payload
                return MalformedTask(f"arguments do not match task {name}: {exc}"), capped(kept)
        neutralise(envelope)  # type: ignore[arg-type]
        return None, None

    def runnable(self, name: Any) -> bool:
        """Only Cardigan's own tasks: Celery's built-ins (celery.map, celery.group, celery.chord,
        celery.accumulate …) are registered in every app, and would run whatever a sender asks."""
        return isinstance(name, str) and name.startswith(OWN_TASKS) and name in self.known

    def unknown(self, name: Any) -> UnknownTask:
        known = ", ".join(sorted(n for n in self.known if n.startswith(OWN_TASKS)))
        return UnknownTask(f"unknown task {name!r}: this worker runs {known}")
