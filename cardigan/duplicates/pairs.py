"""Candidate double-listing pairs in the state Redis: what detection found, and the queue of
products waiting for a check.

A pair is stored once (``a < b``) in one hash, with its evidence as JSON; each product has a set
of the products it is paired with, so a modify or a delete finds its pairs without a scan.
Products to check sit in a sorted set scored by when they are due: a detector claims a batch by
pushing its due time ``retry_s`` ahead, and removes a product only if nobody re-queued it since,
so a detector that dies or fails leaves its batch to be retried, and a newer write is never lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import redis

from cardigan.keys import DUP_COUNTS_KEY, DUP_LAG_KEY, DUP_LINKS_KEY, DUP_PAIRS_KEY, DUP_PENDING_KEY, DUP_SINCE_KEY

SEP = "\x1f"  # product ids are validated to a strict character set: never contain it


@dataclass(frozen=True)
class Pair:
    """Two products whose best-matching images score ``score``; ``a < b``."""

    a: str
    b: str
    score: float
    a_version: int
    b_version: int
    a_image: int  # the image index of ``a`` in the best match
    b_image: int
    time: float  # when it was (last) confirmed, epoch seconds

    @staticmethod
    def of(p: str, q: str, score: float, p_version: int, q_version: int, p_image: int, q_image: int, at: float | None = None) -> Pair:
        """The pair in canonical order, whichever product found it."""
        now = time.time() if at is None else at
        if p < q:
            return Pair(p, q, round(score, 6), p_version, q_version, p_image, q_image, now)
        return Pair(q, p, round(score, 6), q_version, p_version, q_image, p_image, now)

    @property
    def key(self) -> str:
        return f"{self.a}{SEP}{self.b}"

    def other(self, product_id: str) -> str:
        return self.b if product_id == self.a else self.a

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> Pair:
        return Pair(**json.loads(raw))


# Claim up to ARGV[2] products due at ARGV[1] (ms): push their due time to ARGV[3]; returns
# [member, claim score, ...]. One script, so two detectors never claim the same product at once.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, m in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[3], m)
  out[#out + 1] = m
end
return out
"""
# Remove the products whose due time is still our claim's (a write since then re-queued them);
# returns the publish times (ms) of those removed.
_DONE = """
local out = {}
for i = 2, #ARGV do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i])) == tonumber(ARGV[1]) then
    local since = redis.call('HGET', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    if since then out[#out + 1] = since end
  end
end
return out
"""


class PairStore:
    """The pairs and the pending set of one alias; every call is one or two Redis round trips."""

    def __init__(self, state: redis.Redis, alias: str, *, lag_samples: int = 10_000) -> None:
        self.r = state
        self.alias = alias
        self.pairs_key = DUP_PAIRS_KEY.format(alias=alias)
        self.pending_key = DUP_PENDING_KEY.format(alias=alias)
        self.since_key = DUP_SINCE_KEY.format(alias=alias)
        self.lag_key = DUP_LAG_KEY.format(alias=alias)
        self.counts_key = DUP_COUNTS_KEY.format(alias=alias)
        self.lag_samples = lag_samples
        self._claim = self.r.register_script(_CLAIM)
        self._done = self.r.register_script(_DONE)

    def _links(self, product_id: str) -> str:
        return DUP_LINKS_KEY.format(alias=self.alias, product_id=product_id)

    # -- the pending set ------------------------------------------------------------------

    def enqueue(self, since_ms: dict[str, int]) -> None:
        """Products just written (or deleted): due now; ``since_ms`` is their publish time, kept
        from the first unchecked write so the lag counts from the oldest change not yet seen."""
        if not since_ms:
            return
        now = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.pending_key, dict.fromkeys(since_ms, now))
        for pid, ms in since_ms.items():
            pipe.hsetnx(self.since_key, pid, ms)
        pipe.execute()

    def claim(self, n: int, retry_s: float) -> tuple[list[str], int]:
        """Up to ``n`` due products and the claim's token (their new due time)."""
        now = int(time.time() * 1000)
        token = now + int(retry_s * 1000)
        got = self._claim(keys=[self.pending_key], args=[now, n, token])
        return [m.decode() if isinstance(m, bytes) else str(m) for m in got], token

    def done(self, product_ids: list[str], token: int) -> list[int]:
        """Mark a claimed batch checked; returns the lag (ms since publish) of each product removed."""
        if not product_ids:
            return []
        since = self._done(keys=[self.pending_key, self.since_key], args=[token, *product_ids])
        now = int(time.time() * 1000)
        lags = [max(0, now - int(s)) for s in since]
        if lags and self.lag_samples:
            pipe = self.r.pipeline(transaction=False)
            pipe.lpush(self.lag_key, *lags)
            pipe.ltrim(self.lag_key, 0, self.lag_samples - 1)
            pipe.execute()
        return lags

    def pending(self) -> int:
        return int(self.r.zcard(self.pending_key))  # type: ignore[arg-type]

    def oldest_pending_ms(self) -> int | None:
        """How long the oldest unchecked change has waited (ms), or None when none waits."""
        vals = [int(v) for v in self.r.hvals(self.since_key)]  # type: ignore[union-attr]
        return max(0, int(time.time() * 1000) - min(vals)) if vals else None

    def lags(self, n: int = 10_000) -> list[int]:
        return [int(v) for v in self.r.lrange(self.lag_key, 0, n - 1)]  # type: ignore[union-attr]

    # -- pairs ----------------------------------------------------------------------------

    def replace(self, found: dict[str, list[Pair]]) -> tuple[int, int, list[Pair]]:
        """Each checked product's pairs become exactly ``found[product]`` (empty: it has none, or
        it was deleted). Returns (pairs added, pairs dropped, pairs that started a new group)."""
        if not found:
            return 0, 0, []
        pipe = self.r.pipeline(transaction=False)
        for pid in found:
            pipe.smembers(self._links(pid))
        old = {pid: {m.decode() if isinstance(m, bytes) else m for m in links} for pid, links in zip(found, pipe.execute())}
        new_links = {pid: {p.other(pid) for p in pairs} for pid, pairs in found.items()}
        # a new pair between two products that had no pairs yet opens a new group
        touched = {p.other(pid) for pid, pairs in found.items() for p in pairs} - set(found)
        for other in sorted(touched):
            pipe.scard(self._links(other))
        other_sizes = dict(zip(sorted(touched), pipe.execute()))
        added = dropped = 0
        fresh: list[Pair] = []
        seen: set[str] = set()
        grouped: set[str] = set()  # products paired in this call: a second new pair joins their group
        for pid, pairs in found.items():
            for other in old[pid] - new_links[pid]:
                a, b = sorted((pid, other))
                if f"{a}{SEP}{b}" in seen:
                    continue
                seen.add(f"{a}{SEP}{b}")
                pipe.hdel(self.pairs_key, f"{a}{SEP}{b}")
                pipe.srem(self._links(pid), other)
                pipe.srem(self._links(other), pid)
                dropped += 1
            for p in pairs:
                other = p.other(pid)
                pipe.hset(self.pairs_key, p.key, p.to_json())
                pipe.sadd(self._links(pid), other)
                pipe.sadd(self._links(other), pid)
                if other not in old[pid] and p.key not in seen:
                    added += 1
                    alone = not old[pid] and not (old.get(other) if other in found else other_sizes.get(other))
                    if alone and pid not in grouped and other not in grouped:
                        fresh.append(p)
                grouped |= {pid, other}
                seen.add(p.key)
        pipe.execute()
        return added, dropped, fresh

    def remove_product(self, product_id: str) -> int:
        """Drop every pair of a product (deleted); returns how many."""
        return self.replace({product_id: []})[1]

    def pairs_of(self, product_id: str) -> list[Pair]:
        others = sorted(m.decode() if isinstance(m, bytes) else m for m in self.r.smembers(self._links(product_id)))  # type: ignore[union-attr]
        if not others:
            return []
        keys = [f"{min(product_id, o)}{SEP}{max(product_id, o)}" for o in others]
        return sorted((Pair.from_json(v) for v in self.r.hmget(self.pairs_key, keys) if v is not None), key=lambda p: -p.score)

    def all_pairs(self, batch: int = 1000) -> Iterator[Pair]:
        """Every pair (HSCAN: no single huge reply)."""
        for _, v in self.r.hscan_iter(self.pairs_key, count=batch):
            yield Pair.from_json(v)

    def count(self) -> int:
        return int(self.r.hlen(self.pairs_key))  # type: ignore[arg-type]

    # -- counters (cumulative, for status) -----------------------------------------------

    def add_counts(self, **counts: int) -> None:
        nonzero = {k: v for k, v in counts.items() if v}
        if not nonzero:
            return
        pipe = self.r.pipeline(transaction=False)
        for k, v in nonzero.items():
            pipe.hincrby(self.counts_key, k, v)
        pipe.execute()

    def counts(self) -> dict[str, int]:
        raw = self.r.hgetall(self.counts_key)
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def clear(self, product_ids: Iterable[str] | None = None) -> None:
        """Tests and `duplicates scan --restart`: forget pairs (all of them when no ids)."""
        if product_ids is not None:
            for pid in product_ids:
                self.remove_product(pid)
            return
        keys = [self.pairs_key, self.pending_key, self.since_key, self.lag_key, self.counts_key]
        for k in self.r.scan_iter(match=DUP_LINKS_KEY.format(alias=self.alias, product_id="*"), count=1000):
            keys.append(k.decode() if isinstance(k, bytes) else k)
        self.r.delete(*keys)
