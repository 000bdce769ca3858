"""Version guard: the index ends in the state of the highest version seen.

Check → write → record happens under a short per-product lock in Redis, around the Milvus
write itself (not before a slow embed), so a modify at v8 that lands after a delete at v9 loses
whatever the order, duplication or concurrency. Deletes leave a tombstone (their version).
"""

from __future__ import annotations

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


def make_redis(url: str) -> redis.Redis:
    """A pooled, thread-safe client with timeouts (a hung state store must not hang workers)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=10,
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

    def _vkey(self, collection: str) -> str:
        return f"{self._prefix}:ver:{collection}"

    def _lkey(self, collection: str, pid: str) -> str:
        return f"{self._prefix}:lock:{collection}:{pid}"

    @contextmanager
    def locked(self, collection: str, product_ids: Iterable[str], *, wait_s: float | None = None) -> Iterator[list[str]]:
        """Lock the given products (all of them, waiting for the ones others hold).

        Locks are taken without waiting while holding others (no deadlock): each round takes
        what is free; the rest are retried until ``wait_s`` (default: the lock TTL) runs out.
        """
        token = uuid.uuid4().hex
        pending = sorted(set(product_ids))
        held: list[str] = []
        deadline = time.monotonic() + (wait_s if wait_s is not None else self._ttl / 1000)
        delay = 0.002
        try:
            while pending:
                pipe = self._r.pipeline(transaction=False)
                for pid in pending:
                    pipe.set(self._lkey(collection, pid), token, nx=True, px=self._ttl)
                got = pipe.execute()
                held += [p for p, ok in zip(pending, got) if ok]
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
                try:
                    self._release(keys=[self._lkey(collection, p) for p in held], args=[token])
                except redis.RedisError:
                    pass  # they expire after the TTL

    def versions(self, collection: str, product_ids: list[str]) -> dict[str, tuple[int, str] | None]:
        """The recorded (version, type) of each product, None when never seen."""
        if not product_ids:
            return {}
        try:
            vals = self._r.hmget(self._vkey(collection), product_ids)
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e
        return {pid: None if v is None else decode_record(v) for pid, v in zip(product_ids, vals)}

    def record(self, collection: str, applied: dict[str, tuple[int, str]]) -> None:
        if not applied:
            return
        try:
            self._r.hset(self._vkey(collection), mapping={p: f"{v}:{k}" for p, (v, k) in applied.items()})
        except redis.RedisError as e:
            raise StateUnavailable(f"state store unavailable: {e}") from e

    def all_versions(self, collection: str) -> dict[str, tuple[int, str]]:
        """Every record (for verification tools; HSCAN, never blocks the server)."""
        return {pid: decode_record(v) for pid, v in self._r.hscan_iter(self._vkey(collection), count=1000)}



def decode_record(value: Any) -> tuple[int, str]:
    """``"17:delete"`` → ``(17, "delete")``."""
    ver, _, kind = str(value).partition(":")
    return int(ver), kind
