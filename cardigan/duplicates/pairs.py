"""Candidate double-listing pairs in the state Redis: what detection found, and the queue of
products waiting for a check.

A pair is stored once (``a < b``) in one hash, with its evidence as JSON; each product has a set
of the products it is paired with, so a modify or a delete finds its pairs without a scan.
Products to check sit in a sorted set scored by when they are due: a detector claims a batch by
pushing its due time ``retry_s`` ahead, and removes a product only if nobody re-queued it since,
so a detector that dies or fails leaves its batch to be retried, and a newer write is never lost.

The writer queues what it wrote in the pipeline it already sends after a write (``queue_into``),
before its events are acked: no window where a killed worker loses a product to check. With each
product it records the newest version queued, so a detector that holds that version's rows in
memory (it wrote them) can skip reading them back from Milvus.

Pairs are replaced atomically (one script per batch). Announcing: a group is **new** (announced
once, with all its members) when the pairs a batch added connect products none of which was
paired before that batch; a pair that joins a product to an existing group, or merges groups,
updates that group and is not announced. "Paired before" is read inside the same script that
writes the links, so two detectors recording pairs of the same products at once cannot both
call one group new.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import redis

from cardigan.keys import DUP_COUNTS_KEY, DUP_LAG_KEY, DUP_LINKS_KEY, DUP_PAIRS_KEY, DUP_PENDING_KEY, DUP_SINCE_KEY, DUP_VERSION_KEY

if TYPE_CHECKING:
    from cardigan.duplicates.groups import Group

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
# {0, member, newest version queued or false, ...}. A batch not full is claimed only once its
# oldest product has been due for ARGV[4] ms (the linger: fewer, larger batches); until then it
# returns {ms left}. One script, so two detectors never claim the same product at once.
_CLAIM = """
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, n)
if #due == 0 then return {-1} end
local wait = tonumber(due[2]) + tonumber(ARGV[4]) - now
if #due < 2 * n and wait > 0 then return {wait} end
local out = {0}
for i = 1, #due, 2 do
  local m = due[i]
  redis.call('ZADD', KEYS[1], ARGV[3], m)
  out[#out + 1] = m
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], m)
end
return out
"""
# Remove the products whose due time is still our claim's (a write since then re-queued them),
# keep their lags (ms since publish: ARGV[2] is now) in a capped list and add the counters; one
# round trip. ARGV: token, now, lag cap, number of counters, counter/value pairs, products.
# Returns the lags of the products removed.
_DONE = """
local token, now, cap, nc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 5, 4 + 2 * nc, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
local out = {}
for i = 5 + 2 * nc, #ARGV do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i])) == token then
    local since = redis.call('HGET', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('ZREM', KEYS[3], ARGV[i])
    if since then out[#out + 1] = math.max(0, now - tonumber(since)) end
  end
end
if #out > 0 and cap > 0 then
  redis.call('LPUSH', KEYS[5], unpack(out))
  redis.call('LTRIM', KEYS[5], 0, cap - 1)
end
return out
"""
# Replace checked products' pairs. ARGV[1]: the links-key prefix; then per checked product:
# product, n, and n (other, pair key, JSON) triples. Returns {added, dropped, [new pair keys],
# [products paired before this call]}: each product's "paired before" is read before this call
# changes its links, all in one atomic step.
_REPLACE = """
local prefix, sep = ARGV[1], '\\31'
local before = {}
local function had(p)
  if before[p] == nil then before[p] = redis.call('SCARD', prefix .. p) > 0 end
end
local added, dropped, fresh, now = 0, 0, {}, {}
local i = 2
while i <= #ARGV do
  local pid, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  had(pid)
  local keep = {}
  for j = 0, n - 1 do keep[ARGV[i + 3 * j]] = true end
  for _, other in ipairs(redis.call('SMEMBERS', prefix .. pid)) do
    if not keep[other] and not now[pid .. sep .. other] then  -- a pair found this call stays
      had(other)
      redis.call('HDEL', KEYS[1], pid .. sep .. other, other .. sep .. pid)
      redis.call('SREM', prefix .. pid, other)
      redis.call('SREM', prefix .. other, pid)
      dropped = dropped + 1
    end
  end
  for j = 0, n - 1 do
    local other, key = ARGV[i + 3 * j], ARGV[i + 3 * j + 1]
    had(other)
    redis.call('HSET', KEYS[1], key, ARGV[i + 3 * j + 2])
    if redis.call('SADD', prefix .. pid, other) == 1 then
      added = added + 1
      fresh[#fresh + 1] = key
    end
    redis.call('SADD', prefix .. other, pid)
    now[pid .. sep .. other], now[other .. sep .. pid] = true, true
  end
  i = i + 3 * n
end
local paired = {}
for p, v in pairs(before) do if v then paired[#paired + 1] = p end end
return {added, dropped, fresh, paired}
"""


class PairStore:
    """The pairs and the pending set of one alias; every call is one or two Redis round trips."""

    def __init__(self, state: redis.Redis, alias: str, *, lag_samples: int = 10_000) -> None:
        self.r = state
        self.alias = alias
        self.pairs_key = DUP_PAIRS_KEY.format(alias=alias)
        self.pending_key = DUP_PENDING_KEY.format(alias=alias)
        self.since_key = DUP_SINCE_KEY.format(alias=alias)
        self.version_key = DUP_VERSION_KEY.format(alias=alias)
        self.lag_key = DUP_LAG_KEY.format(alias=alias)
        self.counts_key = DUP_COUNTS_KEY.format(alias=alias)
        self.links_prefix = DUP_LINKS_KEY.format(alias=alias, product_id="")
        self.lag_samples = lag_samples
        self._claim = self.r.register_script(_CLAIM)
        self._done = self.r.register_script(_DONE)
        self._replace = self.r.register_script(_REPLACE)

    def _links(self, product_id: str) -> str:
        return DUP_LINKS_KEY.format(alias=self.alias, product_id=product_id)

    # -- the pending set ------------------------------------------------------------------

    def enqueue(self, since_ms: dict[str, int], versions: dict[str, int] | None = None) -> None:
        """Products just written (or deleted), due now (one round trip); see ``queue_into``."""
        if not since_ms:
            return
        pipe = self.r.pipeline(transaction=False)
        self.queue_into(pipe, since_ms, versions)
        pipe.execute()

    def queue_into(self, pipe: redis.client.Pipeline, since_ms: dict[str, int], versions: dict[str, int] | None = None) -> None:
        """Add the queueing of ``since_ms``'s products to ``pipe`` (the caller's round trip).

        ``since_ms``: each product's publish time, kept from the first unchecked write so the lag
        counts from the oldest change not yet seen; ``versions``: the version just written, for
        products whose rows the caller hands to its own detector (``claim_versions``)."""
        if not since_ms:
            return
        # plain commands, no script: a script in a pipeline costs a SCRIPT EXISTS round trip
        pipe.zadd(self.pending_key, dict.fromkeys(since_ms, int(time.time() * 1000)))
        for pid, ms in since_ms.items():
            pipe.hsetnx(self.since_key, pid, int(ms))
        vers = {p: v for p, v in (versions or {}).items() if p in since_ms}
        if vers:  # the newest: two writers' pipelines may arrive out of order
            pipe.zadd(self.version_key, vers, gt=True)

    def claim(self, n: int, retry_s: float) -> tuple[list[str], int]:
        """Up to ``n`` due products and the claim's token (their new due time)."""
        got, token, _ = self.claim_versions(n, retry_s)
        return list(got), token

    def claim_versions(self, n: int, retry_s: float, linger_ms: float = 0) -> tuple[dict[str, int | None], int, float]:
        """Up to ``n`` due products, each with the newest version queued for it (None: queued
        without one, e.g. by a retry or a scan), the claim's token (their new due time), and
        when nothing is claimed, how long to wait (s) before a batch is ready (None: none due).

        ``linger_ms``: fewer than ``n`` due products are claimed only once the oldest has been
        due that long (each search call has a fixed cost: fewer, fuller batches)."""
        now = int(time.time() * 1000)
        token = now + int(retry_s * 1000)
        got = self._claim(keys=[self.pending_key, self.version_key], args=[now, n, token, int(linger_ms)])
        if int(got[0]) != 0:
            wait = float(got[0])
            return {}, token, (None if wait < 0 else wait / 1000)  # type: ignore[return-value]
        out: dict[str, int | None] = {}
        for m, v in zip(got[1::2], got[2::2]):
            out[_text(m)] = None if v is None else int(float(v))
        return out, token, 0.0

    def done(self, product_ids: list[str], token: int, **counts: int) -> list[int]:
        """Mark a claimed batch checked and add ``counts`` to the counters (one round trip);
        returns the lag (ms since publish) of each product removed."""
        nonzero = [x for k, v in counts.items() if v for x in (k, v)]
        if not product_ids and not nonzero:
            return []
        keys = [self.pending_key, self.since_key, self.version_key, self.counts_key, self.lag_key]
        args = [token, int(time.time() * 1000), self.lag_samples, len(nonzero) // 2, *nonzero, *product_ids]
        return [int(x) for x in self._done(keys=keys, args=args)]

    def pending(self) -> int:
        return int(self.r.zcard(self.pending_key))  # type: ignore[arg-type]

    def oldest_pending_ms(self) -> int | None:
        """How long the oldest unchecked change has waited (ms), or None when none waits."""
        vals = [int(v) for v in self.r.hvals(self.since_key)]  # type: ignore[union-attr]
        return max(0, int(time.time() * 1000) - min(vals)) if vals else None

    def lags(self, n: int = 10_000) -> list[int]:
        return [int(v) for v in self.r.lrange(self.lag_key, 0, n - 1)]  # type: ignore[union-attr]

    # -- pairs ----------------------------------------------------------------------------

    def replace(self, found: dict[str, list[Pair]]) -> tuple[int, int, list[Group]]:
        """Each checked product's pairs become exactly ``found[product]`` (empty: it has none, or
        it was deleted), in one atomic script. Returns (pairs added, pairs dropped, new groups).

        A new group is announced once: a connected component of the pairs this call added none
        of whose members was paired before the call, with all its members. A pair that joins a
        product to an existing group, or merges groups, updates that group: it is not new. The
        script reads "paired before" and writes the links in one step, so two detectors adding
        pairs of the same products at once cannot both call one group new.
        """
        if not found:
            return 0, 0, []
        args: list[str] = [self.links_prefix]
        by_key: dict[str, Pair] = {}
        for pid, pairs in found.items():
            args += [pid, str(len(pairs))]
            for p in pairs:
                args += [p.other(pid), p.key, p.to_json()]
                by_key[p.key] = p
        added, dropped, fresh_keys, paired = self._replace(keys=[self.pairs_key], args=args)
        old = {_text(p) for p in paired}
        fresh = [by_key[_text(k)] for k in fresh_keys]
        from cardigan.duplicates.groups import groups  # groups.py imports Pair from here

        new = [g for g in groups(fresh) if not old.intersection(g.members)]
        return int(added), int(dropped), new

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

    def groups(self, *, min_score: float = -1.0) -> list[Group]:
        """Every recorded group (all pairs read: the pair store is small next to the index)."""
        from cardigan.duplicates.groups import groups

        return groups(self.all_pairs(), min_score=min_score)

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
        keys = [self.pairs_key, self.pending_key, self.since_key, self.version_key, self.lag_key, self.counts_key]
        for k in self.r.scan_iter(match=DUP_LINKS_KEY.format(alias=self.alias, product_id="*"), count=1000):
            keys.append(k.decode() if isinstance(k, bytes) else k)
        self.r.delete(*keys)


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
