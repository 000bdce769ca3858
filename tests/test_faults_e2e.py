"""Faults production brings, injected for real: killed workers, a stopped Milvus, S3 gone, broker restart.

After each, the index must equal the state the events imply, and nothing may be lost.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from cardigan.ops.verify import Expected, verify_index
from devkit.stack import Stack
from tests.harness import Namespace, TcpProxy, new_namespace, wait_until
from tests.test_index_e2e import add, delete

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

# short visibility timeout so a killed worker's messages come back within the test;
# retries patient enough to outlast a 20 s outage
FAULT_ENV = {
    "CARDIGAN_BROKER_VISIBILITY_TIMEOUT_S": "10",
    "CARDIGAN_WORKER__MAX_RETRIES": "40",
    "CARDIGAN_WORKER__RETRY_BACKOFF_S": "0.5",
    "CARDIGAN_WORKER__RETRY_BACKOFF_MAX_S": "4",
    "CARDIGAN_WORKER__MAX_DELIVERIES": "20",  # kills here are ours, not poison
}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of this module's own: these tests stop and start its servers."""
    st = Stack(tmp_path_factory.mktemp("fault-stack"))
    with st.running():
        yield st


@pytest.fixture
def fns(own_stack: Stack, tmp_path) -> Iterator[Namespace]:
    ns = new_namespace(own_stack.info().env(), tmp_path, **FAULT_ENV)
    try:
        yield ns
    finally:
        ns.stop_workers()


def scenario(ns: Namespace, n_products: int, seed: int) -> tuple[list[dict], dict[str, Expected | None]]:
    """Adds, modifies, deletes, duplicates and stale replays, shuffled; and the final state."""
    rng = random.Random(seed)
    events: list[dict] = []
    expected: dict[str, Expected | None] = {}
    for p in range(n_products):
        pid = f"f{seed}-{p}"
        evs = [add(ns, pid, 1, 1 + p % 2)]
        final: Expected | None = Expected(1, 1 + p % 2)
        if p % 3 == 0:
            evs.append(add(ns, pid, 2, 1 + (p + 1) % 3, kind="modify"))
            final = Expected(2, 1 + (p + 1) % 3)
        if p % 5 == 0:
            evs.append(delete(pid, 3))
            final = None
        evs += rng.sample(evs, k=min(len(evs), 1 + p % 2))  # duplicates
        events += evs
        expected[pid] = final
    rng.shuffle(events)  # out of order
    return events, expected


def converge(ns: Namespace, expected: dict[str, Expected | None], timeout: float) -> None:
    index = ns.index()
    last = None

    def ok() -> bool:
        nonlocal last
        if not ns.drained():
            return False
        last = verify_index(index, expected, max_images=8)
        return last.ok

    try:
        wait_until(ok, timeout, "the index to converge", interval=1)
    except TimeoutError:
        detail = "\n".join(last.mismatches[:15]) if last else f"queue {ns.queue_depth()}, unacked {ns.unacked()}"
        pytest.fail(f"no convergence:\n{detail}")


def test_e2e_worker_sigkill_mid_batch_repeatedly(fns: Namespace) -> None:
    """SIGKILL a worker several times during >= 1,000 events; the index still ends exact."""
    events, expected = scenario(fns, 420, seed=1)
    assert len(events) >= 1000
    fns.start_worker()
    victim = fns.start_worker()
    fns.publish(events)
    kills = 0
    for left in (0.85, 0.6, 0.35):  # kill as the backlog shrinks past these fractions
        wait_until(lambda left=left: fns.queue_depth() <= left * len(events), 120, f"backlog under {left:.0%}", interval=0.05)
        victim.kill()  # SIGKILL, mid-batch: its prefetched and in-flight events are unacked
        kills += 1
        victim = fns.start_worker()
    assert kills == 3
    converge(fns, expected, 240)
    assert fns.dead().count() == 0, [d.reason for d in fns.dead().list()]


def test_e2e_milvus_down_20s(fns: Namespace, own_stack: Stack) -> None:
    events, expected = scenario(fns, 60, seed=2)
    fns.start_worker()
    fns.publish(events[: len(events) // 3])
    own_stack.stop_service("milvus")
    fns.publish(events[len(events) // 3 :])  # they arrive while Milvus is down
    time.sleep(20)
    own_stack.start_service("milvus")
    converge(fns, expected, 180)
    assert fns.dead().count() == 0, [d.reason for d in fns.dead().list()]
    assert "retry" in fns.workers[0].log_text().lower()


def test_e2e_s3_unreachable_then_back_and_missing_object_dead(own_stack: Stack, tmp_path) -> None:
    """S3 unreachable (the network to it cut) for a while: retried, then converges."""
    from urllib.parse import urlsplit

    proxy = TcpProxy(urlsplit(own_stack.info().s3_endpoint_url or "").port or 0).start()
    ns = new_namespace(own_stack.info().env(), tmp_path, **FAULT_ENV)
    try:
        events, expected = scenario(ns, 40, seed=3)  # uploaded directly, not through the proxy
        missing = {"type": "add", "product_id": "s3-missing", "version": 1, "images": [{"uri": f"s3://{ns.settings.bucket}/no/such.jpg"}]}
        expected["s3-missing"] = None
        ns.start_worker(extra_env={"CARDIGAN_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
        proxy.cut()
        ns.publish([*events, missing])
        time.sleep(8)
        proxy.start()
        converge(ns, expected, 180)
        dead = ns.dead().list()
        assert [d.product_id for d in dead] == ["s3-missing"]
        assert dead[0].kind == "missing_image" and dead[0].attempts >= 1
        assert "S3 unreachable" in ns.workers[0].log_text()
    finally:
        ns.stop_workers()
        proxy.cut()


def test_e2e_broker_restart_with_aof(fns: Namespace, own_stack: Stack) -> None:
    """Valkey (broker and state) restarts mid-run: AOF keeps the queue; workers reconnect."""
    events, expected = scenario(fns, 80, seed=4)
    fns.start_worker()
    fns.publish(events)
    time.sleep(3)  # AOF fsyncs every second: what was published before this is on disk
    own_stack.stop_service("valkey")
    time.sleep(3)
    own_stack.start_service("valkey")
    converge(fns, expected, 240)
    assert all(w.alive() for w in fns.workers)


def test_e2e_publish_during_broker_restart(fns: Namespace, own_stack: Stack) -> None:
    """A publisher that runs through a broker restart retries its sends; nothing is lost."""
    events, expected = scenario(fns, 30, seed=5)
    fns.start_worker()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for e in events:
                fns.publish([e])
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.3)
    own_stack.stop_service("valkey")
    time.sleep(2)
    own_stack.start_service("valkey")
    t.join(120)
    assert not errors, errors
    converge(fns, expected, 240)
