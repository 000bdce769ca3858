"""The operator's path: `cardigan worker`, `publish`, `status`, `search`, `similar` as commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cardigan.errors import IndexUnavailable
from cardigan.ops.verify import Expected, verify_index
from cardigan.store.index import Index
from tests.harness import ROOT, Namespace, wait_until
from tests.test_index_e2e import add, photo

pytestmark = pytest.mark.e2e


def cardigan(ns: Namespace, *args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **ns.env}
    return subprocess.run(
        [sys.executable, "-m", "cardigan.cli", *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_e2e_cli_worker_publish_status_search(ns: Namespace, tmp_path: Path) -> None:
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cardigan.cli", "worker", "-p", "1", "-c", "4"],
        cwd=ROOT, env={**os.environ, **ns.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        events = [add(ns, "cli-1", 1, 2), add(ns, "cli-2", 1, 1), add(ns, "cli-3", 1, 1)]
        lines = [json.dumps(e) for e in events]
        lines.insert(1, '{"type": "add", "product_id": "bad id", "version": 1}')
        lines.insert(3, "{not json")
        (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
        res = cardigan(ns, "publish", str(tmp_path / "events.jsonl"))
        assert res.returncode == 1, res.stderr  # some lines were rejected
        assert "published 3, rejected 2" in res.stdout
        assert "line 2" in res.stderr and "product_id" in res.stderr
        assert "line 4" in res.stderr and "malformed JSON" in res.stderr

        index = ns.index()
        expected = {"cli-1": Expected(1, 2), "cli-2": Expected(1, 1), "cli-3": Expected(1, 1)}
        wait_until(lambda: matches(index, expected), 120, "the CLI-published events")

        st = json.loads(cardigan(ns, "status", "--json").stdout)
        assert st["live_collection"] == f"{ns.settings.collection}_v1"
        assert st["collections"][st["live_collection"]]["rows"] == 4
        assert st["dead_letters"] == 0 and st["drained"] is True
        assert st["in_flight"]["workers"], "the worker should answer the status inspection"

        # search with a photo of cli-2: found first
        q = tmp_path / "query.jpg"
        q.write_bytes(s3_bytes(ns, events[1]["images"][0]["uri"]))
        hits = json.loads(cardigan(ns, "search", str(q), "-k", "3", "--json").stdout)
        assert hits[0]["product_id"] == "cli-2" and hits[0]["score"] > 0.99

        sim = json.loads(cardigan(ns, "similar", "cli-1", "-k", "5", "--json").stdout)
        assert {h["product_id"] for h in sim} == {"cli-2", "cli-3"}  # never itself

        bad = cardigan(ns, "similar", 'x" or product_id != "')
        assert bad.returncode == 1 and "not a valid product id" in bad.stderr
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    assert worker.returncode == 0


def matches(index: Index, expected: dict[str, Expected | None]) -> bool:
    """False until the worker has created the collection and indexed everything."""
    try:
        return verify_index(index, expected, max_images=8).ok
    except IndexUnavailable:
        return False


def s3_bytes(ns: Namespace, uri: str) -> bytes:
    bucket, _, key = uri[5:].partition("/")
    return ns.s3().get_object(Bucket=bucket, Key=key)["Body"].read()


def test_cli_publish_reads_stdin_and_reports_json(ns: Namespace) -> None:
    ev = {"type": "delete", "product_id": "stdin-1", "version": 3}
    res = cardigan(ns, "publish", "-", "--json", stdin=json.dumps(ev) + "\n\n" + '{"type":"nope","product_id":"a","version":1}\n')
    report = json.loads(res.stdout)
    assert res.returncode == 1
    assert report["published"] == 1
    assert report["rejected"] == [{"line": 3, "reason": "type: unknown event type 'nope': expected 'add', 'modify' or 'delete'"}]
    assert ns.queue_depth() == 1
    _ = photo  # the same helpers build images for both files


def test_e2e_worker_with_a_config_error_stops_instead_of_looping(ns: Namespace) -> None:
    env = {**os.environ, **ns.env, "CARDIGAN_ENCODER__BACKBONE": "no_such_net"}
    res = subprocess.run(
        [sys.executable, "-m", "cardigan.cli", "worker", "-c", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert "Unknown backbone 'no_such_net'" in res.stdout + res.stderr
    assert "configuration error" in res.stderr


def test_worker_processes_split_torch_threads_unless_told() -> None:
    from cardigan.cli import worker_env

    env = worker_env(4, {"PATH": "/bin"}, cores=16)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4" and env["PATH"] == "/bin"
    assert worker_env(3, {}, cores=2)["OMP_NUM_THREADS"] == "1"  # never 0
    assert worker_env(1, {"OMP_NUM_THREADS": "2"}, cores=16)["OMP_NUM_THREADS"] == "2"  # the operator's choice wins
