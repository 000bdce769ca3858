"""Fencing: a writer whose lock expired under a slow Milvus cannot leave the index wrong.

Worker A talks to Milvus through a TCP proxy that holds every byte for longer than the lock TTL:
its lock expires while its write is in flight, worker B (direct to Milvus) writes newer versions
of the same products, and then A's old write lands on top of them. A's record is refused (lock
lost) and A repairs under a fresh lock, so the index ends in the newest state: a deleted product
is not resurrected and a modified one is not rolled back.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from cardigan.ops.publish import Publisher
from cardigan.ops.verify import Expected, verify_index
from tests.harness import Namespace, settings_from, wait_until
from tests.test_index_e2e import add, delete

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

LOCK_TTL_MS = 2000
DELAY_S = 5.0  # requests only: past the lock TTL, well inside the Milvus call timeout (20 s)


class DelayProxy:
    """A loopback TCP relay that delivers each request chunk ``delay_s`` after it arrived (in order)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.upstream_bytes = 0  # bytes sent towards the server while delayed
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []

    def start(self) -> DelayProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def close(self) -> None:
        for s in [self._listener, *self._socks]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._socks += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                q: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(a, q, up), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes]], up: bool) -> None:
        try:
            while data := src.recv(65536):
                delay = self.delay_s if up else 0.0
                if delay:
                    self.upstream_bytes += len(data)
                q.put((time.monotonic() + delay, data))
        except OSError:
            pass
        q.put((0.0, b""))

    @staticmethod
    def _write(dst: socket.socket, q: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while True:
                due, data = q.get()
                if not data:
                    break
                time.sleep(max(0.0, due - time.monotonic()))
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def proxy(ns: Namespace) -> Iterator[DelayProxy]:
    p = DelayProxy(urlsplit(ns.settings.milvus_uri).port or 0).start()
    yield p
    p.close()


def test_e2e_slow_milvus_past_the_lock_ttl_leaves_the_index_right(ns: Namespace, proxy: DelayProxy) -> None:
    ns.set_env(CARDIGAN_WORKER__LOCK_TTL_MS=str(LOCK_TTL_MS))
    other_queue = ns.settings.queue + ".b"
    n = 6
    olds = [add(ns, f"fz-{i}", 1, 1) for i in range(n)]
    # B's newer versions: deletes for even products, 2-image modifies for odd ones
    news = [delete(f"fz-{i}", 2) if i % 2 == 0 else add(ns, f"fz-{i}", 2, 2, kind="modify") for i in range(n)]
    expected: dict[str, Expected | None] = {f"fz-{i}": None if i % 2 == 0 else Expected(2, 2) for i in range(n)}

    # A writes all its products in one batch (the whole batch outlives its locks)
    slow = {
        "CARDIGAN_MILVUS_URI": f"http://127.0.0.1:{proxy.port}",
        "CARDIGAN_WORKER__WRITE_BATCH_SIZE": str(n),
        "CARDIGAN_WORKER__WRITE_WAIT_MS": "60000",
    }
    a = ns.start_worker(extra_env=slow)
    own_queue = ns.settings.queue
    ns.set_env(CARDIGAN_QUEUE=other_queue)
    ns.start_worker()  # B: its own queue, Milvus direct
    ns.set_env(CARDIGAN_QUEUE=own_queue)

    try:
        _run(ns, proxy, a, olds, news, expected, other_queue)
    except (TimeoutError, AssertionError) as e:
        logs = "\n".join(
            f"--- {w.name}\n" + "\n".join(line for line in w.log_text().splitlines()[-60:] if "received" not in line) for w in ns.workers
        )
        pytest.fail(f"{e}\n{logs}")


def _run(
    ns: Namespace, proxy: DelayProxy, a: Any, olds: list[dict], news: list[dict], expected: dict[str, Expected | None], other_queue: str
) -> None:
    n = len(olds)
    r = ns.state()
    live = ns.index().live_collection()
    locks = [f"cardigan:lock:{live}:fz-{i}" for i in range(n)]
    versions_key = f"cardigan:ver:{live}"
    proxy.delay_s = DELAY_S
    ns.publish(olds)  # to A
    # A's write is in flight (through the proxy) and its locks have expired, nothing recorded
    wait_until(lambda: proxy.upstream_bytes > 2_000, 120, "A's upsert to enter the slow proxy", interval=0.05)
    wait_until(lambda: r.exists(*locks) == 0, 30, "A's locks to expire", interval=0.05)
    assert not any(r.hmget(versions_key, [f"fz-{i}" for i in range(n)])), "A recorded before its write landed"
    b_pub = Publisher(settings_from({**ns.env, "CARDIGAN_QUEUE": other_queue}))
    with b_pub.app.producer_or_acquire() as producer:
        for e in news:  # to B
            b_pub.publish(e, producer=producer)
    wait_until(
        lambda: all(
            v == "2:" + ("delete" if i % 2 == 0 else "upsert") for i, v in enumerate(r.hmget(versions_key, [f"fz-{i}" for i in range(n)]))
        ),
        60,
        "B to record the newer versions",
        interval=0.1,
    )
    b_done_at = time.monotonic()

    # A's old write lands after B's, A's record is refused and A repairs
    wait_until(lambda: "repaired" in a.log_text(), 240, "A to repair after its lock expired")
    proxy.delay_s = 0.0
    assert f"lock expired during the write of {n} product(s)" in a.log_text()
    assert f"repaired {n} product(s)" in a.log_text()  # deletes and modifies of the other writer
    index = ns.index()
    last: Any = None

    def right() -> bool:
        nonlocal last
        if not ns.drained() or r.llen(other_queue):
            return False
        last = verify_index(index, expected, max_images=8)
        return last.ok

    try:
        wait_until(right, 120, "the index to hold the newest versions", interval=0.5)
    except TimeoutError as e:
        raise AssertionError(
            "index wrong after the slow write:\n" + "\n".join(last.mismatches if last else ["queues never drained"])
        ) from e
    assert r.hmget(versions_key, [f"fz-{i}" for i in range(n)]) == ["2:" + ("delete" if i % 2 == 0 else "upsert") for i in range(n)]
    assert ns.dead().count() == 0, [(d.product_id, d.reason) for d in ns.dead().list()]
    print(f"B recorded v2 {DELAY_S}s-proxy run; A repaired {time.monotonic() - b_done_at:.1f}s later")
