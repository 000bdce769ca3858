"""The fetch stage against a real S3 endpoint (moto over HTTP), and the errors S3 can return.

moto cannot be made to answer 503 or 403 on demand, so a small loopback HTTP server plays a
misbehaving S3 for those cases (a fake only for faults the real server cannot produce).
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cardigan.errors import FetchUnavailable, ImageTooLarge, MissingImage
from cardigan.imaging.fetch import Fetcher, make_s3_client
from tests.harness import Namespace


def fetcher(endpoint: str | None, region: str = "us-east-1", max_bytes: int = 10_000) -> Fetcher:
    return Fetcher(make_s3_client(endpoint, region), max_bytes=max_bytes, local_root=None, max_pool=4)


@pytest.fixture(autouse=True)
def _aws_credentials(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's standard chain, as a worker gets it: from the environment."""
    for k, v in stack_env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)


def test_s3_objects_come_back_byte_exact_over_pooled_connections(ns: Namespace) -> None:
    blobs = {f"fetch/{i}.jpg": bytes([i]) * (100 + 37 * i) for i in range(20)}
    uris = {ns.put_image(k, v): v for k, v in blobs.items()}
    f = fetcher(ns.settings.s3_endpoint_url, ns.settings.s3_region)
    with ThreadPoolExecutor(8) as pool:  # more requests than pooled connections
        got = list(pool.map(f.fetch, list(uris) * 5))
    assert got == list(uris.values()) * 5


def test_missing_object_and_bucket_are_permanent_errors(ns: Namespace) -> None:
    f = fetcher(ns.settings.s3_endpoint_url, ns.settings.s3_region)
    with pytest.raises(MissingImage, match=r"s3://.*/fetch/nope\.jpg does not exist \(NoSuchKey\)") as e:
        f.fetch(f"s3://{ns.settings.bucket}/fetch/nope.jpg", field="images[2].uri")
    assert e.value.field == "images[2].uri"
    with pytest.raises(MissingImage, match="does not exist"):
        f.fetch("s3://no-such-bucket-here/a.jpg")


def test_object_over_the_byte_limit_is_refused_and_the_connection_stays_usable(ns: Namespace) -> None:
    big = ns.put_image("fetch/big.jpg", b"b" * 5000)
    small = ns.put_image("fetch/small.jpg", b"s" * 10)
    f = fetcher(ns.settings.s3_endpoint_url, ns.settings.s3_region, max_bytes=4999)
    for _ in range(3):  # the unread body is never handed to the next request
        with pytest.raises(ImageTooLarge, match="5000 bytes, limit 4999"):
            f.fetch(big)
        assert f.fetch(small) == b"s" * 10


class _FakeS3(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the status and S3 error code the path asks for: /503/SlowDown/k."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        _, status, code, *_ = self.path.split("?")[0].split("/")
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>x</Message></Error>".encode()
        self.send_response(int(status))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_s3() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeS3)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_errors_are_transient_and_denials_permanent(fake_s3: str) -> None:
    f = fetcher(fake_s3)
    with pytest.raises(FetchUnavailable, match=r"S3 error SlowDown for s3://503/SlowDown/k\.jpg"):
        f.fetch("s3://503/SlowDown/k.jpg")
    with pytest.raises(FetchUnavailable, match="S3 error InternalError"):
        f.fetch("s3://500/InternalError/k.jpg")
    with pytest.raises(MissingImage, match="access denied .AccessDenied.; check the worker's AWS credentials"):
        f.fetch("s3://403/AccessDenied/k.jpg")
    with pytest.raises(MissingImage, match="does not exist"):
        f.fetch("s3://404/NoSuchKey/k.jpg")


def test_unreachable_endpoint_is_transient_and_the_signed_url_is_not_in_the_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f = fetcher(f"http://127.0.0.1:{port}")
    with pytest.raises(FetchUnavailable, match=r"S3 unreachable for s3://catalog/a\.jpg") as e:
        f.fetch("s3://catalog/a.jpg")
    text = f"{e.value} {e.value!r} {e.value.__cause__!r} {e.value.__context__!r}"
    assert "Signature" not in text and "AKIDEXAMPLE" not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Signature" not in logged and "AKIDEXAMPLE" not in logged
