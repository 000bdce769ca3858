"""The reaper's grace after a broker outage: live peers are not taken for dead.

When the supervisor itself could not reach the broker for longer than a heartbeat lives, every
peer's heartbeat lapsed too; it must wait one TTL before restoring anything. Driven against the
test stack's real Valkey, with a channel stand-in that only names the unacked hash (no message is
held, so the restore only forgets the dead owner: what is observed here).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from cardigan.store.guard import make_redis
from devkit.stack import StackInfo
from workers.redelivery import OWNERS_KEY, Supervisor, alive_key, held_key


@pytest.fixture
def client(stack: StackInfo) -> Any:
    r = make_redis(stack.broker_url.rsplit("/", 1)[0] + "/13")
    r.flushdb()
    yield r
    r.flushdb()


def _supervisor(client: Any, ttl_s: float) -> Supervisor:
    sup = Supervisor(ttl_s)  # not started: the test calls tick() itself
    sup._client = client
    sup._owners["me"] = SimpleNamespace(closed=False, unacked_key="unacked")  # type: ignore[assignment]
    return sup


def _dead_peer(client: Any) -> None:
    client.sadd(OWNERS_KEY, "peer")
    client.sadd(held_key("peer"), "tag-1")  # its heartbeat key is absent: it looks dead


def test_a_dead_owner_is_reaped_at_once_in_normal_operation(client: Any) -> None:
    sup = _supervisor(client, ttl_s=1.0)
    sup.tick()
    _dead_peer(client)
    sup.tick()
    assert not client.sismember(OWNERS_KEY, "peer")


def test_after_an_outage_longer_than_the_ttl_restores_wait_one_ttl(client: Any) -> None:
    sup = _supervisor(client, ttl_s=1.0)
    sup.tick()
    _dead_peer(client)
    sup._last_beat -= 5.0  # as if the last round that reached the broker was 5 s ago
    sup.tick()
    assert client.sismember(OWNERS_KEY, "peer"), "reaped a peer whose heartbeat lapsed only because of the outage"
    assert client.exists(alive_key("me")), "our own heartbeat goes out first"
    for _ in range(4):  # rounds every TTL/4, as the supervisor's thread runs them
        time.sleep(0.3)
        sup.tick()
    assert not client.sismember(OWNERS_KEY, "peer"), "a peer still dead after the grace must be reaped"
