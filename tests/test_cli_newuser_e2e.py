"""The CLI as a new user meets it: where each command talks, what to do when nothing answers,
the README's keep flow in a real shell, dead-letter id prefixes, and ``cardigan events show``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cardigan.store.deadletter import DeadLetter
from devkit.demo import demo_env, write_env_file
from devkit.stack import StackInfo
from tests.harness import ROOT, Namespace, wait_until
from tests.test_index_e2e import add, photo

pytestmark = pytest.mark.e2e

FIX = 'eval "$(cardigan stack up)"'


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cardigan(env: dict[str, str], *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "cardigan.cli", *args], cwd=ROOT, env=full, input=stdin, capture_output=True, text=True, timeout=timeout
    )


# -- no stack: one line with the fix, exit 2, never a traceback ---------------------------------


def test_every_command_without_a_stack_says_where_and_what_to_do(tmp_path: Path) -> None:
    port = closed_port()
    env = {
        "CARDIGAN_BROKER_URL": f"redis://:s3cret-pw@127.0.0.1:{port}/0",
        "CARDIGAN_STATE_URL": "",
        "CARDIGAN_MILVUS_URI": f"http://127.0.0.1:{port}",
        "CARDIGAN_COLLECTION": "shop",
    }
    query = tmp_path / "q.jpg"
    query.write_bytes(photo(1))
    event = json.dumps({"type": "delete", "product_id": "sku-1", "version": 2})
    commands: list[tuple[list[str], str, str | None]] = [
        (["publish", "-"], "broker", event),
        (["worker", "--connect-timeout", "2"], "broker", None),
        (["status"], "broker", None),
        (["search", str(query)], "Milvus server", None),
        (["similar", "demo-152"], "Milvus server", None),
        (["dead", "list"], "state Redis", None),
        (["dead", "show", "00d36066bd"], "state Redis", None),
        (["dead", "replay", "00d36066bd"], "state Redis", None),
        (["dead", "purge", "--yes"], "state Redis", None),
        (["events", "show", "sku-1"], "state Redis", None),
        (["reindex", "--yes"], "broker", None),
    ]
    for args, what, stdin in commands:
        t = time.monotonic()
        res = cardigan(env, *args, stdin=stdin)
        took = time.monotonic() - t
        said = f"cardigan {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
        assert res.returncode == 2, said
        assert "Traceback" not in res.stdout + res.stderr, said
        lines = res.stderr.strip().splitlines()
        # first it says where it talks (redacted), last the one line with the cause and the fix
        assert lines[0].startswith("cardigan: ") and f"127.0.0.1:{port}" in lines[0], said
        assert f"cannot reach the {what} at " in lines[-1] and FIX in lines[-1] and "demo.env" in lines[-1], said
        assert "s3cret-pw" not in res.stdout + res.stderr, said
        assert "published" not in res.stdout, said
        if args[0] == "worker":
            assert took < 60, f"the worker should give up after its bounded attempts, took {took:.0f}s"
    # the where line names the alias and the queue, with the password shown as ***
    res = cardigan(env, "status")
    assert f"redis://:***@127.0.0.1:{port}/0 (password ***" in res.stderr and "alias shop" in res.stderr and "cardigan.events" in res.stderr


# -- the README's keep flow, in a shell where the venv is not activated ---------------------------


def test_keep_flow_env_file_in_a_plain_shell(stack: StackInfo, tmp_path: Path) -> None:
    """``source demo-out/demo.env && cardigan status`` and ``cardigan stack status``, as written.

    The env file is written by the demo's own function for a running stack (running the whole
    demo again here would cost minutes; tests/test_demo_e2e.py runs it with --keep)."""
    env_file = write_env_file(tmp_path / "demo.env", demo_env(stack), stack.data_dir)
    assert env_file.stat().st_mode & 0o077 == 0, "the env file holds keys: owner only"
    venv_bin = str(Path(sys.executable).parent)
    plain_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(venv_bin))
    plain_path = plain_path or "/usr/bin:/bin"
    shell_env = {"PATH": plain_path, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "COLUMNS": "200", "NO_COLOR": "1"}
    script = f"cd {tmp_path} && source {env_file} && command -v cardigan && cardigan status --no-inspect && cardigan stack status"
    res = subprocess.run(["bash", "-c", script], env=shell_env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[0] == str(Path(venv_bin) / "cardigan")
    # status talked to the kept stack's broker (the demo's db) and alias, and said so
    assert f"cardigan: broker {stack.broker_url.rsplit('/', 1)[0]}/1 (no password;" in res.stderr and "alias demo" in res.stderr
    assert "cardigan status" in res.stdout and "drained" in res.stdout
    # stack status looked in the kept stack's folder, not ./.cardigan/stack, and found it healthy
    assert f"stack {stack.data_dir}" in res.stdout.replace("\n", "") and "stopped" not in res.stdout
    assert res.stdout.count("healthy") == 3, res.stdout


# -- one worker: dead-letter prefixes, events show, similar's suggestion, "1 vector" -------------


def _dead(ns: Namespace, id_: str, pid: str) -> None:
    """A dead letter with a chosen id (prefix tests need ids that share a start)."""
    from dataclasses import asdict

    d = DeadLetter(
        id=id_,
        reason="images[0].uri: no such object",
        kind="missing_image",
        event={"type": "add", "product_id": pid, "version": 1},
        field="images[0].uri",
    )
    r = ns.state()
    r.hset("cardigan:dead", d.id, json.dumps(asdict(d)))
    r.zadd("cardigan:dead:by_time", {d.id: d.time})


def test_dead_letter_ids_and_prefixes(ns: Namespace) -> None:
    _dead(ns, "00d36066bd4e", "dl-1")
    _dead(ns, "00d3aaaa0000", "dl-2")
    _dead(ns, "7f0e11223344", "dl-3")
    # at 80 columns every id is printed whole
    listed = cardigan(ns.env, "dead", "list")
    assert listed.returncode == 0, listed.stderr
    for i in ("00d36066bd4e", "00d3aaaa0000", "7f0e11223344"):
        assert i in listed.stdout, listed.stdout
    assert "cardigan: state redis://" in listed.stderr
    # a unique prefix works as the id does (as in git)
    shown = cardigan(ns.env, "dead", "show", "00d36066bd")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == "00d36066bd4e"
    # an ambiguous one names the matches and does nothing
    amb = cardigan(ns.env, "dead", "purge", "--yes", "00d3")
    assert amb.returncode == 1 and "ambiguous" in amb.stderr and "00d36066bd4e" in amb.stderr and "00d3aaaa0000" in amb.stderr, amb.stderr
    assert ns.dead().count() == 3
    unknown = cardigan(ns.env, "dead", "show", "ffff")
    assert unknown.returncode == 1 and "no dead letter 'ffff'" in unknown.stderr
    purged = cardigan(ns.env, "dead", "purge", "--yes", "7f0e")
    assert purged.returncode == 0 and "purged 1" in purged.stdout, purged.stderr
    assert {d.id for d in ns.dead().list()} == {"00d36066bd4e", "00d3aaaa0000"}


def test_publish_wait_ignores_an_outcome_recorded_before_the_publish(ns: Namespace) -> None:
    """A late v1 published after v2 was applied: v2's record was there before the publish, so it
    is not the verdict (the worker will record v1 as stale); a newer version recorded after the
    publish is ("superseded"), and so is this version's own record."""
    from cardigan.cli.events import wait_for_outcomes
    from cardigan.ops.publish import Sent

    key = f"cardigan:outcome:{ns.settings.collection}:sku-1"
    now = time.time()
    late = [Sent(1, "t1", "add", "sku-1", 1, now)]
    ns.state().set(key, json.dumps({"version": 2, "type": "add", "outcome": "applied", "vectors": 1, "time": now - 2}))
    assert wait_for_outcomes(ns.state(), ns.settings.collection, late, 0.3, 0.1) == [
        "line 1: add sku-1 v1: no outcome within 0 s (is a worker running? `cardigan status`)"
    ]
    ns.state().set(key, json.dumps({"version": 3, "type": "add", "outcome": "applied", "vectors": 1, "time": now + 1}))
    assert wait_for_outcomes(ns.state(), ns.settings.collection, late, 0.3, 0.1) == [
        "line 1: add sku-1 v1: superseded (v3 of it was processed since)"
    ]
    ns.state().set(key, json.dumps({"version": 1, "type": "add", "outcome": "stale", "vectors": 0, "time": now - 5}))
    assert wait_for_outcomes(ns.state(), ns.settings.collection, late, 0.3, 0.1) == [
        "line 1: add sku-1 v1: stale (an equal or newer version was already recorded: ignored)"
    ]


def test_publish_wait_events_show_similar_hint_and_status_plural(ns: Namespace, tmp_path: Path) -> None:
    ns.start_worker(concurrency=4)
    # publish --wait reports each event's outcome: applied, or dead with its reason
    missing = {"type": "add", "product_id": "sku-9", "version": 1, "images": [{"uri": f"s3://{ns.settings.bucket}/no/such.jpg"}]}
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps(add(ns, "sku-0152", 2, 1)) + "\n" + json.dumps(missing) + "\n")
    res = cardigan(ns.env, "publish", "--wait", "120", str(first), timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr  # one event is dead
    assert "line 1: add sku-0152 v2: applied (1 vector)" in res.stdout, res.stdout
    assert "line 2: add sku-9 v1: dead: " in res.stdout and "cardigan dead show " in res.stdout, res.stdout
    # an older version arriving late is ignored, and --wait says so
    late = tmp_path / "late.jsonl"
    late.write_text(json.dumps(add(ns, "sku-0152", 1, 2, seed=1)) + "\n")
    res = cardigan(ns.env, "publish", "--wait", "120", str(late), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "line 1: add sku-0152 v1: stale (an equal or newer version was already recorded: ignored)" in res.stdout, res.stdout

    def last_outcome() -> dict | None:
        raw = ns.state().get(f"cardigan:outcome:{ns.settings.collection}:sku-0152")
        return json.loads(raw) if raw else None

    res = cardigan(ns.env, "events", "show", "sku-0152")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "recorded version: v2, upsert" in out, out
    assert "vectors: 1 vector (images 0; version v2; model " in out, out
    assert "last event: add v1 stale" in out and "ignored" in out, out
    assert f"alias {ns.settings.collection}" in res.stderr and "cardigan: state redis://" in res.stderr
    rep = json.loads(cardigan(ns.env, "events", "show", "sku-0152", "--json").stdout)
    assert rep["vectors"]["count"] == 1 and rep["last_outcome"]["outcome"] == "stale" and rep["dead_letters"] == []
    dead9 = json.loads(cardigan(ns.env, "events", "show", "sku-9", "--json").stdout)
    assert dead9["vectors"]["count"] == 0 and [d["kind"] for d in dead9["dead_letters"]] == ["missing_image"]

    # status says "1 vector", not "1 vectors"
    st = cardigan(ns.env, "status", "--no-inspect")
    assert st.returncode == 0, st.stderr
    assert "1 vector (live)" in st.stdout and "1 vectors" not in st.stdout, st.stdout

    # a mistyped id: the zero-padded one that exists is suggested
    sim = cardigan(ns.env, "similar", "sku-152")
    assert sim.returncode == 1 and "did you mean 'sku-0152'" in sim.stderr, sim.stderr

    # a delete: a tombstone and no vectors
    ns.publish([{"type": "delete", "product_id": "sku-0152", "version": 3}])
    wait_until(lambda: (last_outcome() or {}).get("version") == 3, 120, "the delete's outcome")
    out = cardigan(ns.env, "events", "show", "sku-0152").stdout
    assert "recorded version: v3, deleted (tombstone)" in out and "vectors: 0 vectors" in out and "last event: delete v3 applied" in out, (
        out
    )
    # an id that could never be valid is refused before any server is asked
    bad = cardigan(ns.env, "events", "show", 'x" or 1==1')
    assert bad.returncode == 1 and "not a valid product id" in bad.stderr


# -- the worked example for compose (and any S3): sample photos and their events ---------------


def test_example_catalog_uploads_photos_and_writes_publishable_events(ns: Namespace, tmp_path: Path) -> None:
    from cardigan.ops.verify import Expected
    from tests.test_index_e2e import converge

    bucket = f"ex-{ns.settings.queue.rsplit('.', 1)[-1]}"  # a bucket that does not exist yet
    env = {**ns.env, "CARDIGAN_BUCKET": bucket}
    res = cardigan(env, "example-catalog", "--products", "3", "--prefix", "shop")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f"cardigan: s3 {ns.settings.s3_endpoint_url} (bucket {bucket}")
    events = [json.loads(line) for line in res.stdout.splitlines()]  # stdout holds only the events
    assert [e["product_id"] for e in events] == ["shop-0001", "shop-0002", "shop-0003"]
    keys = {o["Key"] for o in ns.s3().list_objects_v2(Bucket=bucket)["Contents"]}
    uris = [i["uri"] for e in events for i in e["images"]]
    assert {u.removeprefix(f"s3://{bucket}/") for u in uris} == keys and all(k.startswith("shop/") for k in keys)
    events_file = tmp_path / "events.jsonl"
    events_file.write_text(res.stdout)
    # and they index: published as written, by a real worker
    ns.set_env(CARDIGAN_BUCKET=bucket)
    ns.start_worker(concurrency=4)
    pub = cardigan(ns.env, "publish", str(events_file))
    assert pub.returncode == 0 and "published 3, rejected 0" in pub.stdout, pub.stderr
    converge(ns, {e["product_id"]: Expected(1, len(e["images"])) for e in events})
    # an S3 that does not answer: one line, exit 2
    down = cardigan(
        {**env, "CARDIGAN_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"},
        "example-catalog",
        "-n",
        "1",
        "--out",
        str(tmp_path / "x.jsonl"),
    )
    assert down.returncode == 2 and "cannot upload to s3 http://127.0.0.1:" in down.stderr and "Traceback" not in down.stderr, down.stderr
    assert not (tmp_path / "x.jsonl").exists()
