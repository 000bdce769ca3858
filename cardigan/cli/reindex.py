"""`cardigan reindex`: the command line of cardigan/ops/reindex.py (imports it only when run)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

# -- command line ---------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    app.command(name="reindex")(reindex_command)


class _NoLiteIteratorNoise(logging.Filter):
    """Milvus Lite has no MVCC timestamp to give an iterator; pymilvus warns on every scan."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to get mvccTs" not in record.getMessage()


def reindex_command(
    from_index: bool = typer.Option(False, "--from-index", help="snapshot the live collection (the default)"),
    manifest: Path | None = typer.Option(None, "--manifest", dir_okay=False, help="snapshot from a JSON-lines file of events"),
    s3_prefix: str | None = typer.Option(None, "--s3-prefix", help="snapshot from s3://bucket/prefix/<product_id>/<image>.jpg"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted reindex where it stopped"),
    keep_old: bool = typer.Option(False, "--keep-old", help="keep the old collection after the switch (rollback)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask before starting"),
    abort: bool = typer.Option(False, "--abort", help="drop the collection being built and stop writing to it"),
    chunk: int = typer.Option(32, "--chunk", min=1, max=1000, help="products per bulk task"),
    max_in_flight: int = typer.Option(64, "--max-in-flight", min=1, help="bulk tasks published and not yet finished"),
) -> None:
    """Rebuild the index into a new collection while live events keep flowing, verify, switch."""
    import signal
    import sys

    from rich.console import Console

    from cardigan.errors import CardiganError, IndexUnavailable
    from cardigan.ops.reindex import ACTIVE_PHASES, Interrupted, Reindexer
    from cardigan.ops.snapshot import SourceSpec, count_manifest, count_s3
    from config.settings import load_settings

    err = Console(stderr=True)
    out = Console()
    logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_NoLiteIteratorNoise())

    def fail(msg: str, code: int = 1) -> None:
        err.print(f"[red]error:[/] {msg}")
        raise typer.Exit(code)

    if sum([from_index, manifest is not None, s3_prefix is not None]) > 1:
        fail("choose one source: --from-index, --manifest or --s3-prefix", 2)
    if manifest is not None and not manifest.is_file():
        fail(f"--manifest {manifest}: no such file", 2)
    try:
        settings = load_settings()
    except Exception as e:  # noqa: BLE001 - a settings error must read as one
        fail(f"configuration error: {e}", 2)
    from cardigan.reach import FIX, talking_to

    with talking_to(settings, broker=True, queues=[settings.bulk_queue], state=True, milvus=True):
        pass  # says where it talks; exit 2 with the fix when the broker or state Redis is down
    rx: Reindexer | None = None
    previous = signal.getsignal(signal.SIGINT)
    try:
        rx = Reindexer(settings)
        stop = rx.stop

        def on_sigint(_sig: int, _frame: Any) -> None:
            err.print("[yellow]stopping after the chunk in hand (Ctrl-C again to quit at once)[/]")
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGINT, on_sigint)
        st = rx.current()
        if abort:
            st = rx.abort()
            out.print(f"aborted: dropped {st['new']}; live writes go to {st['old']} alone")
            return
        if resume:
            if st.get("phase") not in ACTIVE_PHASES:
                fail(f"nothing to resume: the last reindex of {settings.collection} is {st.get('phase', 'not there')}")
            if st.get("model_version") != rx.model_version:
                fail(
                    f"this reindex builds model {st['model_version']} but these settings give {rx.model_version}: use the same CARDIGAN_ENCODER__* settings"
                )
            out.print(f"resuming: {st['old']} -> {st['new']} ({st['phase']}, {st.get('done', 0)}/{st.get('total', '?')} products)")
        else:
            spec = (
                SourceSpec("manifest", str(manifest.resolve()))
                if manifest
                else SourceSpec("s3", s3_prefix)
                if s3_prefix
                else SourceSpec("index")
            )
            if st.get("phase") in ACTIVE_PHASES:
                fail(f"a reindex into {st.get('new')} is {st['phase']}: --resume continues it, --abort drops it")
            if not yes:
                if not sys.stdin.isatty():
                    fail("not a terminal: pass --yes to start a reindex", 2)
                drop = "keep" if keep_old else "drop"
                live = rx.index.live_collection() or "(none yet)"
                if not typer.confirm(
                    f"Rebuild {settings.collection} (live: {live}) from {spec.describe()} with model {rx.model_version}, switch, and {drop} the old collection?"
                ):
                    raise typer.Exit(1)
            total = None
            if spec.kind == "manifest":
                total = count_manifest(Path(spec.arg))
            elif spec.kind == "s3":
                total = count_s3(_s3(settings), spec.arg)
            st = rx.begin(spec, keep_old=keep_old, total=total)
            out.print(f"building {st['new']} beside {st['old']} from {spec.describe()} (model {rx.model_version}); live writes go to both")

        _run(rx, chunk=chunk, max_in_flight=max_in_flight, out=out, err=err)
    except Interrupted:
        assert rx is not None
        st = rx.current()
        err.print(
            f"interrupted at {st.get('done', 0)}/{st.get('total', '?')} products ({st.get('phase')}); `cardigan reindex --resume` continues"
        )
        raise typer.Exit(130) from None
    except IndexUnavailable as e:
        typer.echo(f"cardigan: {e.reason}; {FIX}", err=True)  # one unwrapped line
        raise typer.Exit(2) from None
    except CardiganError as e:
        fail(e.reason)
    finally:
        signal.signal(signal.SIGINT, previous)
        if rx is not None:
            rx.close()


def _s3(settings: Any) -> Any:
    from cardigan.imaging.fetch import make_s3_client

    return make_s3_client(settings.s3_endpoint_url, settings.s3_region)


def _run(rx: Any, *, chunk: int, max_in_flight: int, out: Any, err: Any) -> None:
    """Fill (with a progress bar and ETA), verify, switch: from whatever phase was recorded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cardigan.ops.reindex import ReindexError

    st = rx.current()
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, transient=False,
    ) as prog:  # fmt: skip
        total = int(st.get("total") or 0) or None
        sent_bar = prog.add_task("published", total=total, completed=int(st.get("sent") or 0))
        done_bar = prog.add_task("indexed  ", total=total, completed=int(st.get("done") or 0))

        def on_progress(s: dict[str, str]) -> None:
            t = max(int(s.get("total") or 0), int(s.get("sent") or 0)) or None
            prog.update(sent_bar, completed=int(s.get("sent") or 0), total=t)
            prog.update(done_bar, completed=int(s.get("done") or 0), total=t)

        if st["phase"] == "filling":
            rx.fill(
                rx.items(st),
                chunk=chunk,
                max_in_flight=max_in_flight,
                on_progress=on_progress,
                on_reject=lambda m: err.print(f"[yellow]skipped[/] {m}"),
            )
            st = rx.current()
        if st["phase"] == "verifying":
            repaired = rx.catch_up(chunk=chunk, max_in_flight=max_in_flight, on_progress=on_progress)
            if repaired:
                err.print(f"caught up {repaired} products that changed while the snapshot was read")
    if st["phase"] == "verifying":
        chk = rx.verify()
        rx.state.update(message=chk.summary())
        if not chk.ok:
            for m in chk.mismatches[:20]:
                err.print(f"  {m}")
            raise ReindexError(
                f"{st['new']} {chk.summary()}; the alias still points at {st['old']}. Fix the cause, then `cardigan reindex --resume` "
                "verifies again, or `cardigan reindex --abort` drops the new collection"
            )
        out.print(chk.summary())
    st = rx.switch()
    kept = f"kept {st['old']}" if st.get("keep_old") == "1" else f"dropped {st['old']}"
    out.print(f"switched {rx.s.collection} -> {st['new']}; {kept}")
