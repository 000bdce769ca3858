"""The task message's envelope (headers), checked before Celery or our task reads any of it.

Celery trusts its headers: ``retries: null`` makes ``Task.retry`` raise (the message then loops),
an ``eta`` that overflows or an ``expires`` in the past makes the worker ack it with nothing
recorded, an ``eta`` in the year 2999 is held unacked forever, and a ``timelimit`` or workflow
(``callbacks``, ``chain``, ``chord``) the sender chose runs as the sender chose. Here each field
must have the shape our publisher writes; anything else is a :class:`BadEnvelope` that names the
field, and the consumer stores it as a dead letter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dateutil.parser import isoparse

from cardigan.errors import PermanentError

MAX_TASK_ID_LEN = 255
MAX_RETRIES_HEADER = 10_000  # far above any max_retries; counting is ours (tasks/policy.py)
_WORKFLOW = ("callbacks", "errbacks", "chain", "chord")


class BadEnvelope(PermanentError):
    """A header (or protocol-1 field) the worker cannot trust."""

    kind = "bad_envelope"


class ExpiredMessage(PermanentError):
    """``expires`` had passed when the message reached a worker: kept, not silently dropped."""

    kind = "expired"


def _when(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise BadEnvelope(f"must be an ISO 8601 date-time string or null, got {_shown(value)}", field=name)
    try:
        when = isoparse(value)
    except (ValueError, OverflowError) as e:
        raise BadEnvelope(f"not an ISO 8601 date-time: {value!r} ({e})", field=name) from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)  # Celery's clock is UTC
    try:
        when.timestamp()
        (when - datetime.now(UTC)).total_seconds()
    except (OverflowError, ValueError) as e:
        raise BadEnvelope(f"{value!r} is out of range ({e})", field=name) from None
    return when


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def check_envelope(fields: Mapping[str, Any], *, max_eta_s: float, now: datetime | None = None) -> None:
    """Raise BadEnvelope/ExpiredMessage unless ``fields`` (headers, or a protocol-1 body) are sane.

    ``task`` and ``id`` are checked by the caller (they decide which error applies).
    """
    now = now or datetime.now(UTC)
    retries = fields.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise BadEnvelope(f"must be an integer, got {_shown(retries)}", field="retries")
    if not 0 <= retries <= MAX_RETRIES_HEADER:
        raise BadEnvelope(f"must be between 0 and {MAX_RETRIES_HEADER}, got {retries}", field="retries")
    eta = _when(fields.get("eta"), "eta")
    if eta is not None and (eta - now).total_seconds() > max_eta_s:
        raise BadEnvelope(
            f"{fields['eta']} is more than {max_eta_s:.0f} s ahead: the worker would hold the message unacked "
            "and the broker would deliver it again",
            field="eta",
        )
    expires = _when(fields.get("expires"), "expires")
    if expires is not None and expires <= now:
        raise ExpiredMessage(f"expired at {fields['expires']}, before a worker received it", field="expires")
    timelimit = fields.get("timelimit")
    if timelimit is not None:
        if not (isinstance(timelimit, list | tuple) and len(timelimit) == 2 and all(_limit(t) for t in timelimit)):
            raise BadEnvelope(f"must be [soft, hard] seconds (numbers or null), got {_shown(timelimit)}", field="timelimit")


def _limit(t: Any) -> bool:
    return t is None or (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t >= 0)


def check_task_id(task_id: Any) -> str:
    """A printable string: it keys the delivery counter and names the message everywhere."""
    if not isinstance(task_id, str) or not task_id:
        raise BadEnvelope("the task id ('id') is missing", field="id")
    if len(task_id) > MAX_TASK_ID_LEN or not task_id.isprintable():
        raise BadEnvelope(f"must be printable and at most {MAX_TASK_ID_LEN} characters", field="id")
    return task_id


def check_embed(embed: Any) -> None:
    """No workflows: a message must not make the worker send further tasks of the sender's choice."""
    if embed is None:
        return
    if not isinstance(embed, dict):
        raise BadEnvelope(f"body [args, kwargs, embed]: embed must be an object, got {type(embed).__name__}", field="embed")
    used = [k for k in _WORKFLOW if embed.get(k)]
    if used:
        raise BadEnvelope(f"workflows are not accepted ({', '.join(used)}): publish each event as its own message", field="embed")


def neutralise(headers: dict[str, Any]) -> None:
    """After the checks: ``expires`` was honoured at arrival, so Celery must not drop the message
    later (during a retry countdown) with nothing recorded; the sender's time limits do not apply."""
    if headers.get("expires") is not None:
        headers["expires"] = None
    if "timelimit" in headers:
        headers["timelimit"] = [None, None]
