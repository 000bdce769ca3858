"""A crashed worker's messages come back in seconds on Redis, not after the visibility timeout.

kombu's Redis transport keeps a consumed message in its ``unacked`` hash (and ``unacked_index``
zset) until it is acked, and gives it back only after ``visibility_timeout`` (1 h by default):
it cannot tell a dead consumer from a slow one. Here every consuming channel is an *owner* with
a heartbeat key in the broker's Redis, and records the delivery tags it holds. A supervisor
thread in every worker process keeps its owners' heartbeats alive and restores the messages of
owners whose heartbeat expired (a SIGKILL, an OOM kill, a lost machine) at once.

Why no message is lost or restored twice:

- Taking a message is one Lua script: pop it from the queue *and* record it as unacked and owned,
  atomically. kombu's BRPOP pops first and records later, from Python; a worker killed in between
  loses that message for good (no copy is left anywhere).
- Ack, reject and restore are compare-and-set scripts: an ack removes the unacked entry only if
  the tag is still owned by the acking channel (a message restored from a slow owner and taken by
  a peer is not un-registered by the slow owner's late ack); a restore moves the entry back to its
  queue only if the entry and its owner are exactly what the restorer read, and (when reaping) the
  owner is still dead. So a message is in the queue or in ``unacked``, never both, never neither.
- A live owner whose heartbeat lapsed (a stalled process) loses its messages to the queue: they run
  twice, which the version guard makes harmless; its late acks do nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

PREFIX = "cardigan:redelivery"
OWNERS_KEY = f"{PREFIX}:owners"  # every owner that may hold messages
OWNER_OF_KEY = f"{PREFIX}:owner_of"  # delivery tag -> owner
DEFAULT_OWNER_TTL_S = 10.0
MAX_RAW_REPR = 4096  # characters of an undecodable list item kept in its dead letter

# KEYS: queue keys (n of them), unacked, unacked_index, owner_of, held, owners
# ARGV: n, owner, now
_TAKE = """
local n = tonumber(ARGV[1])
local unacked, index, owner_of, held, owners = KEYS[n+1], KEYS[n+2], KEYS[n+3], KEYS[n+4], KEYS[n+5]
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, msg = pcall(cjson.decode, item)
    local tag, ex, rk
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      local p = msg['properties']
      tag = p['delivery_tag']
      if type(p['delivery_info']) == 'table' then
        ex, rk = p['delivery_info']['exchange'], p['delivery_info']['routing_key']
      end
    end
    if type(tag) == 'string' and type(ex) == 'string' and type(rk) == 'string' then
      redis.call('HSET', unacked, tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', index, ARGV[3], tag)
      redis.call('HSET', owner_of, tag, ARGV[2])
      redis.call('SADD', held, tag)
      redis.call('SADD', owners, ARGV[2])
      return {KEYS[i], item, tag}
    end
    return {KEYS[i], item, ''}
  end
end
return false
"""

# KEYS: unacked, unacked_index, owner_of, held;  ARGV: tag, owner
_ACK = """
redis.call('SREM', KEYS[4], ARGV[1])
local o = redis.call('HGET', KEYS[3], ARGV[1])
if o == false or o == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  return 1
end
return 0
"""

# KEYS: unacked, unacked_index, owner_of, held (of the owner read), alive (of it), queue keys…
# ARGV: tag, entry read, owner read ('' = none), leftmost '1'/'0', payload, require_dead '1'/'0'
_RESTORE = """
local tag = ARGV[1]
local entry = redis.call('HGET', KEYS[1], tag)
local o = redis.call('HGET', KEYS[3], tag)
if entry == false then
  if o == false then redis.call('SREM', KEYS[4], tag) end
  return -1
end
if entry ~= ARGV[2] or (o or '') ~= ARGV[3] then return -2 end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then return -3 end
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('HDEL', KEYS[3], tag)
redis.call('SREM', KEYS[4], tag)
for i = 6, #KEYS do
  if ARGV[4] == '1' then redis.call('LPUSH', KEYS[i], ARGV[5]) else redis.call('RPUSH', KEYS[i], ARGV[5]) end
end
return 1
"""

# KEYS: owners, held, alive;  ARGV: owner.  Forget a dead owner that holds nothing.
_FORGET = """
if redis.call('EXISTS', KEYS[3]) == 0 and redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


def held_key(owner: str) -> str:
    return f"{PREFIX}:held:{owner}"


def alive_key(owner: str) -> str:
    return f"{PREFIX}:alive:{owner}"


def restore_tag(
    channel: Channel, client: redis.Redis, tag: str, *, owner: str | None, leftmost: bool = False, require_dead: bool = False
) -> bool:
    """Put one unacked message back on its queue; True when this call moved it.

    ``owner``: only if this owner holds it (None: whoever does, kombu's visibility restore).
    ``require_dead``: only while the owner's heartbeat is absent (the reaper).
    """
    for _ in range(5):  # the entry or its owner changed between the read and the script: read again
        pipe = client.pipeline(transaction=False)
        pipe.hget(channel.unacked_key, tag)
        pipe.hget(OWNER_OF_KEY, tag)
        entry, current = pipe.execute()
        current = bytes_to_str(current) if current is not None else ""
        if entry is None:
            if owner is not None:
                client.srem(held_key(owner), tag)
            return False
        if owner is not None and current and current != owner:
            client.srem(held_key(owner), tag)  # restored earlier, now someone else's
            return False
        payload, exchange, routing_key = loads(bytes_to_str(entry))
        try:
            payload["headers"]["redelivered"] = True
            payload["properties"]["delivery_info"]["redelivered"] = True
        except (KeyError, TypeError):
            pass
        pri = channel._get_message_priority(payload, reverse=False)
        dests = [channel._q_for_pri(q, pri) for q in channel._lookup(exchange, routing_key)]
        held_of = held_key(current or owner or "-")
        keys = [channel.unacked_key, channel.unacked_index_key, OWNER_OF_KEY, held_of, alive_key(current or "-"), *dests]
        args = [tag, entry, current, "1" if leftmost else "0", dumps(payload), "1" if require_dead else "0"]
        res = int(client.eval(_RESTORE, len(keys), *keys, *args))
        if res == 1:
            log.info("message %s restored to %s (held by %s)", tag, dests, current or "nobody")
            return True
        if res in (-1, -3):
            return False
    log.warning("message %s changed hands repeatedly while being restored; left to the next round", tag)
    return False


class Supervisor(threading.Thread):
    """One per worker process: heartbeats for this process's owners, restores for dead ones."""

    _instance: Supervisor | None = None
    _instance_lock = threading.Lock()

    def __init__(self, ttl_s: float) -> None:
        super().__init__(name="redelivery", daemon=True)
        self.ttl_s = ttl_s
        self.pid = os.getpid()
        self._owners: dict[str, Channel] = {}
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._wake = threading.Event()
        self._last_beat = 0.0  # monotonic time of the last heartbeat round that reached the broker
        self._reap_from = 0.0  # no restores before this (monotonic): the grace after an outage

    @classmethod
    def get(cls, ttl_s: float) -> Supervisor:
        with cls._instance_lock:
            if cls._instance is None or cls._instance.pid != os.getpid():  # not inherited across fork
                cls._instance = cls(ttl_s)
                cls._instance.start()
            return cls._instance

    def register(self, owner: str, channel: Channel) -> None:
        with self._lock:
            self._owners[owner] = channel
            if self._client is None:
                # a pool of its own, with timeouts shorter than the heartbeat's TTL
                timeout = min(5.0, self.ttl_s / 2)
                params = {**channel._connparams(), "socket_timeout": timeout, "socket_connect_timeout": timeout}
                self._client = redis.Redis(connection_pool=redis.ConnectionPool(**params))
        self._beat(owner)

    def unregister(self, owner: str) -> None:
        """A closed channel: its heartbeat stops now, so whatever it still holds is restored."""
        with self._lock:
            self._owners.pop(owner, None)
            client = self._client
        if client is not None:
            try:
                client.delete(alive_key(owner))
            except redis.RedisError:
                pass  # it expires after the TTL
        self._wake.set()

    def _beat(self, owner: str) -> None:
        if self._client is not None:
            self._client.set(alive_key(owner), "1", px=int(self.ttl_s * 1000))

    def run(self) -> None:
        interval = max(0.5, self.ttl_s / 4)
        while True:
            self._wake.wait(interval)
            self._wake.clear()
            try:
                self.tick()
            except redis.RedisError as e:
                log.debug("redelivery round skipped: %s", e)
            except Exception:  # noqa: BLE001 - the thread must survive anything
                log.exception("redelivery round failed")

    def tick(self) -> int:
        """Heartbeat this process's owners, then restore what dead owners hold; returns how many."""
        with self._lock:
            mine = dict(self._owners)
            client = self._client
        for owner, ch in list(mine.items()):
            if ch.closed or getattr(ch, "_closing", False):  # a close that failed half-way
                self.unregister(owner)
                del mine[owner]
        if client is None or not mine:
            return 0
        pipe = client.pipeline(transaction=False)
        for owner in mine:
            pipe.set(alive_key(owner), "1", px=int(self.ttl_s * 1000))
        pipe.execute()
        now = time.monotonic()
        if self._last_beat and now - self._last_beat > self.ttl_s:
            # We could not reach the broker for longer than a heartbeat lives, so neither could our
            # peers: every heartbeat has lapsed, live or not. Give them one TTL to beat again before
            # anything is restored, or a short broker outage would rerun the whole fleet's work.
            self._reap_from = now + self.ttl_s
            log.warning(
                "broker reachable again after %.0f s; restores of others' messages wait %.0f s for their heartbeats",
                now - self._last_beat,
                self.ttl_s,
            )
        self._last_beat = now
        if now < self._reap_from:
            return 0
        channel = next(reversed(mine.values()))  # any live channel can route a restore
        restored = 0
        for raw in client.smembers(OWNERS_KEY):
            owner = bytes_to_str(raw)
            if owner in mine or client.exists(alive_key(owner)):
                continue
            tags = [bytes_to_str(t) for t in client.smembers(held_key(owner))]
            n = sum(restore_tag(channel, client, t, owner=owner, require_dead=True) for t in tags)
            if n:
                log.warning("restored %d message(s) held by %s, whose heartbeat stopped", n, owner)
            restored += n
            client.eval(_FORGET, 3, OWNERS_KEY, held_key(owner), alive_key(owner), owner)
        return restored


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, with owned delivery tags and compare-and-set ack/restore."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken: set[str] = set()  # registered by the take script already

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self._taken:
            self._taken.discard(delivery_tag)
        else:  # basic_get, or a message the take script could not parse
            owner = self.channel.owner
            delivery = message.delivery_info
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
                pipe.hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"], delivery["routing_key"]]))
                pipe.hset(OWNER_OF_KEY, delivery_tag, owner)
                pipe.sadd(held_key(owner), delivery_tag)
                pipe.sadd(OWNERS_KEY, owner)
                pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove(self, delivery_tag: str) -> None:
        owner = self.channel.owner
        keys = [self.unacked_key, self.unacked_index_key, OWNER_OF_KEY, held_key(owner)]
        with self.channel.conn_or_acquire() as client:
            client.eval(_ACK, len(keys), *keys, delivery_tag, owner)

    def ack(self, delivery_tag: str) -> None:
        self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            with self.channel.conn_or_acquire() as client:
                restore_tag(self.channel, client, delivery_tag, owner=self.channel.owner, leftmost=True)
        else:
            self._remove(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        with self.channel.conn_or_acquire(client) as client:
            for tag in self._delivered:
                restore_tag(self.channel, client, tag, owner=self.channel.owner)
        self._delivered.clear()

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """kombu's visibility-timeout restore (any owner): compare-and-set like ours."""
        with self.channel.conn_or_acquire(client) as client:
            restore_tag(self.channel, client, bytes_to_str(tag), owner=None, leftmost=leftmost)


class Channel(kombu_redis.Channel):
    """Takes messages with one script (pop + unacked + owner), blocks without popping when idle."""

    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner: str | None = None
        self._idle = False  # the last take found nothing: wait for a message before the next
        self._pending: str | None = None
        opts = self.connection.client.transport_options
        self._owner_ttl_s = float(opts.get("cardigan_owner_ttl_s", DEFAULT_OWNER_TTL_S))

    @property
    def owner(self) -> str:
        """This channel's owner id, registered (with a heartbeat) on first use."""
        if self._owner is None:
            owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            Supervisor.get(self._owner_ttl_s).register(owner, self)
            self._owner = owner
        return self._owner

    def _brpop_start(self, timeout: float | None = None) -> None:
        if self.global_keyprefix:  # key names would differ from the scripts': kombu's own path
            return super()._brpop_start(timeout)
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        owner = self.owner
        conn = self.client.connection
        self._in_poll = conn
        self._brpop_sent_at = time.monotonic()
        if self._idle:
            # Block until the primary queue (the first one consumed: the live events queue in
            # `cardigan worker` and the tests) has a message, without taking it (a same-list move
            # from the right end to the right end changes nothing); the next take gets it. One
            # key only (BLMOVE watches one list): the other queues (bulk) are taken from when the
            # wait times out, within `timeout` (1 s). Rotating the watched queue instead left an
            # idle worker deaf to live events for a second while it watched the bulk queue.
            primary = self._q_for_pri(self._active_queues[0], 0) if self._active_queues else keys[0]
            self._pending = "wait"
            conn.send_command("BLMOVE", primary, primary, "RIGHT", "RIGHT", timeout or 1)
        else:
            self._pending = "take"
            fixed = [self.unacked_key, self.unacked_index_key, OWNER_OF_KEY, held_key(owner), OWNERS_KEY]
            conn.send_command("EVAL", _TAKE, len(keys) + len(fixed), *keys, *fixed, len(keys), owner, time.time())

    def _brpop_read(self, **options: Any) -> bool:
        if self.global_keyprefix:
            return bool(super()._brpop_read(**options))
        pending, self._pending = self._pending, None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if pending != "take":
                self._idle = False
                raise Empty()
            if not reply:
                self._idle = True
                raise Empty()
            self._idle = False
            key, item, tag = (bytes_to_str(x) for x in reply)
            dest = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            if not tag:  # not a kombu envelope: kombu would raise in the event loop, the item lost
                self._dead_letter_raw(key, dest, item)
                raise Empty()
            self.qos._taken.add(tag)
            self.connection._deliver(loads(item), dest)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _dead_letter_raw(self, key: str, queue: str, item: str) -> None:
        """A list item that is not a kombu message (not JSON, or no delivery tag, exchange and
        routing key in its properties) becomes a dead letter; if that cannot be stored, it goes
        back on its queue, so it is never dropped."""
        from workers import runtime  # the worker's state store client (lazy, after fork)

        shown = repr(item[:MAX_RAW_REPR]) + ("…" if len(item) > MAX_RAW_REPR else "")
        reason = (
            f"not a Celery/kombu message on queue {queue!r}: the list item must be a JSON envelope with "
            "properties.delivery_tag, properties.delivery_info.exchange and .routing_key (docs/message-format.md)"
        )
        try:
            dl = runtime.dead_letters().add(reason=reason, kind="undecodable", event=shown, field="envelope", queue=queue)
        except Exception as exc:  # noqa: BLE001 - never drop it: put it back for a later try
            log.error("could not store a dead letter for a raw item on %s (%s); put back on the queue", queue, exc)
            self.client.lpush(key, item)
            time.sleep(1)  # the state store is down: do not spin on the same item
            return
        log.warning("dead letter %s (undecodable): a raw item on %s that is not a kombu message", dl.id, queue)

    def close(self) -> None:
        owner = self._owner
        try:
            super().close()
        finally:
            if owner is not None:
                Supervisor.get(self._owner_ttl_s).unregister(owner)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with owned deliveries (see the module docstring)."""

    Channel = Channel


def install(connection: Any) -> Any:
    """Use this transport for a Redis broker connection (before it connects); others unchanged."""
    if connection.transport_cls in ("redis", "rediss") and not connection.transport_options.get("global_keyprefix"):
        connection.transport_cls = Transport
    return connection
