"""Dead letters: events that cannot succeed, kept with their reason until an operator acts.

Stored in the state Redis (a hash of JSON records plus a time index) so every worker writes
to one place and ``cardigan dead list|show|replay|purge`` reads it.

Bounded, because that Redis is a ``noeviction`` server shared with the broker: each add drops
records older than the retention and the oldest beyond the cap, counts what it dropped (in
``cardigan:dead:dropped``, and for the worker's metrics), and keeps at most MAX_EVENT_BYTES of
each event.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import field as dc_field
from typing import Any

import redis

_HASH = "cardigan:dead"
_INDEX = "cardigan:dead:by_time"
_ID_CHARS = frozenset("0123456789abcdef")  # ids are uuid4 hex: no glob characters reach HSCAN
_DROPPED = "cardigan:dead:dropped"
MAX_EVENT_BYTES = 64 * 1024  # an event bigger than this is kept as a capped repr
DEFAULT_MAX = 100_000
DEFAULT_RETENTION_S = 30 * 24 * 3600


class AmbiguousId(ValueError):
    """A prefix that starts more than one dead letter's id."""

    def __init__(self, prefix: str, matches: list[str]) -> None:
        super().__init__(f"{prefix!r} starts {len(matches)} ids")
        self.matches = matches


@dataclass
class DeadLetter:
    id: str
    reason: str
    kind: str
    event: Any  # the raw event as received (may be invalid, so not an Event)
    field: str | None = None
    attempts: int = 1
    task_id: str | None = None
    queue: str | None = None
    time: float = dc_field(default_factory=time.time)

    @property
    def product_id(self) -> str | None:
        return self.event.get("product_id") if isinstance(self.event, dict) else None


class DeadLetters:
    def __init__(
        self,
        r: redis.Redis,
        *,
        max_letters: int = DEFAULT_MAX,
        retention_s: float = DEFAULT_RETENTION_S,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self._r = r
        self._max = max_letters
        self._retention = retention_s
        self._on_drop = on_drop

    def add(
        self,
        *,
        reason: str,
        kind: str,
        event: Any,
        field: str | None = None,
        attempts: int = 1,
        task_id: str | None = None,
        queue: str | None = None,
    ) -> DeadLetter:
        dl = DeadLetter(
            id=uuid.uuid4().hex[:12],
            reason=reason,
            kind=kind,
            event=_jsonable(event),
            field=field,
            attempts=attempts,
            task_id=task_id,
            queue=queue,
        )
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(_HASH, dl.id, json.dumps(asdict(dl)))
        pipe.zadd(_INDEX, {dl.id: dl.time})
        pipe.execute()
        self.trim(now=dl.time)
        return dl

    def trim(self, now: float | None = None) -> int:
        """Drop letters older than the retention, then the oldest beyond the cap; count them."""
        now = time.time() if now is None else now
        old = self._r.zrangebyscore(_INDEX, "-inf", now - self._retention, start=0, num=1000)
        excess = int(self._r.zcard(_INDEX)) - len(old) - self._max
        if excess > 0:
            old += [i for i in self._r.zrange(_INDEX, 0, excess + len(old) - 1) if i not in set(old)][:excess]
        if not old:
            return 0
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(_HASH, *old)
        pipe.zrem(_INDEX, *old)
        pipe.incrby(_DROPPED, len(old))
        dropped = int(pipe.execute()[1])
        if dropped and self._on_drop is not None:
            self._on_drop(dropped)
        return dropped

    def dropped(self) -> int:
        """Letters dropped by the cap or the retention, ever (reset by ``purge``)."""
        return int(self._r.get(_DROPPED) or 0)

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        ids = self._r.zrange(_INDEX, 0, -1 if limit is None else limit - 1)
        if not ids:
            return []
        return [DeadLetter(**json.loads(v)) for v in self._r.hmget(_HASH, ids) if v]

    def since(self, t: float, limit: int = 1000) -> list[DeadLetter]:
        """Dead letters recorded at or after ``t`` (epoch seconds), oldest first."""
        ids = self._r.zrangebyscore(_INDEX, t, "+inf", start=0, num=limit)
        if not ids:
            return []
        return [DeadLetter(**json.loads(v)) for v in self._r.hmget(_HASH, ids) if v]

    def get(self, id_: str) -> DeadLetter | None:
        v = self._r.hget(_HASH, id_)
        return DeadLetter(**json.loads(v)) if v else None

    def resolve(self, given: str) -> str | None:
        """The full id for an id or a unique prefix of one (as git takes commit ids), else None.

        Raises AmbiguousId naming the matches (at most 10). A prefix scans the hash (HSCAN,
        never blocking the server); dead letters are few, an operator's backlog."""
        if self._r.hexists(_HASH, given):
            return given
        prefix = given.lower()
        if not prefix or not set(prefix) <= _ID_CHARS:
            return None
        matches = sorted({str(k) for k, _ in self._r.hscan_iter(_HASH, match=f"{prefix}*", count=1000)})
        if len(matches) > 1:
            raise AmbiguousId(given, matches[:10])
        return matches[0] if matches else None

    def remove(self, ids: list[str]) -> int:
        if not ids:
            return 0
        pipe = self._r.pipeline(transaction=True)
        pipe.hdel(_HASH, *ids)
        pipe.zrem(_INDEX, *ids)
        return int(pipe.execute()[0])

    def purge(self) -> int:
        n = int(self._r.hlen(_HASH))
        self._r.delete(_HASH, _INDEX, _DROPPED)
        return n

    def count(self) -> int:
        return int(self._r.hlen(_HASH))


def _jsonable(event: Any) -> Any:
    """Keep what was received, as JSON, at most MAX_EVENT_BYTES; else a capped repr."""
    if isinstance(event, bytes):
        try:
            event = event.decode("utf-8")
        except UnicodeDecodeError:
            return repr(event[:4096])
    try:
        text = json.dumps(event)
    except (TypeError, ValueError):
        return repr(event)[:4096]
    if len(text) > MAX_EVENT_BYTES:
        return text[:MAX_EVENT_BYTES] + "…"  # still shows what it was; too big to replay as is
    return event
