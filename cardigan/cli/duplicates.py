"""``cardigan duplicates``: double listings found as the catalog changes.

``cardigan duplicates`` lists groups (connected pairs) with their best evidence, ``show`` one
product's matches, ``scan`` checks the whole index once (a catalog indexed before detection).
The workers record pairs as they write; these commands read the state Redis (and Milvus for
``scan``).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cardigan.reach import settings_or_exit, state_url, talking_to

dup_app = typer.Typer(help="Double listings: groups of products whose photos match (found at index time).", invoke_without_command=True)
console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.add_typer(dup_app, name="duplicates")


def _store(s: Any) -> Any:
    from cardigan.duplicates.pairs import PairStore
    from cardigan.store.guard import make_redis

    return PairStore(make_redis(state_url(s)), s.collection)


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dup_app.callback()
def list_groups(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="one JSON document: the groups and the detector's state"),
    min_score: float | None = typer.Option(
        None, "--min-score", min=-1.0, max=1.0, help="only pairs scoring at least this (default: every recorded pair)"
    ),
    limit: int = typer.Option(50, "--limit", min=1, help="groups shown, largest and strongest first"),
) -> None:
    """Groups of products listed more than once, with their best evidence."""
    if ctx.invoked_subcommand:
        return
    from cardigan.duplicates.groups import groups

    s = settings_or_exit()
    with talking_to(s, state=True):
        store = _store(s)
        found = groups(store.all_pairs(), min_score=-1.0 if min_score is None else min_score)
        pending, counts = store.pending(), store.counts()
    if as_json:
        print(
            json.dumps(
                {
                    "alias": s.collection,
                    "groups_open": len(found),
                    "pending": pending,
                    "counts": counts,
                    "groups": [g.as_dict() for g in found[:limit]],
                }
            )
        )
        return
    t = Table(title=f"double listings in {s.collection}: {len(found)} group(s), {pending} product(s) waiting for a check")
    for col in ("group", "size", "members", "best match", "score", "confirmed (UTC)"):
        t.add_column(col)
    for g in found[:limit]:
        b = g.best
        members = ", ".join(g.members[:6]) + (f" (+{len(g.members) - 6})" if len(g.members) > 6 else "")
        t.add_row(
            g.id,
            str(len(g.members)),
            members,
            f"{b.a} img {b.a_image} ~ {b.b} img {b.b_image}",
            f"{b.score:.4f}",
            _when(max(p.time for p in g.pairs)),
        )
    console.print(t)
    if len(found) > limit:
        err_console.print(f"{len(found) - limit} more group(s): --limit {len(found)}")


@dup_app.command("show")
def show(
    product_id: str = typer.Argument(..., help="the product whose matches to show"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """One product's matches: the other listings, the scores and the images that matched."""
    s = settings_or_exit()
    with talking_to(s, state=True):
        pairs = _store(s).pairs_of(product_id)
    rows = [
        {"product_id": p.other(product_id), "score": p.score, "image": p.a_image if p.a == product_id else p.b_image,
         "their_image": p.b_image if p.a == product_id else p.a_image, "version": p.a_version if p.a == product_id else p.b_version,
         "their_version": p.b_version if p.a == product_id else p.a_version, "time": p.time}
        for p in pairs
    ]  # fmt: skip
    if as_json:
        print(json.dumps({"product_id": product_id, "matches": rows}))
        return
    if not rows:
        console.print(f"{product_id}: no double listing recorded")
        return
    t = Table(title=f"{product_id}: {len(rows)} match(es)")
    for col in ("other listing", "score", "this image", "its image", "versions (this/its)", "confirmed (UTC)"):
        t.add_column(col)
    for m in rows:
        t.add_row(
            m["product_id"],
            f"{m['score']:.4f}",
            str(m["image"]),
            str(m["their_image"]),
            f"v{m['version']} / v{m['their_version']}",
            _when(m["time"]),
        )
    console.print(t)


@dup_app.command("scan")
def scan_command(
    restart: bool = typer.Option(False, "--restart", help="start from the first product, not where the last scan stopped"),
    batch: int = typer.Option(64, "--batch", min=1, max=1024, help="products per range search"),
    threshold: float | None = typer.Option(None, "--threshold", min=-1.0, max=1.0, help="default: CARDIGAN_DUPLICATES__THRESHOLD"),
) -> None:
    """Check every indexed product once (resumable: run it again to continue)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from cardigan.duplicates.detect import Detector
    from cardigan.duplicates.scan import scan, scan_state
    from cardigan.store.index import Index

    s = settings_or_exit()
    with talking_to(s, state=True, milvus=True):
        store = _store(s)
        index = Index.from_settings(s)
        if index.live_collection() is None:
            err_console.print(f"[red]error:[/] no index behind alias {s.collection} yet")
            raise typer.Exit(1)
        total = index.count()
        before = scan_state(store.r, s.collection)
        resumed = before is not None and not before.get("done") and not restart
        d = s.duplicates if threshold is None else s.duplicates.model_copy(update={"threshold": threshold})
        det = Detector.from_settings(index, store, d, max_images=s.limits.max_images)
        t0 = time.monotonic()
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("vectors · {task.fields[pairs]} new pair(s)"),
            TimeRemainingColumn(),
        )
        with Progress(*cols, console=err_console) as prog:
            task = prog.add_task(
                "resuming scan" if resumed else "scanning", total=total, completed=before["rows"] if resumed else 0, pairs=0
            )
            st = scan(
                det, store.r, batch=batch, restart=restart, on_progress=lambda rows, added: prog.update(task, completed=rows, pairs=added)
            )
        index.close()
    console.print(
        f"scanned {st['products']} product(s) ({st['rows']} vectors) in {time.monotonic() - t0:.1f} s: "
        f"{st['added']} pair(s) added, {st['dropped']} dropped; `cardigan duplicates` lists the groups"
    )
