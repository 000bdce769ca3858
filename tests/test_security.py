"""Security: JSON only on the broker, no credentials in logs or output, TLS that checks
certificates, Flower behind a password on loopback.

TLS is tested for real: a TLS terminating proxy (a certificate made here, for "localhost") sits
in front of the embedded Valkey and Milvus Lite servers, so kombu, redis-py and pymilvus do real
handshakes, and must refuse a certificate they cannot verify or that names another host.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pickle
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardigan.ops.verify import Expected
from cardigan.store.guard import make_redis
from config.celery_app import broker_tls, create_app
from config.settings import Settings, redact_url
from devkit.stack import Stack, StackInfo
from tests.harness import Namespace, wait_until
from tests.test_bad_input_e2e import send_raw, task_headers
from tests.test_deadletter_e2e import cli
from tests.test_index_e2e import add, converge

ROOT = Path(__file__).resolve().parent.parent
REFUSED_PICKLE = "refused content type application/x-python-serialize: only JSON is accepted"


# -- pickle: refused, dead-lettered, never unpickled ------------------------------------------


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing means someone unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.mark.e2e
def test_e2e_pickle_and_other_serializers_refused_and_dead_lettered(ns: Namespace, tmp_path: Path) -> None:
    control = tmp_path / "control-unpickled"
    pickle.loads(pickle.dumps(_CreatesFile(control)))  # the payload is live: unpickling creates the file
    assert control.exists()

    marker_v2, marker_v1 = tmp_path / "unpickled-v2", tmp_path / "unpickled-v1"
    w = ns.start_worker()
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    v2 = task_headers()
    send_raw(ns, pickle.dumps(((_CreatesFile(marker_v2),), {}, embed)), v2, "application/x-python-serialize", "binary")
    # protocol 1: no headers, the task name inside the (pickled) body
    v1_id = str(uuid.uuid4())
    send_raw(
        ns,
        pickle.dumps({"task": "cardigan.index_event", "id": v1_id, "args": (_CreatesFile(marker_v1),), "kwargs": {}}),
        {},
        "application/x-python-serialize",
        "binary",
    )
    yaml_h = task_headers()
    send_raw(ns, "!!python/object/apply:os.system ['touch /tmp/never']", yaml_h, "application/x-yaml", "utf-8")
    msgpack_h = task_headers()
    send_raw(ns, b"\x93\x91\x80\x80\x80", msgpack_h, "application/x-msgpack", "binary")
    ns.publish([add(ns, "sec-good", 1, 1)])
    converge(ns, {"sec-good": Expected(1, 1)})
    wait_until(lambda: ns.dead().count() == 4, 30, "4 dead letters")

    assert not marker_v2.exists() and not marker_v1.exists(), "a pickle was unpickled"
    dead = ns.dead().list()
    by_task = {d.task_id: d for d in dead}
    d = by_task[v2["id"]]
    assert d.kind == "refused_content" and d.reason == REFUSED_PICKLE
    assert isinstance(d.event, str) and d.event.startswith("b'\\x80") and "unpickled-v2" in d.event  # raw bytes, as a repr
    (d1,) = [x for x in dead if x.task_id is None]  # protocol 1: no id header to read without decoding
    assert d1.kind == "refused_content" and d1.reason == REFUSED_PICKLE and "unpickled-v1" in d1.event
    assert by_task[yaml_h["id"]].reason == "refused content type application/x-yaml: only JSON is accepted"
    assert by_task[msgpack_h["id"]].reason == "refused content type application/x-msgpack: only JSON is accepted"
    assert w.alive() and ns.drained()
    # a refused message stays refused: replaying it cannot sneak it through as an event
    out = cli(ns, "dead", "replay", d.id, rc=1)
    assert "still invalid, kept" in out.stderr and not marker_v2.exists()


# -- credentials never logged or printed ---------------------------------------------------------


@pytest.mark.e2e
def test_e2e_credentials_never_logged(ns: Namespace) -> None:
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "broker": f"brokerpw-{tag}",
        "aws": f"aws-secret-{tag}",
        "milvus_token": f"milvus-token-{tag}",
        "flower": f"flower-pw-{tag}",
        "milvus_url": f"milvus-url-pw-{tag}",
    }
    # Valkey's default user has no password, so AUTH default <anything> is accepted: a URL with a
    # password that works, and that must never be printed
    host_db = ns.env["CARDIGAN_BROKER_URL"].split("://", 1)[1]
    ns.set_env(
        CARDIGAN_BROKER_URL=f"redis://default:{secrets['broker']}@{host_db}",
        AWS_SECRET_ACCESS_KEY=secrets["aws"],  # moto accepts any key
        CARDIGAN_MILVUS_TOKEN=f"root:{secrets['milvus_token']}",  # Milvus Lite ignores tokens
        CARDIGAN_FLOWER_PASSWORD=secrets["flower"],
    )
    assert make_redis(ns.settings.effective_state_url).ping()
    w = ns.start_worker()
    missing = {"type": "add", "product_id": "sec-missing", "version": 1, "images": [{"uri": f"s3://{ns.settings.bucket}/nope.jpg"}]}
    ns.publish([add(ns, "sec-1", 1, 1), missing])
    send_raw(ns, b"not json", task_headers())
    converge(ns, {"sec-1": Expected(1, 1)})
    wait_until(lambda: ns.dead().count() == 2, 30, "2 dead letters")
    # a worker whose Milvus URL carries a password, and whose Milvus is down: the error is logged
    dead_port = _free_port()
    w2 = ns.start_worker(extra_env={"CARDIGAN_MILVUS_URI": f"http://root:{secrets['milvus_url']}@127.0.0.1:{dead_port}"})
    wait_until(lambda: "pipeline not ready at start" in w2.log_text(), 60, "the Milvus error to be logged")
    ns.stop_workers()

    outputs = {
        "worker log": w.log_text(),
        "worker log (Milvus down)": w2.log_text(),
        "cardigan status": cli(ns, "status", "--no-inspect").stdout,
        "cardigan status --json": cli(ns, "status", "--json").stdout,
        "cardigan dead list": cli(ns, "dead", "list").stdout,
        "cardigan dead list --json": cli(ns, "dead", "list", "--json").stdout,
    }
    leaks = [f"{what} shows the {name} secret" for what, text in outputs.items() for name, secret in secrets.items() if secret in text]
    assert not leaks, leaks
    assert "redis://default:**@" in outputs["worker log"], "Celery's banner shows the broker, password masked"
    assert f"http://root:***@127.0.0.1:{dead_port}" in outputs["worker log (Milvus down)"]
    st = json.loads(outputs["cardigan status --json"])
    assert st["broker"] == f"redis://default:***@{host_db}"
    assert "redis://default:***@" in outputs["cardigan status"]


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("amqps://user:p@ss:w@rd@rabbit:5671//") == "amqps://user:***@rabbit:5671//"
    assert redact_url("http://root:Milvus@h:19530") == "http://root:***@h:19530"
    assert redact_url("redis://user@h/0") == "redis://user@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_settings_keep_secrets_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens and passwords are SecretStr: repr, str and model_dump do not show them."""
    monkeypatch.setenv("CARDIGAN_MILVUS_TOKEN", "root:tok-123")
    monkeypatch.setenv("CARDIGAN_FLOWER_PASSWORD", "fl-456")
    s = Settings()
    assert s.milvus_token.get_secret_value() == "root:tok-123" and s.flower_password.get_secret_value() == "fl-456"
    for text in (repr(s), str(s), json.dumps(s.model_dump(mode="json"))):
        assert "tok-123" not in text and "fl-456" not in text


# -- TLS: rediss://, amqps://, https:// Milvus with a token ------------------------------------------


def test_broker_tls_options_check_certificate_and_host() -> None:
    """What kombu gets: its own defaults would accept any certificate (rediss) or any host (amqps)."""
    assert broker_tls("rediss://:pw@redis.example:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_tls("rediss://h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem") is None  # the URL's options win
    assert broker_tls("amqps://u:pw@rabbit.example:5671//") == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit.example"}
    assert broker_tls("redis://h:6379/0") is None and broker_tls("amqp://g:g@h//") is None
    conn = create_app(Settings(broker_url="rediss://:pw@redis.example:6380/0")).connection_for_write()
    assert conn.transport_cls == "rediss" and conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED} and conn.password == "pw"
    conn = create_app(Settings(broker_url="rediss://:pw@h:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem")).connection_for_write()
    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"}
    conn = create_app(
        Settings(broker_url="amqps://u:pw@rabbit.example:5671//", state_url="rediss://:pw@state.example:6380/1")
    ).connection_for_write()
    assert conn.transport_cls == "amqps" and conn.port == 5671 and conn.ssl["server_hostname"] == "rabbit.example"
    state = make_redis(
        Settings(broker_url="amqps://u:pw@rabbit.example:5671//", state_url="rediss://:pw@state.example:6380/1").effective_state_url
    )
    kw = state.connection_pool.connection_kwargs
    assert state.connection_pool.connection_class is redis.SSLConnection and kw["password"] == "pw" and kw["port"] == 6380


def _make_cert(d: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` only (no IP address): 127.0.0.1 must not match."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return d / "cert.pem", d / "key.pem"


def _pump(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    finally:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TLSProxy:
    """TLS in front of a plain TCP server (ALPN ``h2`` for gRPC); counts completed handshakes."""

    def __init__(self, target_port: int, cert: Path, key: Path, *, alpn: list[str] | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if alpn:
            self.ctx.set_alpn_protocols(alpn)
        self.target = target_port
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.srv.getsockname()[1])
        self.handshakes = 0
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket) -> None:
        try:
            t = self.ctx.wrap_socket(c, server_side=True)
        except (ssl.SSLError, OSError):
            c.close()  # the client refused our certificate
            return
        self.handshakes += 1
        try:
            u = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            t.close()
            return
        self.socks += [t, u]
        threading.Thread(target=_pump, args=(t, u), daemon=True).start()
        _pump(u, t)

    def close(self) -> None:
        self.srv.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _make_cert(tmp_path_factory.mktemp("tls"))


def _port_of(url: str) -> int:
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


@pytest.fixture
def redis_tls(stack: StackInfo, cert: tuple[Path, Path]) -> Iterator[TLSProxy]:
    p = TLSProxy(_port_of(stack.broker_url), *cert)
    yield p
    p.close()


@pytest.mark.e2e
def test_rediss_broker_and_state_over_tls(redis_tls: TLSProxy, cert: tuple[Path, Path], ns: Namespace) -> None:
    """Real TLS to Valkey: works with the CA given, refused for an unknown CA or another host name."""
    from cardigan.ops.publish import Publisher

    ca = cert[0]
    db = ns.env["CARDIGAN_BROKER_URL"].rsplit("/", 1)[1]  # this test's own database
    queue = ns.settings.queue
    good = f"rediss://localhost:{redis_tls.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    plain = ns.state()
    s = Settings(broker_url=good, queue=queue)
    # a task message published over TLS lands in the queue
    Publisher(s).publish({"type": "delete", "product_id": "tls-1", "version": 1})
    assert plain.llen(queue) == 1
    assert make_redis(s.effective_state_url).ping()  # the state store: redis-py, same URL
    before = redis_tls.handshakes
    assert before >= 2

    # no CA given: the self-signed certificate is refused by kombu and by redis-py
    untrusted = Settings(broker_url=f"rediss://localhost:{redis_tls.port}/{db}", queue=queue)
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        with create_app(untrusted).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        make_redis(untrusted.effective_state_url).ping()
    # the CA is trusted but the certificate names localhost, not 127.0.0.1
    wrong_host = f"rediss://127.0.0.1:{redis_tls.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    with pytest.raises(redis.ConnectionError, match="mismatch"):
        make_redis(wrong_host).ping()
    assert redis_tls.handshakes == before, "no refused connection completed a handshake"
    assert plain.llen(queue) == 1


def test_amqps_checks_certificate_and_host_name(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """amqps:// to a TLS endpoint (no RabbitMQ behind it): the handshake decides, before AMQP."""
    closed = _free_port()
    proxy = TLSProxy(closed, *cert)  # completes TLS, then hangs up: AMQP never starts
    try:

        def connect(host: str) -> BaseException:
            app = create_app(Settings(broker_url=f"amqps://guest:guest@{host}:{proxy.port}//", state_url="redis://127.0.0.1:1/0"))
            with pytest.raises(Exception) as info:  # which error it is, is the point
                with app.connection_for_write() as conn:
                    conn.connect()
            return info.value

        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        assert isinstance(connect("localhost"), ssl.SSLCertVerificationError)  # unknown CA
        monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))  # a private CA, the OpenSSL way
        err = connect("127.0.0.1")
        assert isinstance(err, ssl.SSLCertVerificationError) and "mismatch" in str(err)  # wrong name
        assert proxy.handshakes == 0
        err = connect("localhost")
        assert not isinstance(err, ssl.SSLError) and proxy.handshakes >= 1, err  # TLS done; AMQP then fails
    finally:
        proxy.close()


@pytest.mark.e2e
def test_milvus_over_tls_with_token(stack: StackInfo, cert: tuple[Path, Path]) -> None:
    """pymilvus over https:// with a token: real TLS to Milvus Lite; refused without the CA."""
    proxy = TLSProxy(_port_of(stack.milvus_uri), *cert, alpn=["h2"])
    alias = f"tls_{uuid.uuid4().hex[:8]}"
    code = (
        "from cardigan.store.index import Index\n"
        f"i = Index('https://localhost:{proxy.port}', token='root:tls-token', alias='{alias}', timeout=5)\n"
        "c = i.client._config\n"
        "print(i.ensure(), c.token, dict(c.handler_kwargs).get('secure'), i.count())\n"
    )
    try:
        env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert[0])}  # gRPC's way to add a CA
        ok = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert ok.stdout.split() == [f"{alias}_v1", "root:tls-token", "True", "0"]
        assert proxy.handshakes >= 1
        before = proxy.handshakes
        env.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
        bad = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "IndexUnavailable" in bad.stderr and "unreachable" in bad.stderr
        assert proxy.handshakes == before
    finally:
        proxy.close()


# -- Flower -------------------------------------------------------------------------------------------


def _listeners(port: int) -> list[str]:
    """Local addresses listening on ``port`` (IPv4 and IPv6), from /proc/net."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                out.append(addr)
    return out


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.e2e
def test_flower_needs_a_password_and_listens_on_loopback_only(tmp_path: Path) -> None:
    st = Stack(tmp_path / "stack", s3="folder", flower=True, flower_password=None)
    with st.running() as info:
        assert info.flower_url and info.flower_user == "admin" and info.flower_password
        secret = tmp_path / "stack" / "run" / "flower.secret"
        assert secret.stat().st_mode & 0o077 == 0, "the generated password file is private"
        port = _port_of(info.flower_url)
        for path in ("/", "/workers", "/api/workers", "/tasks", "/broker"):
            assert _get(info.flower_url + path) == 401, path
            assert _get(info.flower_url + path, ("admin", "wrong")) == 401, path
        assert _get(info.flower_url + "/", (info.flower_user, info.flower_password)) == 200
        addrs = _listeners(port)
        assert addrs and all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs
        other = _non_loopback_ip()
        if other:
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((other, port)) != 0, f"Flower answers on {other}"
        pid = int((tmp_path / "stack" / "run" / "flower.pid").read_text())
        assert info.flower_password not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"), "password in the command line"
        assert _get(info.flower_url + "/healthcheck") == 200  # liveness only, no data


def _non_loopback_ip() -> str | None:
    """An address of this machine other than 127.x, if it has one (to prove Flower is not on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: just picks the outgoing interface
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
