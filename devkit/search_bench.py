"""``cardigan bench-search``: queries/s and latency of the search service under load.

One run on one machine: an embedded stack, a synthetic catalog indexed through the workers'
own pipeline, ``cardigan serve`` in its own process, and closed-loop clients (1, 8, 32 by
default) POSTing street photos to ``/v1/search``. The encoder's forward-only images/s is
measured in the same run, and CPU seconds per query are reported per process (service,
Milvus, clients), so a ceiling set by per-request CPU rather than by the model shows as such.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """Pre-encoded multipart bodies POSTed over pooled connections (cheap per request)."""

    def __init__(self, base: str, photos: list[bytes], k: int, threads: int) -> None:
        self.url = base + "/v1/search"
        self.http = urllib3.PoolManager(maxsize=threads + 4, retries=False, timeout=urllib3.Timeout(connect=5, read=60))
        self.bodies = [urllib3.encode_multipart_formdata({"file": ("query.jpg", p, "image/jpeg"), "k": str(k)}) for p in photos]

    def query(self, i: int) -> int:
        body, ctype = self.bodies[i % len(self.bodies)]
        r = self.http.request("POST", self.url, body=body, headers={"Content-Type": ctype})
        return int(r.status)


def _metric(base: str, name: str) -> float:
    text = urllib3.request("GET", base + "/metrics").data.decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _stages(base: str) -> dict[str, float]:
    """The service's CPU seconds by stage (its /metrics): model, decode+crop, http, ..."""
    text = urllib3.request("GET", base + "/metrics").data.decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^cardigan_serve_thread_cpu_seconds\{stage="([^"]+)"\} ([0-9.e+]+)$', text, re.M)
    }


def closed_loop(client: Client, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """``clients`` threads, each sending its next query when the last one answered."""
    from cardigan.procstat import percentile

    stop = threading.Event()
    lat: list[float] = []
    errors: dict[int, int] = {}
    t_measure = time.monotonic() + warmup
    lock = threading.Lock()

    def loop(n: int) -> None:
        i = n * 7919
        while not stop.is_set():
            t0 = time.monotonic()
            status = client.query(i)
            t1 = time.monotonic()
            i += 1
            if t0 >= t_measure:
                with lock:
                    if status == 200:
                        lat.append(t1 - t0)
                    else:
                        errors[status] = errors.get(status, 0) + 1

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warmup + seconds)
    stop.set()
    for t in threads:
        t.join(60)
    return {
        "qps": len(lat) / seconds,
        "p50_ms": 1000 * percentile(lat, 50),
        "p99_ms": 1000 * percentile(lat, 99),
        "n": len(lat),
        "errors": errors,
    }


def paced(client: Client, rate: float, seconds: float) -> dict[str, Any]:
    """Open loop at a fixed rate: latency from when a query was due, so queueing counts."""
    from cardigan.procstat import percentile

    n = max(1, int(rate * seconds))
    lat: list[float] = []
    errors: dict[int, int] = {}
    lock = threading.Lock()
    t0 = time.monotonic() + 0.2

    def one(i: int) -> None:
        due = t0 + i / rate
        status = client.query(i)
        with lock:
            if status == 200:
                lat.append(time.monotonic() - due)
            else:
                errors[status] = errors.get(status, 0) + 1

    with ThreadPoolExecutor(64) as pool:
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    return {"rate": rate, "p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99), "n": len(lat), "errors": errors}


def run(
    *, products: int, levels: list[int], seconds: float, image_size: int, model: str, k: int, out: Path | None, say: Any
) -> dict[str, Any]:
    from cardigan.imaging.fetch import make_s3_client
    from cardigan.procstat import cpu_s
    from config.settings import patched_env, settings_from_env
    from devkit.bench import bench_weights, forward_only
    from devkit.catalog import _event, generate_catalog, image_uri, object_key, query_photo, upload
    from devkit.stack import Stack
    from encoder import build_encoder
    from workers.pipeline import Pipeline

    load_before = os.getloadavg()[0]
    data = Path(tempfile.mkdtemp(prefix="cardigan-bench-search-"))
    stack = Stack(data / "stack", s3="rclone")
    with stack.running() as info:
        env = {
            **info.env(),
            "CARDIGAN_COLLECTION": "benchsearch",
            "CARDIGAN_ENCODER__BACKBONE": model,
            "CARDIGAN_ENCODER__IMAGE_SIZE": str(image_size),
            "CARDIGAN_SERVE__MAX_IN_FLIGHT": "256",
        }
        weights = bench_weights(model, None, os.environ)
        if weights is not None:
            env["CARDIGAN_ENCODER__WEIGHTS"] = weights
        settings = settings_from_env(env)
        say(f"forward-only: {model} at {image_size} px, batch {settings.encoder.batch_size}")
        enc = build_encoder(settings.encoder).load()
        fwd_before, fwd_cpu_ms, fwd_threads = forward_only(enc)
        say(f"catalog: {products} products; indexing through the worker pipeline")
        catalog = generate_catalog(products, seed=7, prefix="bs")
        with patched_env(env):
            upload(catalog, make_s3_client(settings.s3_endpoint_url, settings.s3_region), settings.bucket)
            pipe = Pipeline(settings)
            try:
                events = [_event("add", p, 1, lambda key: image_uri(settings.bucket, object_key("catalog", key))) for p in catalog]
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(pipe.handle, events))
            finally:
                pipe.close()
        photos = [query_photo(p).data for p in catalog[:64]]
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = (out or data) / "serve.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as f:
            server = subprocess.Popen(
                [sys.executable, "-m", "cardigan.cli", "serve", "--port", str(port)],
                cwd=ROOT,
                env=proc_env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if urllib3.request("GET", base + "/readyz", timeout=2, retries=False).status == 200:
                        break
                except urllib3.exceptions.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the search service did not become ready; see {log}")
                time.sleep(0.3)
            milvus_pid = stack.status()["milvus"]["pid"]
            client = Client(base, photos, k, max(levels))
            rows = []
            for c in levels:
                say(f"{c} client(s) for {seconds:.0f} s")
                b0, i0 = _metric(base, "cardigan_serve_embed_batches"), _metric(base, "cardigan_serve_embed_items")
                st0 = _stages(base)
                cpu0 = (cpu_s(server.pid), cpu_s(milvus_pid), time.process_time())
                res = closed_loop(client, c, seconds, warmup=min(2.0, seconds / 4))
                cpu1 = (cpu_s(server.pid), cpu_s(milvus_pid), time.process_time())
                st1 = _stages(base)
                b1, i1 = _metric(base, "cardigan_serve_embed_batches"), _metric(base, "cardigan_serve_embed_items")
                queries = max(1.0, i1 - i0)
                res |= {
                    "clients": c,
                    "mean_batch": (i1 - i0) / max(1.0, b1 - b0),
                    "cpu_ms_per_query": {
                        "service": 1000 * (cpu1[0] - cpu0[0]) / queries,
                        "milvus": 1000 * (cpu1[1] - cpu0[1]) / queries,
                        "clients": 1000 * (cpu1[2] - cpu0[2]) / queries,
                    },
                    "service_cpu_ms_by_stage": {k: round(1000 * (v - st0.get(k, 0.0)) / queries, 2) for k, v in sorted(st1.items())},
                }
                rows.append(res)
            peak = max(r["qps"] for r in rows)
            say(f"paced at half the peak ({peak / 2:.0f} queries/s)")
            half = paced(client, peak / 2, seconds)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        # again once the service is gone: on a shared machine the rate moves, and the mean of
        # before and after is what the service's run is compared with
        say("forward-only again")
        fwd_after = forward_only(enc)[0]
        fwd = (fwd_before + fwd_after) / 2
    one = next((r["qps"] for r in rows if r["clients"] == 1), rows[0]["qps"])
    top = rows[-1]
    result = {
        "model": model,
        "image_size": image_size,
        "products": products,
        "cpus": os.cpu_count(),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: a shared machine shows here
        "forward_only_images_per_s": fwd,
        "forward_only_before_after": [fwd_before, fwd_after],
        "forward_only_cpu_ms": fwd_cpu_ms,
        "forward_only_threads": fwd_threads,
        "levels": rows,
        "half_peak": half,
        "scaling_top_vs_1": top["qps"] / one if one else 0.0,
        "top_vs_forward_only": top["qps"] / fwd if fwd else 0.0,
    }
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_search.json").write_text(json.dumps(result, indent=2))
    return result


def table(res: dict[str, Any]) -> Table:
    t = Table(title=f"search service: {res['model']} at {res['image_size']} px, {res['products']} products, {res['cpus']} CPUs")
    for col in ("clients", "queries/s", "p50 ms", "p99 ms", "mean batch", "CPU ms/query service", "Milvus", "clients", "errors"):
        t.add_column(col, justify="right")
    for r in res["levels"]:
        cpu = r["cpu_ms_per_query"]
        t.add_row(
            str(r["clients"]), f"{r['qps']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['mean_batch']:.1f}",
            f"{cpu['service']:.1f}", f"{cpu['milvus']:.1f}", f"{cpu['clients']:.1f}", str(r["errors"] or ""),
        )  # fmt: skip
    return t
