"""A search service over a small indexed catalog, for the API and browser tests.

Real parts: the session's stack (Valkey, Milvus Lite server over gRPC, moto S3), products
indexed by the workers' own pipeline, and ``cardigan serve`` started as its own process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3

from config.settings import patched_env
from devkit.catalog import SyntheticProduct, generate_catalog, image_uri, object_key, upload
from tests.harness import ROOT, Namespace, new_namespace, wait_until

TOKEN = "test-token-7f3a"
MAX_BYTES = 300_000  # the catalog's photos are < 100 kB; small enough to test the limit cheaply
MAX_PIXELS = 1_000_000  # the catalog's are at most 640x640
DUPLICATE_THRESHOLD = 0.99


@dataclass
class Served:
    ns: Namespace
    base: str
    proc: subprocess.Popen[bytes]
    log: Path
    catalog: list[SyntheticProduct]
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    http: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))
    )

    def request(self, method: str, path: str, *, auth: bool = True, **kw: Any) -> urllib3.BaseHTTPResponse:
        headers = dict(kw.pop("headers", {}) or {})
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        return self.http.request(method, self.base + path, headers=headers, **kw)

    def search(self, fields: Mapping[str, Any], **kw: Any) -> urllib3.BaseHTTPResponse:
        return self.request("POST", "/v1/search", fields=dict(fields), **kw)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def index_catalog(ns: Namespace, catalog: list[SyntheticProduct], extra: Sequence[dict[str, Any]] = ()) -> dict[str, dict[str, Any]]:
    """Upload the photos and index every product through the workers' pipeline, in process."""
    from devkit.catalog import _event
    from workers.pipeline import Pipeline

    s = ns.settings
    upload(catalog, ns.s3(), s.bucket)
    events = {p.product_id: _event("add", p, 1, lambda key: image_uri(s.bucket, object_key("catalog", key))) for p in catalog}
    for e in extra:
        events[e["product_id"]] = e
    with patched_env(ns.env):
        pipe = Pipeline(s)
        try:
            for e in events.values():
                res = pipe.handle(e)
                assert res.outcome == "applied", (e["product_id"], res)
            if pipe.detector is not None:  # /v1/duplicates shows what detection recorded
                store = pipe.detector.store
                wait_until(lambda: store.pending() == 0, 60, "duplicate detection of the catalog")
        finally:
            pipe.close()
    return events


@contextmanager
def served(stack_env: Mapping[str, str], tmp: Path, *, products: int = 12, **env: str) -> Iterator[Served]:
    """Index a catalog (plus ``dup-1``, a second listing of product 1's photos) and serve it."""
    ns = new_namespace(
        stack_env,
        tmp,
        CARDIGAN_SERVE__TOKEN=TOKEN,
        CARDIGAN_SERVE__MAX_IN_FLIGHT="4",
        CARDIGAN_LIMITS__MAX_IMAGE_BYTES=str(MAX_BYTES),
        CARDIGAN_LIMITS__MAX_IMAGE_PIXELS=str(MAX_PIXELS),
        # the double listing reuses the photos (score ~1.0); random 64 px features put distinct
        # products near 0.9, so the default 0.95 would leave a thin margin
        CARDIGAN_SERVE__DUPLICATE_THRESHOLD=str(DUPLICATE_THRESHOLD),
        **env,
    )
    catalog = generate_catalog(products, seed=3, prefix="sv")
    first = catalog[0]
    s = ns.settings
    dup = {
        "type": "add",
        "product_id": "dup-1",
        "version": 1,
        "images": [
            {"uri": image_uri(s.bucket, object_key("catalog", img.key)), **({"bbox": list(img.bbox)} if img.bbox else {})}
            for img in first.images
        ],
        "attributes": {"category": first.category},
    }
    events = index_catalog(ns, catalog, [dup])
    port = _free_port()
    log = tmp / "serve.log"
    penv = {**os.environ, **ns.env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardigan.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=penv,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sv = Served(ns, f"http://127.0.0.1:{port}", proc, log, catalog, events)

    def ready() -> bool:
        assert proc.poll() is None, f"cardigan serve exited with {proc.returncode}:\n{sv.log_text()[-3000:]}"
        try:
            return sv.request("GET", "/readyz", auth=False, timeout=2).status == 200
        except urllib3.exceptions.HTTPError:
            return False

    try:
        wait_until(ready, 180, "cardigan serve to be ready")
        yield sv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
