"""Version guard: the index ends in the state of the highest version seen.

Check → write → record happens under a short per-product lock in Redis, around the Milvus
write itself (not before a slow embed), so a modify at v8 that lands after a delete at v9 loses
whatever the order, duplication or concurrency. Deletes leave a tombstone (their version).

Fencing: a lock can expire under a slow write. Every lock carries a token; the writer renews it
(compare-and-set) before each Milvus call and records a version only while it still holds the
lock and only upwards (one Lua script), so a writer whose lock expired never changes the record.
Its Milvus write may still have landed, over a newer writer's: it then repairs under a fresh lock
(workers/writer.py). For that, a writer that takes over a product whose previous holder never
finished (an *in-flight* marker left behind) journals the rows it writes for a while.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from cardigan.errors import StateUnavailable

_RELEASE = """
local n = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k); n = n + 1 end
end
return n
"""

# KEYS: lock keys; ARGV: token, ttl ms. Extends the locks still ours; returns the indexes lost.
_RENEW = """
local lost = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]) else table.insert(lost, i) end
end
return lost
"""

# KEYS: version hash, then one lock key per product (none when ARGV[1] is '');
# ARGV: token ('' = no lock check), then (product, record, version) triples.
# A record is written only while the lock holds the token, and never downwards.
_RECORD = """
local refused = {}
local n = (#ARGV - 1) / 3
for i = 1, n do
  local pid, val, ver = ARGV[3*i-1], ARGV[3*i], tonumber(ARGV[3*i+1])
  local ok = ARGV[1] == '' or redis.call('GET', KEYS[i+1]) == ARGV[1]
  if ok then
    local cur = redis.call('HGET', KEYS[1], pid)
    if cur and tonumber(string.match(cur, '^-?%d+')) >= ver then ok = false end
  end
  if ok then redis.call('HSET', KEYS[1], pid, val) else table.insert(refused, pid) end
end
return refused
"""


class Held(list[str]):
    """The products a ``locked`` block holds, with its fencing token and takeovers."""

    def __init__(self, token: str, ttl_ms: int) -> None:
        super().__init__()
        self.token = token
        self.ttl_ms = ttl_ms
        # products whose previous holder never finished: its write may still land
        self.takeovers: set[str] = set()
        # set by the writer when a write's outcome is unknown: keep the in-flight markers
        self.unsettled = False


def make_redis(url: str) -> redis.Redis:
    """A pooled, thread-safe client with timeouts (a hung state store must not hang workers)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=5,  # a renew plus a Milvus call (20 s) fit in the lock TTL (30 s)
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )


class VersionGuard:
    """Per-collection version records and locks, so a reindex target has its own guard."""

    def __init__(self, r: redis.Redis, *, lock_ttl_ms: int = 30_000, prefix: str = "cardigan") -> None:
        self._r = r
        self._ttl = lock_ttl_ms
        self._prefix = prefix
        self._release = r.register_script(_RELEASE)
        self._renew = r.register_script(_RENEW)
        self._record = r.register_script(_RECORD)
        # how long an unfinished write is remembered (and a takeover's rows journaled):
        # far longer than any Milvus call may take to land
        self.inflight_ttl_ms = max(10 * lock_ttl_ms, 120_000)

    @property
    def lock_ttl_ms(self) -> int:
        return self._ttl

    def _vkey(self, collection: str) -> str:
        return f"{self._prefix}:ver:{collection}"

    def _lkey(self, collection: str, pid: str) -> str:
        return f"{self._prefix}:lock:{collection}:{pid}"

    def _ikey(self, collection: str, pid: str) -> str:
        return f"{self._prefix}:inflight:{collection}:{pid}"

    def _jkey(self, collection: str, pid: str) -> str:
        return f"{self._prefix}:journal:{collection}:{pid}"

    @contextmanager
    def locked(
        self, collection: str, product_ids: Iterable[str], *, wait_s: float | None = None, ttl_ms: int | None = None
    ) -> Iterator[Held]:
        """Lock the given products (all of them, waiting for the ones others hold).

        Locks are taken without waiting while holding others (no deadlock): each round takes
        what is free; the rest are retried until ``wait_s`` (default: the lock TTL) runs out.
        Each product taken also gets an in-flight marker (removed on a clean exit); finding
        another holder's marker means that holder's write never finished: a takeover.
        ``ttl_ms``: a longer lock than usual (a repair after a write outlived the usual one).
        """
        token = uuid.uuid4().hex
        pending = sorted(set(product_ids))
        ttl = ttl_ms or self._ttl
        held = Held(token, ttl)
        deadline = time.monotonic() + (wait_s if wait_s is not None else self._ttl / 1000)
        delay = 0.002
        try:
            while pending:
                pipe = self._r.pipeline(transaction=False)
                for pid in pending:
                    pipe.set(self._lkey(collection, pid), token, nx=True, px=ttl)
                got = pipe.execute()
                taken = [p for p, ok in zip(pending, got) if ok]
                if taken:
                    pipe = self._r.pipeline(transaction=False)
                    for pid in taken:
                        pipe.set(self._ikey(collection, pid), token, px=self.inflight_ttl_ms, get=True)
                    before = pipe.execute()
                    held.takeovers |= {p for p, b in zip(taken, before) if b is not None and b != token}
                held += taken
                pending = [p for p, ok in zip(pending, got) if not ok]
                if pending:
                    if time.monotonic() > deadline:
                        raise StateUnavailable(f"could not lock {len(pending)} product(s) in {collection}, e.g. {pending[0]!r}")
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            yield held
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {type(e).__name__}: {e}") from e
        finally:
            if held:
                keys = [self._lkey(collection, p) for p in held]
                if not held.unsettled:
                    keys += [self._ikey(collection, p) for p in held]
                try:
                    self._release(keys=keys, args=[token])
                except redis.RedisError:
                    pass  # they expire after the TTL

    def renew(self, collection: str, held: Held) -> list[str]:
        """Extend our locks to a full TTL (before a Milvus call); returns the products lost."""
        if not held:
            return []
        try:
            lost = self._renew(keys=[self._lkey(collection, p) for p in held], args=[held.token, held.ttl_ms])
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e
        return [held[int(i) - 1] for i in lost]

    def journal(self, collection: str, entries: dict[str, tuple[int, list[dict[str, Any]]]]) -> None:
        """Keep the rows written at a takeover, so a late write of the old holder can be undone."""
        if not entries:
            return
        try:
            pipe = self._r.pipeline(transaction=False)
            for pid, (version, rows) in entries.items():
                pipe.set(self._jkey(collection, pid), json.dumps({"version": version, "rows": rows}), px=self.inflight_ttl_ms)
            pipe.execute()
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e

    def journaled(self, collection: str, pid: str) -> tuple[int, list[dict[str, Any]]] | None:
        """The rows journaled for a product, with their version, if still kept."""
        raw = self._r.get(self._jkey(collection, pid))
        if raw is None:
            return None
        doc = json.loads(raw)
        return int(doc["version"]), list(doc["rows"])

    def versions(self, collection: str, product_ids: list[str]) -> dict[str, tuple[int, str] | None]:
        """The recorded (version, type) of each product, None when never seen."""
        if not product_ids:
            return {}
        try:
            vals = self._r.hmget(self._vkey(collection), product_ids)
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e
        return {pid: None if v is None else decode_record(v) for pid, v in zip(product_ids, vals)}

    def record(self, collection: str, applied: dict[str, tuple[int, str]], *, token: str | None = None) -> set[str]:
        """Record versions, never downwards; with ``token``, only while our locks hold it.

        Returns the products refused (a lock lost, or a record already as new).
        """
        if not applied:
            return set()
        pids = list(applied)
        keys = [self._vkey(collection)] + ([self._lkey(collection, p) for p in pids] if token else [])
        args: list[Any] = [token or ""]
        for p in pids:
            v, k = applied[p]
            args += [p, f"{v}:{k}", v]
        try:
            return set(self._record(keys=keys, args=args))
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e

    def all_versions(self, collection: str) -> dict[str, tuple[int, str]]:
        """Every record (for verification tools; HSCAN, never blocks the server)."""
        return {pid: decode_record(v) for pid, v in self._r.hscan_iter(self._vkey(collection), count=1000)}


def decode_record(value: Any) -> tuple[int, str]:
    """``"17:delete"`` → ``(17, "delete")``."""
    ver, _, kind = str(value).partition(":")
    return int(ver), kind
