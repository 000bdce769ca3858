"""A SIGKILLed worker's messages come back in seconds on the Redis broker, with the default
visibility timeout (1 h): its heartbeat stops and a live peer restores what it held
(workers/redelivery.py). Then every event still ends in the index, exactly once in effect.
"""

from __future__ import annotations

import socket
import time

import pytest

from cardigan.ops.verify import Expected, verify_index
from tests.harness import Namespace, wait_until
from tests.test_index_e2e import add
from workers import redelivery

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

N_EVENTS = 240
REDELIVERY_S = 30  # the promise: a killed worker's messages are back within this


def _owners_of(ns: Namespace, pid: int) -> list[str]:
    prefix = f"{socket.gethostname()}:{pid}:"
    return [o for o in ns.state().smembers(redelivery.OWNERS_KEY) if o.startswith(prefix)]


def _held(ns: Namespace, owners: list[str]) -> set[str]:
    return {t for o in owners for t in ns.state().smembers(redelivery.held_key(o))}


def _diagnosis(ns: Namespace, missing: list[str]) -> str:
    """What happened to the products that did not converge: dead letters, versions, logs."""
    r = ns.state()
    lines = [f"queue {ns.queue_depth()}, unacked {ns.unacked()}, owners {sorted(r.smembers(redelivery.OWNERS_KEY))}"]
    lines += [f"dead letter {d.product_id}: {d.kind}: {d.reason} (attempts {d.attempts})" for d in ns.dead().list()]
    ver_key = f"cardigan:ver:{ns.index().live_collection()}"
    for pid in missing[:10]:
        lines.append(f"{pid}: version record {r.hget(ver_key, pid)!r}")
        for w in ns.workers:
            lines += [f"  {w.name}: {line}" for line in w.log_text().splitlines() if f"'{pid}'" in line or f'"{pid}"' in line][-6:]
    return "\n".join(lines)


def test_e2e_sigkill_messages_back_within_30s_with_default_visibility(ns: Namespace) -> None:
    s = ns.set_env(CARDIGAN_BROKER_VISIBILITY_TIMEOUT_S="3600")  # the default: kombu alone waits 1 h
    assert s.broker_visibility_timeout_s == 3600
    events = [add(ns, f"rd-{i}", 1, 1) for i in range(N_EVENTS)]
    expected: dict[str, Expected | None] = {f"rd-{i}": Expected(1, 1) for i in range(N_EVENTS)}
    ns.start_worker()
    victim = ns.start_worker()
    ns.publish(events)

    # SIGKILL the victim while it holds messages (prefetched and in flight) and work is left
    def holding() -> bool:
        return len(_held(ns, _owners_of(ns, victim.proc.pid))) >= 4

    wait_until(holding, 120, "the victim to hold messages", interval=0.05)
    victim.kill()
    killed_at = time.monotonic()
    victim.proc.wait(10)
    owners = _owners_of(ns, victim.proc.pid)
    held = _held(ns, owners)
    assert held, "the victim held nothing when killed"
    r = ns.state()

    def back() -> bool:
        """Each message the victim held is done, in a queue, or held by a live owner."""
        for tag in held:
            if not r.hexists("unacked", tag):
                continue  # acked (done) or back in its queue
            owner = r.hget(redelivery.OWNER_OF_KEY, tag)
            if owner is None or owner in owners or not r.exists(redelivery.alive_key(owner)):
                return False
        return True

    try:
        wait_until(back, REDELIVERY_S, f"the {len(held)} messages the killed worker held to come back", interval=0.2)
    except TimeoutError:
        stuck = [t for t in held if r.hexists("unacked", t)]
        pytest.fail(f"{len(stuck)} of {len(held)} messages still unacked {REDELIVERY_S}s after the kill\n" + _diagnosis(ns, []))
    print(f"{len(held)} messages held by the killed worker were back {time.monotonic() - killed_at:.1f}s after SIGKILL")

    ns.start_worker()  # the replacement
    index = ns.index()
    last = None

    def converged() -> bool:
        nonlocal last
        if not ns.drained():
            return False
        last = verify_index(index, expected, max_images=ns.settings.limits.max_images)
        return last.ok

    try:
        wait_until(converged, 300, "the index to converge", interval=1)
    except TimeoutError:
        missing = [m.split(":", 1)[0] for m in (last.mismatches if last else [])]
        detail = "\n".join(last.mismatches[:15]) if last else "queues never drained"
        pytest.fail(f"no convergence:\n{detail}\n{_diagnosis(ns, missing)}")
    dead = ns.dead().list()
    assert not dead, [(d.product_id, d.kind, d.reason) for d in dead]
    assert not r.smembers(redelivery.OWNERS_KEY) & set(owners), "the dead owner was never forgotten"
