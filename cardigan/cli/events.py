"""``cardigan events show PRODUCT_ID``: what happened to a product's events.

Publishing is asynchronous (``published 1`` only means the broker has it), so this answers the
next question: which version is recorded, is it a tombstone, which vectors are in the index, what
did the last event do (applied, or stale and ignored) and is anything dead-lettered for it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from cardigan.reach import settings_or_exit, state_url, talking_to

events_app = typer.Typer(help="What happened to a product's events: version, tombstone, vectors, last outcome.", no_args_is_help=True)


def product_report(settings: Any, product_id: str) -> dict[str, Any]:
    """Everything recorded about one product, from the state Redis and the index."""
    from cardigan.keys import OUTCOME_KEY, TARGETS_KEY
    from cardigan.store.deadletter import DeadLetters
    from cardigan.store.guard import VersionGuard, make_redis
    from cardigan.store.index import Index

    s = settings
    r = make_redis(state_url(s))
    index = Index.from_settings(s)
    try:
        live = index.live_collection()
        targets = sorted(r.smembers(TARGETS_KEY.format(alias=s.collection))) or ([live] if live else [])  # type: ignore[arg-type]
        guard = VersionGuard(r)
        recorded = {}
        for c in targets:
            rec = guard.versions(c, [product_id])[product_id]
            recorded[c] = None if rec is None else {"version": rec[0], "kind": rec[1], "tombstone": rec[1] == "delete"}
        rows = index.get_product(product_id, s.limits.max_images) if live else []
        raw = r.get(OUTCOME_KEY.format(alias=s.collection, product_id=product_id))
        dead = [d.__dict__ for d in DeadLetters(r).list(1000) if d.product_id == product_id]
    finally:
        index.close()
        r.close()
    return {
        "product_id": product_id,
        "alias": s.collection,
        "live_collection": live,
        "recorded": recorded,
        "vectors": {
            "count": len(rows),
            "images": [int(x["image_index"]) for x in rows],
            "versions": sorted({int(x["version"]) for x in rows}),
            "model_versions": sorted({str(x["model_version"]) for x in rows}),
            "uris": [x["image_uri"] for x in rows],
        },
        "last_outcome": json.loads(raw) if raw else None,
        "dead_letters": dead,
    }


def wait_for_outcomes(r: Any, alias: str, sent: list[Any], timeout_s: float, interval_s: float = 0.5) -> list[str]:
    """One line per published event once its outcome is known (applied, stale, dead, or
    superseded by a later version), or "no outcome" for those still open at the timeout."""
    from cardigan.keys import OUTCOME_KEY
    from cardigan.store.deadletter import DeadLetters

    done: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    since = time.time() - 600  # dead letters of these events are newer (generous for clock skew)
    while True:
        open_ = [i for i in range(len(sent)) if i not in done]
        raws = r.mget([OUTCOME_KEY.format(alias=alias, product_id=sent[i].product_id) for i in open_]) if open_ else []
        dead = {d.task_id: d for d in DeadLetters(r).since(since)} if open_ else {}
        for i, raw in zip(open_, raws, strict=True):
            ev, head = sent[i], f"line {sent[i].line}: {sent[i].type} {sent[i].product_id} v{sent[i].version}"
            if ev.task_id in dead:
                d = dead[ev.task_id]
                done[i] = f"{head}: dead: {d.reason} (`cardigan dead show {d.id}`)"
                continue
            last = json.loads(raw) if raw else None
            if last is None:
                continue
            if last["version"] == ev.version and last["type"] == ev.type:
                n = last.get("vectors", 0)
                done[i] = f"{head}: {last['outcome']}" + (
                    " (an equal or newer version was already recorded: ignored)"
                    if last["outcome"] == "stale"
                    else f" ({n} vector{'' if n == 1 else 's'})"
                )
            elif last["version"] > ev.version and last.get("time", 0.0) >= ev.sent_at:
                # only a newer version processed after this publish: one recorded before it says
                # nothing yet about this event, which the worker will record as stale
                done[i] = f"{head}: superseded (v{last['version']} of it was processed since)"
        if len(done) == len(sent) or time.monotonic() > deadline:
            break
        time.sleep(interval_s)
    return [
        done.get(
            i,
            f"line {e.line}: {e.type} {e.product_id} v{e.version}: no outcome within {timeout_s:.0f} s (is a worker running? `cardigan status`)",
        )
        for i, e in enumerate(sent)
    ]


def _lines(rep: dict[str, Any], ttl_s: int) -> list[str]:
    pid, v = rep["product_id"], rep["vectors"]
    out = [f"product {pid} (alias {rep['alias']} -> {rep['live_collection'] or 'no collection yet'})"]
    if not rep["recorded"] or all(x is None for x in rep["recorded"].values()):
        out.append("recorded version: none (no event for it was applied here)")
    for c, rec in rep["recorded"].items():
        if rec is not None:
            what = "deleted (tombstone)" if rec["tombstone"] else rec["kind"]
            out.append(f"recorded version: v{rec['version']}, {what}" + (f" in {c}" if len(rep["recorded"]) > 1 else ""))
    n = v["count"]
    vec = f"vectors: {n} vector{'' if n == 1 else 's'}"
    if n:
        vec += f" (images {', '.join(map(str, v['images']))}; version {', '.join(f'v{x}' for x in v['versions'])}; model {', '.join(v['model_versions'])})"
    out.append(vec)
    last = rep["last_outcome"]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["time"]))
        why = " (an equal or newer version was already recorded: ignored)" if last["outcome"] == "stale" else ""
        out.append(f"last event: {last['type']} v{last['version']} {last['outcome']}{why} at {when}")
    else:
        out.append(f"last event: none recorded in the last {ttl_s} s")
    for d in rep["dead_letters"]:
        ev = d["event"] if isinstance(d["event"], dict) else {}
        out.append(
            f"dead letter {d['id']}: {ev.get('type', '?')} v{ev.get('version', '?')} {d['kind']}: {d['reason']} (`cardigan dead show {d['id']}`)"
        )
    return out


@events_app.command("show")
def show(
    product_id: str = typer.Argument(..., help="the product's id, as in its events"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A product's recorded version, tombstone, vectors, last outcome and dead letters."""
    from cardigan.event import PRODUCT_ID_RE

    s = settings_or_exit()
    if len(product_id) > s.limits.max_product_id_len or not PRODUCT_ID_RE.match(product_id):
        typer.echo(
            f"error: not a valid product id: {product_id!r} (letters, digits and . _ : -, at most {s.limits.max_product_id_len})", err=True
        )
        raise typer.Exit(1)
    with talking_to(s, state=True, milvus=True):
        rep = product_report(s, product_id)
    if as_json:
        print(json.dumps(rep))
        return
    for line in _lines(rep, s.worker.outcome_ttl_s):
        print(line)


def register(app: typer.Typer) -> None:
    app.add_typer(events_app, name="events")
