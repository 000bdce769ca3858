"""Fetch stage: image bytes from S3 (or a local folder), bounded in size.

Only ``s3://`` and ``file://`` under a configured root are fetched: an event can never make a
worker open an arbitrary host (``http://169.254.169.254/``) or path (``../../etc/passwd``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cardigan.errors import FetchUnavailable, ForbiddenURI, ImageTooLarge, MissingImage

_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def make_s3_client(endpoint_url: str | None, region: str, *, max_pool: int = 32) -> Any:
    """One client per process: thread-safe, pooled; credentials from boto3's standard chain."""
    cfg = Config(
        region_name=region,
        retries={"max_attempts": 2, "mode": "standard"},  # our own retry policy does the rest
        connect_timeout=5,
        read_timeout=20,
        max_pool_connections=max_pool,
        s3={"addressing_style": "path"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=cfg)


class Fetcher:
    """Reads one image's bytes; raises permanent or transient errors, never decides retries."""

    def __init__(self, s3_client: Any, *, max_bytes: int, local_root: Path | None) -> None:
        self._s3 = s3_client
        self._max_bytes = max_bytes
        self._root = Path(os.path.realpath(local_root)) if local_root else None

    def fetch(self, uri: str, *, field: str = "uri") -> bytes:
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            return self._fetch_s3(bucket, key, field)
        if uri.startswith("file://"):
            return self._fetch_file(uri, field)
        raise ForbiddenURI(f"scheme not allowed in {uri[:80]!r}", field=field)

    def _fetch_s3(self, bucket: str, key: str, field: str) -> bytes:
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            size = int(obj.get("ContentLength") or 0)
            if size > self._max_bytes:
                obj["Body"].close()
                raise ImageTooLarge(f"s3://{bucket}/{key} is {size} bytes, limit {self._max_bytes}", field=field)
            data = obj["Body"].read(self._max_bytes + 1)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _MISSING or status == 404:
                raise MissingImage(f"s3://{bucket}/{key} does not exist ({code})", field=field) from None
            if code in _DENIED or status == 403:
                raise MissingImage(f"s3://{bucket}/{key}: access denied ({code}); check the worker's AWS credentials", field=field) from None
            raise FetchUnavailable(f"S3 error {code or status} for s3://{bucket}/{key}", field=field) from e
        except BotoCoreError as e:  # connection refused, timeouts, endpoint down
            raise FetchUnavailable(f"S3 unreachable for s3://{bucket}/{key}: {type(e).__name__}", field=field) from e
        if len(data) > self._max_bytes:
            raise ImageTooLarge(f"s3://{bucket}/{key} is over the limit of {self._max_bytes} bytes", field=field)
        return data

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
