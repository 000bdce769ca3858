"""The version guard and the batch rules, against a real Valkey."""

from __future__ import annotations

import threading
import time

import pytest

from cardigan.errors import StateUnavailable
from cardigan.store.guard import VersionGuard, make_redis
from devkit.stack import StackInfo
from workers.writer import WriteOp, _newest


@pytest.fixture
def guard(stack: StackInfo) -> VersionGuard:
    r = make_redis(stack.broker_url.rsplit("/", 1)[0] + "/13")
    r.flushdb()
    return VersionGuard(r, lock_ttl_ms=2000)


def test_versions_and_tombstones_are_per_collection(guard: VersionGuard) -> None:
    assert guard.versions("c_v1", ["a", "b"]) == {"a": None, "b": None}
    guard.record("c_v1", {"a": (3, "upsert"), "b": (9, "delete")})
    assert guard.versions("c_v1", ["a", "b"]) == {"a": (3, "upsert"), "b": (9, "delete")}
    assert guard.versions("c_v2", ["a"]) == {"a": None}  # a reindex target starts empty
    assert guard.all_versions("c_v1") == {"a": (3, "upsert"), "b": (9, "delete")}


def test_lock_waits_for_the_holder_and_serialises(guard: VersionGuard) -> None:
    order: list[str] = []
    with guard.locked("c", ["p1", "p2"]):
        t = threading.Thread(target=lambda: _take(guard, order))
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]


def _take(guard: VersionGuard, order: list[str]) -> None:
    with guard.locked("c", ["p2", "p3"]):
        order.append("second")


def test_lock_gives_up_with_a_transient_error(guard: VersionGuard) -> None:
    with guard.locked("c", ["busy"]):
        with pytest.raises(StateUnavailable, match="busy"):
            with guard.locked("c", ["busy"], wait_s=0.2):
                pass


def test_a_dead_holders_lock_expires(guard: VersionGuard) -> None:
    cm = guard.locked("c", ["orphan"])
    cm.__enter__()  # never released, as if the process died
    t0 = time.monotonic()
    with guard.locked("c", ["orphan"], wait_s=5):
        pass
    assert 1.0 < time.monotonic() - t0 < 4.5  # waited for the 2 s TTL, no longer


def test_newest_in_a_batch_wins_and_delete_breaks_ties() -> None:
    ops = [
        WriteOp("a", 2, "upsert"),
        WriteOp("a", 5, "upsert"),
        WriteOp("a", 4, "delete"),
        WriteOp("b", 7, "upsert"),
        WriteOp("b", 7, "delete"),
    ]
    best = _newest(ops)
    assert (best["a"].version, best["a"].kind) == (5, "upsert")
    assert (best["b"].version, best["b"].kind) == (7, "delete")


def test_delete_keys_cover_what_a_product_can_own() -> None:
    up = WriteOp("p", 1, "upsert", rows=[{}, {}])
    assert up.delete_keys(4) == ["p#2", "p#3"]
    assert WriteOp("p", 2, "delete").delete_keys(3) == ["p#0", "p#1", "p#2"]


def test_record_is_fenced_by_the_lock_token_and_never_goes_down(guard: VersionGuard) -> None:
    with guard.locked("c", ["p"]) as held:
        assert guard.record("c", {"p": (5, "upsert")}, token=held.token) == set()
    assert guard.versions("c", ["p"]) == {"p": (5, "upsert")}
    with guard.locked("c", ["p"]) as held:
        assert guard.record("c", {"p": (4, "delete")}, token=held.token) == {"p"}  # older: refused
        assert guard.record("c", {"p": (6, "delete")}, token="someone-else") == {"p"}  # not our lock
    assert guard.record("c", {"p": (3, "upsert")}) == {"p"}  # no token: still never downwards
    assert guard.versions("c", ["p"]) == {"p": (5, "upsert")}


def test_an_expired_lock_cannot_record_or_renew_and_the_next_holder_sees_a_takeover(guard: VersionGuard) -> None:
    slow = guard.locked("c", ["q"])
    held = slow.__enter__()
    time.sleep(2.3)  # the 2 s TTL runs out under a slow write
    with guard.locked("c", ["q"], wait_s=1) as fresh:
        assert fresh.takeovers == {"q"}  # the first holder never finished
        assert guard.renew("c", held) == ["q"]
        assert guard.record("c", {"q": (1, "upsert")}, token=held.token) == {"q"}
        assert guard.record("c", {"q": (2, "delete")}, token=fresh.token) == set()
        assert guard.renew("c", fresh) == []
    slow.__exit__(None, None, None)
    assert guard.versions("c", ["q"]) == {"q": (2, "delete")}
    with guard.locked("c", ["q"]) as again:
        assert again.takeovers == set()  # clean exits leave no marker


def test_journal_keeps_a_takeovers_rows(guard: VersionGuard) -> None:
    guard.journal("c", {"p": (7, [{"pk": "p#0", "version": 7}])})
    assert guard.journaled("c", "p") == (7, [{"pk": "p#0", "version": 7}])
    assert guard.journaled("c", "other") is None
