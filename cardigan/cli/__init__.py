"""The ``cardigan`` command line: publish, work, query, watch, repair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cardigan.errors import CardiganError
from cardigan.keys import EX_CONFIG
from cardigan.reach import EX_UNREACHABLE, check_broker, check_state, exit_line, state_url, talking_to
from config.settings import Settings, load_settings

app = typer.Typer(help="Keep a visual-search index of product images live.", no_args_is_help=True, pretty_exceptions_enable=False)
dead_app = typer.Typer(help="Dead letters: events that could not be indexed, with their reasons.", no_args_is_help=True)
app.add_typer(dead_app, name="dead")

console = Console()
err_console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one, not a traceback
        err_console.print(f"[red]configuration error:[/] {e}")
        raise typer.Exit(2) from None


def _fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/] {msg}", soft_wrap=True)  # one line, whatever the terminal's width
    raise typer.Exit(code)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console, transient=False
    )


# -- publish ----------------------------------------------------------------------------


@app.command()
def publish(
    file: str = typer.Argument(..., help="JSON lines file of events, or - for standard input"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    wait: float = typer.Option(
        0, "--wait", min=0, help="then wait up to this many seconds for each event's outcome (applied, stale, dead) and print it"
    ),
) -> None:
    """Validate and publish events; report rejected lines; exit 1 if any was rejected (or, with --wait, not applied)."""
    from cardigan.ops.publish import Publisher, read_json_lines

    settings = _settings()
    pub = Publisher(settings)
    if file == "-":
        lines = list(read_json_lines(sys.stdin))
    else:
        path = Path(file)
        if not path.is_file():
            _fail(f"{file}: no such file")
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = list(read_json_lines(f))
    show = len(lines) > 200 and not as_json
    with talking_to(settings, broker=True, check=False), _progress() as prog:
        if any(_valid(pub, raw) for _, raw in lines):  # stops at the first valid line
            check_broker(settings)  # nothing valid: the rejections need no broker
        task = prog.add_task("publishing", total=len(lines), visible=show)
        report = pub.publish_many(lines, on_progress=lambda n: prog.advance(task, n))
    if as_json:
        print(json.dumps({"published": report.published, "rejected": [r.__dict__ for r in report.rejected]}))
    else:
        for r in report.rejected:
            err_console.print(f"line {r.line}: [red]rejected[/]: {r.reason}")
        console.print(f"published {report.published}, rejected {len(report.rejected)}")
    failed = bool(report.rejected)
    if wait and report.sent:
        from cardigan.cli.events import wait_for_outcomes
        from cardigan.store.guard import make_redis

        with talking_to(settings, state=True):
            outcomes = wait_for_outcomes(make_redis(state_url(settings)), settings.collection, report.sent, wait)
        for line in outcomes:
            typer.echo(line, err=as_json)  # stdout stays one JSON document with --json
        failed = failed or any(": dead: " in x or ": no outcome within " in x for x in outcomes)
    raise typer.Exit(1 if failed else 0)


def _valid(pub: Any, raw: Any) -> bool:
    from cardigan.errors import InvalidEvent

    try:
        pub.validate(raw)
        return True
    except InvalidEvent:
        return False


# -- worker -----------------------------------------------------------------------------


def worker_argv(settings: Settings, index: int, *, queues: list[str], concurrency: int, loglevel: str) -> list[str]:
    """The celery command for one worker process (threads pool: one model, many events)."""
    from workers.launch import celery_worker_argv

    return celery_worker_argv(
        queues=queues, concurrency=concurrency, prefetch=settings.worker.prefetch_multiplier,
        node=f"cardigan{index}@%h", loglevel=loglevel, task_events=True,
    )  # fmt: skip


def worker_env(processes: int, environ: Mapping[str, str], cores: int | None = None) -> dict[str, str]:
    """The workers' environment: torch's threads split between the processes, unless set.

    Why: torch starts one OpenMP thread per core in *every* process; N processes on C cores
    would run N×C threads that stall at each other's barriers (docs/performance.md)."""
    env = dict(environ)
    threads = str(max(1, (cores or os.cpu_count() or 1) // processes))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


@app.command()
def worker(
    processes: int = typer.Option(1, "--processes", "-p", min=1, help="worker processes (one model each; one per GPU or ~2 cores)"),
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", help="events in flight per process (default CARDIGAN_WORKER__CONCURRENCY)"
    ),
    queues: str | None = typer.Option(None, "--queues", "-Q", help="comma-separated queues (default: live and bulk)"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    connect_timeout: float = typer.Option(
        10, "--connect-timeout", min=0, help="seconds to wait for the broker and state Redis at start, then exit 2"
    ),
) -> None:
    """Run worker processes and restart any that die (a poison message, a crash)."""
    s = _settings()
    qs = queues.split(",") if queues else [s.queue, s.bulk_queue]
    # bounded: a shell pointed at nothing gets one line and exit 2, not endless reconnects
    attempts = max(1, int(connect_timeout // 2) + 1)
    with talking_to(s, broker=True, queues=qs, state=True, milvus=True, check=False):
        check_broker(s, attempts=attempts, interval_s=2)
        check_state(s, attempts=attempts, interval_s=2)
    argvs = [worker_argv(s, i, queues=qs, concurrency=concurrency or s.worker.concurrency, loglevel=loglevel) for i in range(processes)]
    env = worker_env(processes, os.environ)
    procs: list[subprocess.Popen[bytes]] = [subprocess.Popen(a, env=env) for a in argvs]
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stopping:
        time.sleep(0.5)
        for i, p in enumerate(procs):
            if p.poll() is not None and not stopping:
                if p.returncode == EX_CONFIG:
                    err_console.print(f"worker {i} cannot start: a configuration error (see its log above); not restarting")
                    _stop(signal.SIGTERM, None)
                    raise typer.Exit(2)
                err_console.print(f"worker {i} exited with {p.returncode}; restarting")
                procs[i] = subprocess.Popen(argvs[i], env=env)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


# -- queries ----------------------------------------------------------------------------


def _hits_out(hits: list[Any], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps([h.__dict__ for h in hits]))
        return
    t = Table(title=title)
    for col in ("rank", "product", "image", "score", "version", "category"):
        t.add_column(col)
    for i, h in enumerate(hits, 1):
        t.add_row(str(i), h.product_id, str(h.image_index), f"{h.score:.3f}", str(h.version), str(h.attributes.get("category", "")))
    console.print(t)


@app.command()
def search(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="a photo to search with"),
    k: int = typer.Option(10, "-k", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Find products that look like this photo."""
    from cardigan.imaging.localise import localiser_for
    from cardigan.ops.query import search_image
    from cardigan.store.index import Index
    from encoder import build_encoder

    s = _settings()
    with talking_to(s, milvus=True):
        index = Index.from_settings(s)
        index.live_collection()  # a missing server answers here, before the model loads
        enc = build_encoder(s.encoder)
        enc.load()
        try:
            hits = search_image(
                index, enc, image.read_bytes(), k=k, max_pixels=s.limits.max_image_pixels, localiser=localiser_for(enc, s.crop)
            )
        except CardiganError as e:
            _fail(e.reason)
    _hits_out(hits, as_json, f"products like {image.name}")


@app.command()
def similar(
    product_id: str = typer.Argument(...),
    k: int = typer.Option(10, "-k", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Products that look like this one (reads its vectors from the index)."""
    from cardigan.ops.query import similar_products
    from cardigan.store.index import Index

    s = _settings()
    with talking_to(s, milvus=True):
        index = Index.from_settings(s)
        try:
            hits = similar_products(index, product_id, k=k, max_images=s.limits.max_images)
        except CardiganError as e:
            _fail(e.reason)
    _hits_out(hits, as_json, f"similar to {product_id}")


# -- status -----------------------------------------------------------------------------


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json"),
    no_inspect: bool = typer.Option(False, "--no-inspect", help="skip asking workers (faster)"),
) -> None:
    """Queues, work in flight, dead letters and collections."""
    from cardigan.ops.status import collect_status
    from config.celery_app import create_app

    s = _settings()
    with talking_to(s, broker=True, queues=[s.queue, s.bulk_queue], state=True, milvus=True):
        st = collect_status(s, create_app(s), inspect=not no_inspect)
    if as_json:
        print(json.dumps(st))
        return
    t = Table(title=f"cardigan status ({st['broker']}, {st['milvus']})", show_header=False)
    t.add_column("what")
    t.add_column("value")
    for q, n in st["queues"].items():
        t.add_row(f"queue {q}", str(n))
    if "in_flight" in st:
        f = st["in_flight"]
        t.add_row("workers online", ", ".join(f["workers"]) or "none")
        t.add_row("in flight", f"{f['active']} active, {f['reserved']} prefetched, {f['scheduled']} waiting to retry")
    t.add_row(
        "dead letters",
        str(st["dead_letters"]) + (f" ({st['dead_letters_dropped']} dropped by cap/retention)" if st.get("dead_letters_dropped") else ""),
    )
    if mem := st.get("redis_memory"):
        from cardigan.ops.status import format_memory

        t.add_row("redis memory", format_memory(mem))
    t.add_row("alias", f"{st['alias']} -> {st['live_collection']}")
    t.add_row("write targets", ", ".join(st["write_targets"]))
    if rx := st.get("reindex"):
        t.add_row("reindex", f"{rx.get('phase')}: {rx.get('old')} -> {rx.get('new')}, {rx.get('done')}/{rx.get('total')} products")
    if dp := st.get("duplicates"):
        lag = f"lag p50 {dp['lag_p50_ms']} ms, p99 {dp['lag_p99_ms']} ms" if dp["lag_p99_ms"] is not None else "no lag sample yet"
        t.add_row(
            "double listings",
            f"{dp['groups_open']} group(s) open, {dp['pairs_open']} pair(s); {dp['pending']} product(s) waiting; {lag}; {dp['failures']} failed batch(es)",
        )
    for name, c in st["collections"].items():
        t.add_row(f"collection {name}", _n(c["rows"], "vector") + (" (live)" if c["live"] else ""))
    t.add_row("drained", "yes" if st["drained"] else "no")
    console.print(t)


# -- dead letters -----------------------------------------------------------------------


def _n(n: int, noun: str) -> str:
    """``1 vector``, ``2 vectors``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _dead_letters() -> Any:
    """The dead letters in the state Redis, after saying where that is (exit 2 if it is down)."""
    from cardigan.store.deadletter import DeadLetters
    from cardigan.store.guard import make_redis

    s = _settings()
    with talking_to(s, state=True):
        pass
    return DeadLetters(make_redis(state_url(s)))


@dead_app.command("list")
def dead_list(as_json: bool = typer.Option(False, "--json"), limit: int = typer.Option(100, min=1)) -> None:
    """Dead letters, oldest first: what was received, why it failed, how often, when."""
    dl = _dead_letters()
    items, total = dl.list(limit), dl.count()
    if as_json:
        print(json.dumps([d.__dict__ for d in items]))
        return
    shown = f"{total} dead letter(s)" + (f", oldest {len(items)} shown" if len(items) < total else "")
    t = Table(title=shown)
    t.add_column("id", no_wrap=True, min_width=12)  # whole: `dead show` takes it (or a unique prefix)
    for col in ("time", "event", "kind", "attempts"):
        t.add_column(col)
    t.add_column("reason", overflow="fold")
    for d in items:
        t.add_row(
            d.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.time)), _event_label(d.event), d.kind, str(d.attempts), d.reason
        )
    console.print(t)


def _event_label(event: Any) -> str:
    """``add sku-1 v3`` for an event, ``(raw message)`` for a body that never decoded."""
    if isinstance(event, dict):
        return f"{event.get('type', '?')} {event.get('product_id', '?')} v{event.get('version', '?')}"
    return "(raw message)"


def _resolve(dl: Any, ids: list[str]) -> list[str]:
    """Full ids for ids or unique prefixes (as git does); exit 1 naming the unknown or ambiguous ones."""
    from cardigan.store.deadletter import AmbiguousId

    out, missing = [], []
    for given in ids:
        try:
            full = dl.resolve(given)
        except AmbiguousId as e:
            _fail(f"dead letter id {given!r} is ambiguous: it starts {', '.join(e.matches)}; give more characters")
        if full is None:
            missing.append(given)
        else:
            out.append(full)
    if missing:
        _fail(f"no dead letter {', '.join(map(repr, missing))}; `cardigan dead list` shows the ids")
    return out


@dead_app.command("show")
def dead_show(dead_id: str = typer.Argument(..., help="an id from `cardigan dead list`, or a unique prefix of one")) -> None:
    """One dead letter in full, with its event."""
    dl = _dead_letters()
    d = dl.get(_resolve(dl, [dead_id])[0])
    if d is None:
        _fail(f"no dead letter {dead_id!r}; `cardigan dead list` shows the ids")
    print(json.dumps(d.__dict__, indent=2))


@dead_app.command("replay")
def dead_replay(ids: list[str] = typer.Argument(None, help="ids or unique prefixes"), all_: bool = typer.Option(False, "--all")) -> None:
    """Publish dead letters again through the normal path (the version guard included).

    A replayed event that is still invalid is kept; one that fails again in the worker comes back
    as a new dead letter. Replaying an old version after a newer one was indexed changes nothing.
    """
    from cardigan.ops.publish import Publisher

    dl = _dead_letters()
    if all_:
        items = dl.list()
    else:
        found = [dl.get(i) for i in _resolve(dl, ids or [])]
        items = [d for d in found if d is not None]
    if not items:
        _fail("nothing to replay: give ids or --all")
    s = _settings()
    with talking_to(s, broker=True):
        pass
    pub = Publisher(s)
    ok = failed = 0
    for d in items:
        event = d.event
        if isinstance(event, dict):
            # freshness is measured from the replay, not from the original publish
            event = {k: v for k, v in event.items() if k != "published_at_ms"}
        try:
            pub.publish(event)
        except CardiganError as e:
            err_console.print(f"{d.id}: still invalid, kept: {e.reason}")
            failed += 1
            continue
        except Exception as e:  # noqa: BLE001 - broker down: stop, keep the rest
            err_console.print(f"{d.id}: could not publish ({type(e).__name__}: {e}); it and the rest are kept")
            failed += len(items) - ok - failed
            break
        dl.remove([d.id])
        ok += 1
    console.print(f"replayed {ok}, kept {failed}")
    raise typer.Exit(1 if failed else 0)


@dead_app.command("purge")
def dead_purge(
    ids: list[str] = typer.Argument(None, help="only these ids or unique prefixes (default: every dead letter)"),
    yes: bool = typer.Option(False, "--yes", help="do not ask"),
) -> None:
    """Delete dead letters for good: the given ids, or all of them."""
    what = f"{len(ids)} dead letter(s)" if ids else "every dead letter"
    if not yes and not typer.confirm(f"Delete {what}?"):
        raise typer.Exit(1)
    dl = _dead_letters()
    console.print(f"purged {dl.remove(_resolve(dl, list(ids))) if ids else dl.purge()}")


# -- commands that live in their own modules (each exposes register(app)) ------------------
# one line each; heavy imports stay inside the commands so `cardigan --help` is fast
from cardigan.cli.stack import register as _register_stack  # noqa: E402

_register_stack(app)
from cardigan.cli.demo import register as _register_demo  # noqa: E402

_register_demo(app)
from cardigan.cli.reindex import register as _register_reindex  # noqa: E402

_register_reindex(app)
from cardigan.cli.train import register as _register_train  # noqa: E402

_register_train(app)
from cardigan.cli.eval import register as _register_eval  # noqa: E402

_register_eval(app)
from cardigan.cli.bench import register as _register_bench  # noqa: E402

_register_bench(app)
from cardigan.cli.events import register as _register_events  # noqa: E402

_register_events(app)
from cardigan.cli.example import register as _register_example  # noqa: E402

_register_example(app)
from cardigan.cli.serve import register as _register_serve  # noqa: E402

_register_serve(app)
from cardigan.cli.duplicates import register as _register_duplicates  # noqa: E402

_register_duplicates(app)


def main() -> None:
    try:
        app()
    except Exception as e:
        # a server that went away mid-command: the one line with the fix, not a traceback
        try:
            settings: Settings | None = load_settings()
        except Exception:  # noqa: BLE001
            settings = None
        line = exit_line(e, settings)
        if line is None:
            raise
        typer.echo(line, err=True)
        sys.exit(EX_UNREACHABLE)


if __name__ == "__main__":
    main()
