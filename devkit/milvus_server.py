"""A real Milvus server on one machine: the standalone C++ server from the ``milvus`` wheel.

Milvus Lite (the stack's default) is Python over faiss, and it hides what a real server does:
its range search is a post-filter of a top-k search, it has no segments to seal, no auth, and its
search costs what Python costs. The ``milvus`` wheel (2.3.5, its last release) carries the
standalone server binary with embedded etcd, rocksmq and local storage: the server docker-compose
runs, without the containers. ``cardigan stack up --milvus server``, ``cardigan bench --milvus
server`` and the tests' real-server matrix (tests/conftest.py) run it.

Its gRPC servers listen on every interface (2.3 has no listen address), so the stack turns on
Milvus authentication with a generated root password (``run/milvus.secret``) for the port clients
use; the coordinators' internal ports have no auth in any Milvus 2.3, so this is for a test
machine or a laptop behind a firewall, not for a shared network.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import lzma
import os
import shutil
import socket
from pathlib import Path
from types import ModuleType

from devkit.stack import StackError

VERSION = "2.3.5"
DEFAULT_ROOT_PASSWORD = "Milvus"  # what every Milvus starts with; the stack changes it at once


class MissingServer(StackError):
    """The ``milvus`` wheel is not installed (``cardigan stack up`` prints this and exits 1)."""


def _package() -> ModuleType:
    """The ``milvus`` wheel, or a MissingServer that says how to install it."""
    try:
        import milvus
    except ImportError as e:
        raise MissingServer(f"--milvus server needs the milvus wheel: pip install 'milvus=={VERSION}' (or use --milvus lite)") from e
    return milvus


def cache_dir() -> Path:
    """Per installed release: another wheel version unpacks beside, never over, this one."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cardigan" / f"milvus-server-{getattr(_package(), '__version__', VERSION)}"


def binaries() -> Path:
    """The server binary, unpacked once per host (250 MB from 57 MB of lzma; ~6 s) and reused.

    Unpacked into a temporary folder and renamed, under a lock: two test sessions or a stack and
    a bench starting together neither unpack twice nor run a half-written library.
    """
    cache = cache_dir()
    bin_dir = cache / "bin"
    stamp = bin_dir / ".complete"
    if stamp.exists():
        return bin_dir / "milvus"
    src = Path(_package().__file__ or "").parent / "data" / "bin"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.exists():
            tmp = cache / f"bin.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for packed in sorted(src.glob("*.lzma")):
                target = tmp / packed.name[: -len(".lzma")]
                with lzma.open(packed) as f_in, open(target, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out, 1 << 20)
                target.chmod(0o755)
            (tmp / ".complete").write_text(f"{sorted(p.name for p in tmp.iterdir())}\n")  # written last: the unpack finished
            shutil.rmtree(bin_dir, ignore_errors=True)
            tmp.rename(bin_dir)
    return bin_dir / "milvus"


def _free_ports(n: int, *, besides: int = 0) -> list[int]:
    """``n`` distinct free ports (all held open while chosen: one at a time, the kernel repeats itself)."""
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        while len(ports) < n:
            s = held.enter_context(contextlib.closing(socket.socket()))
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port != besides:
                ports.append(port)
        return ports


def prepare(base: Path, port: int, *, auth: bool = True) -> tuple[list[str], dict[str, str]]:
    """Write ``base/configs/milvus.yaml`` (every port free, client port ``port``); argv and env to run it.

    The wheel's own launcher picks ports by counting up from the defaults (2379, 19530, ...),
    which two servers on one machine race for; here every port is one the kernel just gave out.
    """
    base = base.absolute()
    config = _package().MilvusServerConfig(data_dir=str(base))
    keys = [key for key in config.configurable_items if key.endswith("_port") and key != "proxy_port"]
    *chosen, peer_port, metrics_port = _free_ports(len(keys) + 2, besides=port)
    ports = dict(zip(keys, chosen, strict=True))
    ports["proxy_port"] = port
    for key, value in ports.items():
        config.set(key, value)
    config.set("authorization_enabled", auth)
    # not config.resolve(): it binds each port without SO_REUSEADDR, which a restart on the port
    # the clients know fails while the old connections sit in TIME_WAIT
    config.resolve_storage()  # data/, logs/ and configs/ under base
    config.write_config()
    _embed_etcd_on(base, ports["etcd_port"], peer_port)
    exe = binaries()
    lib = str(exe.parent)
    env = {
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(metrics_port),
        "MILVUS_RUN_DIR": str(base / "run"),
        "MILVUSCONF": str(base / "configs") + "/",
        "LD_LIBRARY_PATH": lib + (":" + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH") else ""),
    }
    return [str(exe), "run", "standalone"], env


def _embed_etcd_on(base: Path, client_port: int, peer_port: int) -> None:
    """Point the embedded etcd at free ports: without a file of its own it listens on 2379/2380.

    The template's ``etcd_port`` only tells Milvus where to connect, so a second server on one
    machine would fail to bind (or talk to the first one's etcd).
    """
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"http://127.0.0.1:{client_port}"
    etcd_conf = base / "configs" / "etcd.yaml"
    etcd_conf.write_text(
        "name: default\n"
        f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\n"
    )
    yaml = base / "configs" / "milvus.yaml"
    text = yaml.read_text()
    anchor = "  use:\n    embed: true"
    if anchor not in text:
        raise RuntimeError(f"unexpected milvus.yaml template (no {anchor!r}) in the milvus {VERSION} wheel")
    yaml.write_text(text.replace(anchor, f"  config:\n    path: {etcd_conf}\n{anchor}", 1))


def _b64(text: str) -> str:
    """Milvus's wire form for credentials (the authorization header and UpdateCredential's passwords)."""
    return base64.b64encode(text.encode()).decode()


def _call(port: int, token: str, method: str, request: object, timeout: float) -> object:
    """One raw gRPC call over a throwaway channel with ``token`` (``user:password``) as its credentials.

    Not MilvusClient: pymilvus pools connections per address and, after a restart, reconnects
    the pooled one with a short timeout and fails (the stack's own probe avoids it the same way).
    """
    import grpc
    from pymilvus.grpc_gen import milvus_pb2_grpc

    auth = (("authorization", _b64(token)),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = milvus_pb2_grpc.MilvusServiceStub(channel)
        return getattr(stub, method)(request, timeout=timeout, metadata=auth)


def set_root_password(port: int, password: str, timeout: float = 30.0) -> None:
    """Replace the default root password; after a restart (data kept), check the one set before.

    Raises RuntimeError when neither opens the server: its data folder was secured by another
    secret (a run/ folder deleted while milvus-server/ was kept).
    """
    import grpc
    from pymilvus.grpc_gen import milvus_pb2

    change = milvus_pb2.UpdateCredentialRequest(username="root", oldPassword=_b64(DEFAULT_ROOT_PASSWORD), newPassword=_b64(password))
    try:
        status = _call(port, f"root:{DEFAULT_ROOT_PASSWORD}", "UpdateCredential", change, timeout)
        if getattr(status, "code", 1) == 0:
            return
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
    try:
        resp = _call(port, f"root:{password}", "ShowCollections", milvus_pb2.ShowCollectionsRequest(), timeout)
        if getattr(resp.status, "code", 1) == 0:  # type: ignore[attr-defined]
            return
        reason = resp.status.reason  # type: ignore[attr-defined]
    except grpc.RpcError as e:
        reason = str(e.details())
    raise RuntimeError(f"the Milvus server on port {port} takes neither the stack's root password nor the default: {reason}")
