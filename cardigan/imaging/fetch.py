"""Fetch stage: image bytes from S3 (or a local folder), bounded in size.

Only ``s3://`` and ``file://`` under a configured root are fetched: an event can never make a
worker open an arbitrary host (``http://169.254.169.254/``) or path (``../../etc/passwd``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from cardigan.errors import FetchUnavailable, ForbiddenURI, ImageTooLarge, MissingImage

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_URL_TTL_S = 300  # a signed GET is used at once; a short life bounds a leak
_ERROR_BODY_MAX = 16 * 1024
_CHUNK = 256 * 1024  # body read size: the deadline is checked between reads
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


# At DEBUG these log what signs a request: botocore.auth the canonical request and signature,
# botocore.endpoint the Authorization header, urllib3 the request line with a presigned URL's
# query. A worker run with -l DEBUG must still not print a usable signature.
_SIGNING_LOGGERS = ("botocore.auth", "botocore.endpoint", "urllib3.connectionpool")


def quiet_signing_logs() -> None:
    """Keep the loggers that would print signatures at INFO or above."""
    for name in _SIGNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.INFO))


def make_s3_client(endpoint_url: str | None, region: str, *, max_pool: int = 32) -> Any:
    """One client per process: thread-safe, pooled; credentials from boto3's standard chain."""
    quiet_signing_logs()
    cfg = Config(
        region_name=region,
        retries={"max_attempts": 2, "mode": "standard"},  # our own retry policy does the rest
        connect_timeout=5,
        read_timeout=20,
        max_pool_connections=max_pool,
        s3={"addressing_style": "path"},
        signature_version="s3v4",  # presigned URLs default to SigV2, which AWS is retiring and rclone refuses
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)


def _tls_options(s3_client: Any) -> dict[str, Any]:
    """The CA bundle boto3 resolved for this client (AWS_CA_BUNDLE, profile, or its default)."""
    verify = getattr(getattr(getattr(s3_client, "_endpoint", None), "http_session", None), "_verify", True)
    if verify is False:
        return {"cert_reqs": "CERT_NONE"}
    return {"ca_certs": verify} if isinstance(verify, str) else {}


def _error_code(body: bytes) -> str:
    """``<Error><Code>NoSuchKey</Code>…`` → ``NoSuchKey``; empty when the body is not S3's XML."""
    m = re.search(rb"<Code>([A-Za-z0-9.]{1,64})</Code>", body)
    return m.group(1).decode() if m else ""


class Fetcher:
    """Reads one image's bytes; raises permanent or transient errors, never decides retries.

    S3 GETs are signed by boto3 (credentials, region, session tokens: its standard chain) and
    sent with urllib3: ``generate_presigned_url`` + one pooled GET costs ~0.3 ms of CPU where
    ``get_object`` costs ~0.7-1.0 ms (botocore's per-call machinery: parameter handling,
    endpoint rules, event hooks, response parsing). At GPU rates (thousands of images/s) that
    difference is whole CPU cores. The signed URL is a short-lived credential: it never
    appears in an error or a log line.
    """

    def __init__(
        self,
        s3_client: Any,
        *,
        max_bytes: int,
        local_root: Path | None,
        max_pool: int = 32,
        buckets: frozenset[str] | None = None,
        deadline_s: float = 60.0,
    ) -> None:
        """``buckets``: the only buckets fetched from (None: any, for tools); ``deadline_s``:
        one GET's whole time, so a server that trickles bytes cannot hold a thread for ever."""
        self._s3 = s3_client
        self._max_bytes = max_bytes
        self._buckets = buckets
        self._deadline_s = deadline_s
        self._root = Path(os.path.realpath(local_root)) if local_root else None
        self._http = urllib3.PoolManager(
            maxsize=max_pool,
            timeout=urllib3.Timeout(connect=5, read=20),
            # no urllib3 retries: they log the URL, signature included (see _get)
            retries=False,
            **_tls_options(s3_client),
        )

    def fetch(self, uri: str, *, field: str = "uri") -> bytes:
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            return self._fetch_s3(bucket, key, field)
        if uri.startswith("file://"):
            return self._fetch_file(uri, field)
        raise ForbiddenURI(f"scheme not allowed in {uri[:80]!r}", field=field)

    def _fetch_s3(self, bucket: str, key: str, field: str) -> bytes:
        where = f"s3://{bucket}/{key}"
        if self._buckets is not None and bucket not in self._buckets:
            allowed = ", ".join(sorted(self._buckets))
            raise ForbiddenURI(f"bucket {bucket!r} is not allowed (CARDIGAN_S3_BUCKETS: {allowed})", field=field)
        try:
            url = self._s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=_URL_TTL_S)
        except ParamValidationError as e:  # an invalid bucket name or key: no retry can fix it
            raise ForbiddenURI(f"invalid S3 location {where[:200]!r}: {e}", field=field) from None
        except (BotoCoreError, ClientError) as e:  # no credentials …
            raise FetchUnavailable(f"cannot sign the GET for {where}: {type(e).__name__}: {e}", field=field) from None
        deadline = time.monotonic() + self._deadline_s
        r = self._get(url, where, field)
        try:
            if r.status == 200:
                size = int(r.headers.get("Content-Length") or 0)
                if size > self._max_bytes:
                    raise ImageTooLarge(f"{where} is {size} bytes, limit {self._max_bytes}", field=field)
                data = self._read_body(r, deadline, where, field)
                if len(data) > self._max_bytes:
                    raise ImageTooLarge(f"{where} is over the limit of {self._max_bytes} bytes", field=field)
                return data
            code = _error_code(r.read(_ERROR_BODY_MAX))
        except urllib3.exceptions.HTTPError as e:  # the connection broke mid-body
            broken = FetchUnavailable(f"S3 read failed for {where}: {type(e).__name__}", field=field)
        else:
            broken = None
        finally:
            if r.length_remaining != 0:  # body left unread (over the limit) or of unknown length
                r.close()  # drop the connection rather than reuse it mid-body
            r.release_conn()
        if broken is not None:
            raise broken  # raised out here: str(e) names the signed URL, and so would its context
        if code in _MISSING or r.status == 404:
            raise MissingImage(f"{where} does not exist ({code or r.status})", field=field)
        if code in _DENIED or r.status == 403:
            raise MissingImage(f"{where}: access denied ({code or r.status}); check the worker's AWS credentials", field=field)
        raise FetchUnavailable(f"S3 error {code or r.status} for {where}", field=field)

    def _read_body(self, r: urllib3.BaseHTTPResponse, deadline: float, where: str, field: str) -> bytes:
        """At most max_bytes + 1 bytes, in chunks, before the GET's deadline (each read has its own
        20 s timeout; a server that sends a byte every 19 s would pass that for ever)."""
        chunks: list[bytes] = []
        got = 0
        while got <= self._max_bytes:
            if time.monotonic() > deadline:
                raise FetchUnavailable(f"S3 GET of {where} took longer than {self._deadline_s:g} s", field=field)
            chunk = r.read1(min(_CHUNK, self._max_bytes + 1 - got))  # what has arrived, not a full chunk
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _get(self, url: str, where: str, field: str) -> urllib3.BaseHTTPResponse:
        """One GET; a connection that broke before any answer is tried once more (idempotent)."""
        failure = ""
        for _ in range(2):
            try:
                return self._http.request("GET", url, preload_content=False, redirect=False)
            except urllib3.exceptions.HTTPError as e:  # str(e) names the signed URL: keep only the type
                failure = type(e).__name__
        raise FetchUnavailable(f"S3 unreachable for {where}: {failure}", field=field)

    def _fetch_file(self, uri: str, field: str) -> bytes:
        if self._root is None:
            raise ForbiddenURI("file:// URIs are disabled: set CARDIGAN_LOCAL_ROOT to allow a folder", field=field)
        raw = unquote(uri[len("file://") :])
        if "\x00" in raw:
            raise ForbiddenURI("path contains a NUL byte", field=field)
        path = Path(os.path.realpath(raw if raw.startswith("/") else self._root / raw))
        if path != self._root and self._root not in path.parents:
            raise ForbiddenURI(f"{uri[:120]!r} is outside the allowed root {self._root}", field=field)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise MissingImage(f"{uri} is not a regular file", field=field)
            if size > self._max_bytes:
                raise ImageTooLarge(f"{uri} is {size} bytes, limit {self._max_bytes}", field=field)
            with path.open("rb") as f:
                return f.read(self._max_bytes + 1)
        except FileNotFoundError:
            raise MissingImage(f"{uri} does not exist", field=field) from None
        except PermissionError:
            raise MissingImage(f"{uri}: permission denied", field=field) from None
