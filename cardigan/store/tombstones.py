"""Tombstone retention: a delete's version record is kept for a while, then swept.

A delete leaves its version in the guard's record (a tombstone) so that an older add or modify
that arrives later (a replay, a slow retry) is refused as stale. Kept for ever, tombstones grow
Redis without bound, one per delete, even for ids never seen. Here each tombstone's time is
noted in a sorted set; a sweep removes those older than the retention. So a stale replay is
refused for ``retention_s`` after the delete was applied; after that it would be applied
again (docs/reliability.md). Live products' records are never swept: they are the catalog.
"""

from __future__ import annotations

import logging
import time

import redis

log = logging.getLogger(__name__)

# Remove a record only if it is still a delete: a newer add re-created the product meanwhile.
_SWEEP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local n = 0
for _, pid in ipairs(ids) do
  local v = redis.call('HGET', KEYS[1], pid)
  if v and string.find(v, ':delete', 1, true) then
    redis.call('HDEL', KEYS[1], pid)
    n = n + 1
  end
  redis.call('ZREM', KEYS[2], pid)
end
return n
"""


class Tombstones:
    """When each collection's tombstones were written, and their sweep."""

    def __init__(self, r: redis.Redis, *, retention_s: float, prefix: str = "cardigan") -> None:
        self._r = r
        self._retention = retention_s
        self._prefix = prefix
        self._sweep = r.register_script(_SWEEP)

    def _vkey(self, collection: str) -> str:
        return f"{self._prefix}:ver:{collection}"  # the version guard's records (cardigan/store/guard.py)

    def _tkey(self, collection: str) -> str:
        return f"{self._prefix}:tomb:{collection}"

    def note(self, collection: str, applied: dict[str, tuple[int, str]], now: float | None = None) -> None:
        """Deletes just recorded start their retention; adds and modifies end it."""
        deletes = {pid: now or time.time() for pid, (_, kind) in applied.items() if kind == "delete"}
        live = [pid for pid, (_, kind) in applied.items() if kind != "delete"]
        pipe = self._r.pipeline(transaction=False)
        if deletes:
            pipe.zadd(self._tkey(collection), deletes)  # type: ignore[arg-type]
        if live:
            pipe.zrem(self._tkey(collection), *live)
        pipe.execute()

    def sweep(self, collection: str, now: float | None = None, limit: int = 5000) -> int:
        """Remove tombstones older than the retention (at most ``limit``); how many went."""
        cutoff = (now or time.time()) - self._retention
        return int(self._sweep(keys=[self._vkey(collection), self._tkey(collection)], args=[cutoff, limit]))

    def count(self, collection: str) -> int:
        return int(self._r.zcard(self._tkey(collection)))
