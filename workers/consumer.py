"""Messages Celery cannot turn into a task become dead letters, not log lines.

``workers.message_check`` decides whether Celery can run a message (a pure check, tested without
servers; its docstring lists what Celery itself would do with the rest). This consumer stores
anything it cannot run as a dead letter, then acks it. If the dead letter cannot be stored (state
store down), the message is left unacked: the broker delivers it again later. Wired in
``config/celery_app.py`` as ``worker_consumer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from vine import promise

from cardigan.errors import PermanentError
from workers import redelivery
from workers.message_check import (
    MalformedTask,
    MessageCheck,
    UnknownMessage,
    UnknownTask,
    body_repr,
    capped,
    headers_of,
    refusal,
)

log = logging.getLogger(__name__)

MAX_BODY_REPR = 4096  # characters of a refused body kept in its dead letter
MAX_EVENT_JSON = 64 * 1024  # a decoded payload bigger than this is kept as a capped repr
OWN_TASKS = "cardigan."  # the only task names a worker runs


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
        """(problem, what to keep as the event), or (None, None) when Celery can run it."""
        return self._message_check.check(message)

    @property
    def _message_check(self) -> MessageCheck:
        # strategies are filled when the worker starts consuming: the mapping is read live
        return MessageCheck(known=self.strategies, tasks=self.app.tasks, max_eta_s=self.app.cardigan_settings.worker.max_eta_s)

    def _unknown(self, name: Any) -> UnknownTask:
        return self._message_check.unknown(name)

    # -- Celery's own callbacks: what the check above leaves to them ---------------------

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self._dead_letter(message, refusal(message, exc), body_repr(message))

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        err = refusal(message, exc) if isinstance(exc, ContentDisallowed) else MalformedTask(f"invalid task message: {exc}")
        self._dead_letter(message, err, body_repr(message))

    def on_unknown_message(self, body: Any, message: Message) -> None:
        err = UnknownMessage("not a Celery task message (no 'task' header or field): sent to the wrong queue?")
        self._dead_letter(message, err, capped(body) if body is not None else body_repr(message))

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name = headers_of(message).get("task") or (body.get("task") if isinstance(body, dict) else None)
        self._dead_letter(message, self._unknown(name), body_repr(message))

    # -- storing ------------------------------------------------------------------------

    def _dead_letter(self, message: Message, err: PermanentError, event: Any) -> None:
        """Store, then ack; if storing fails, leave the message unacked for a later delivery."""
        from workers import runtime  # the worker's state store client (shared, lazy)

        delivery = message.delivery_info if isinstance(message.delivery_info, dict) else {}
        task_id = headers_of(message).get("id")
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
