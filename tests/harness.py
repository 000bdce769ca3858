"""Test harness: real servers (from the stack), real worker processes, one namespace per test.

Each test gets its own Redis database (queues, guards, dead letters) and its own Milvus alias,
so tests share one set of servers without seeing each other's data.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardigan.imaging.fetch import make_s3_client
from cardigan.ops.publish import Publisher
from cardigan.poll import poll
from cardigan.store.deadletter import DeadLetters
from cardigan.store.guard import make_redis
from cardigan.store.index import Index
from config.settings import Settings, patched_env, settings_from_env
from workers.launch import celery_worker_argv

ROOT = Path(__file__).resolve().parent.parent

# small and fast: the point of these tests is the pipeline, not the model
TEST_ENV = {
    "CARDIGAN_ENCODER__BACKBONE": "mobilenet_v3_small",
    "CARDIGAN_ENCODER__WEIGHTS": "random",
    "CARDIGAN_ENCODER__IMAGE_SIZE": "64",
    "CARDIGAN_ENCODER__BATCH_WAIT_MS": "5",
    "CARDIGAN_WORKER__CONCURRENCY": "8",
    "CARDIGAN_WORKER__RETRY_BACKOFF_S": "0.2",
    "CARDIGAN_WORKER__RETRY_BACKOFF_MAX_S": "2",
    "CARDIGAN_WORKER__WRITE_WAIT_MS": "5",
    "CARDIGAN_BROKER_VISIBILITY_TIMEOUT_S": "30",
}

_db_counter = itertools.count(1)


settings_from = settings_from_env


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Namespace:
    """One test's corner of the shared servers, and the tools to drive it."""

    env: dict[str, str]
    tmp: Path
    workers: list[WorkerProc] = field(default_factory=list)
    _s3: Any = None
    _publisher: Publisher | None = None

    @functools.cached_property
    def settings(self) -> Settings:
        return settings_from(self.env)

    def set_env(self, **values: str) -> Settings:
        """Change this namespace's settings after creation (the cached Settings is rebuilt)."""
        self.env.update(values)
        self.__dict__.pop("settings", None)
        return self.settings

    @functools.cached_property
    def _state(self) -> Any:
        return make_redis(self.settings.effective_state_url)

    def state(self) -> Any:
        """The namespace's Redis (one pooled client; it reconnects after a server restart)."""
        return self._state

    def index(self) -> Index:
        return Index.from_settings(self.settings)

    def s3(self) -> Any:
        """One client per namespace: building a boto3 client costs ~0.1 s of CPU."""
        if self._s3 is None:
            with patched_env(self.env):
                self._s3 = make_s3_client(self.settings.s3_endpoint_url, self.settings.s3_region)
        return self._s3

    def dead(self) -> DeadLetters:
        return DeadLetters(self.state())

    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings)
        return self._publisher

    def put_image(self, key: str, data: bytes) -> str:
        bucket = self.settings.bucket
        self.s3().put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def start_worker(self, *, concurrency: int | None = None, extra_env: Mapping[str, str] | None = None, wait: bool = True) -> WorkerProc:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:6]}"
        log = self.tmp / f"{name}.log"
        s = self.settings
        argv = celery_worker_argv(
            queues=[s.queue, s.bulk_queue], concurrency=concurrency or s.worker.concurrency,
            prefetch=s.worker.prefetch_multiplier, node=f"{name}@test",
        )  # fmt: skip
        env = {**os.environ, **self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        with log.open("ab") as f:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        w = WorkerProc(name, proc, log)
        self.workers.append(w)
        if wait:
            wait_until(lambda: f"{name}@test ready." in w.log_text() or not w.alive(), 120, f"worker {name} ready")
            assert w.alive(), f"worker {name} died at start:\n{w.log_text()[-3000:]}"
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()

    def publish(self, events: Iterable[dict[str, Any]]) -> list[str]:
        pub = self.publisher()
        with pub.app.producer_or_acquire() as producer:
            return [pub.publish(e, producer=producer) for e in events]

    def queue_depth(self) -> int:
        r = self.state()
        s = self.settings
        return int(r.llen(s.queue)) + int(r.llen(s.bulk_queue))

    def unacked(self) -> int:
        return int(self.state().hlen("unacked"))

    def drained(self) -> bool:
        """Nothing waiting, nothing held by a worker (Redis broker's own bookkeeping)."""
        r = self.state()
        return self.queue_depth() == 0 and int(r.hlen("unacked")) == 0 and int(r.zcard("unacked_index")) == 0


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    if not poll(pred, timeout, interval):
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def new_namespace(stack_env: Mapping[str, str], tmp: Path, **overrides: str) -> Namespace:
    db = next(_db_counter) % 15 + 1  # db 0 is left to interactive use
    broker = stack_env["CARDIGAN_BROKER_URL"].rsplit("/", 1)[0] + f"/{db}"
    tag = uuid.uuid4().hex[:8]
    env = {
        **stack_env,
        **TEST_ENV,
        "CARDIGAN_BROKER_URL": broker,
        "CARDIGAN_COLLECTION": f"t_{tag}",
        "CARDIGAN_QUEUE": f"events.{tag}",
        "CARDIGAN_BULK_QUEUE": f"bulk.{tag}",
        **overrides,
    }
    ns = Namespace(env=env, tmp=tmp)
    ns.state().flushdb()
    return ns


class TcpProxy:
    """A loopback TCP relay that can be cut and restored: a network outage to a live server.

    Stopping moto itself would lose its objects; this makes S3 unreachable while the data stays.
    """

    def __init__(self, target_port: int) -> None:
        import socket

        self._socket = socket
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: Any = None
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for c in self._conns:
                try:
                    c.close()
                except OSError:
                    pass
            self._conns.clear()

    def _accept(self, listener: Any) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
