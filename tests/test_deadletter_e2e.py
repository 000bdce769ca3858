"""Dead letters end to end: the operator's commands, and messages that keep killing workers.

The CLI is run as an operator runs it (``cardigan dead …`` in a subprocess with the namespace's
environment), against real servers and a real worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cardigan.ops.verify import Expected, verify_index
from tests.harness import Namespace, wait_until
from tests.test_index_e2e import add, converge, photo

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
_BIN = Path(sys.executable).with_name("cardigan")
CARDIGAN = [str(_BIN)] if _BIN.exists() else [sys.executable, "-m", "cardigan.cli"]


def cli(ns: Namespace, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    """Run ``cardigan ARGS`` as an operator would, with this namespace's environment.

    Each call starts a Python process (seconds on a busy machine): the checks in between use the
    Python API, the commands themselves are what is tested here.
    """
    env = {**os.environ, **ns.env, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([*CARDIGAN, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == rc, f"cardigan {' '.join(args)} exited {out.returncode}, wanted {rc}\n{out.stdout}\n{out.stderr}"
    return out


def dead_json(ns: Namespace) -> list[dict]:
    return json.loads(cli(ns, "dead", "list", "--json").stdout)


def test_e2e_dead_letter_commands(ns: Namespace) -> None:
    ns.start_worker()
    bucket = ns.settings.bucket
    key_a, key_b = f"later/{uuid.uuid4().hex}.jpg", f"later/{uuid.uuid4().hex}.jpg"
    missing_a = {"type": "add", "product_id": "dl-a", "version": 1, "images": [{"uri": f"s3://{bucket}/{key_a}"}]}
    missing_b_v1 = {"type": "add", "product_id": "dl-b", "version": 1, "images": [{"uri": f"s3://{bucket}/{key_b}"}]}
    corrupt = {
        "type": "add",
        "product_id": "dl-c",
        "version": 1,
        "images": [{"uri": ns.put_image("dl/corrupt.jpg", b"\xff\xd8\xff garbage")}],
    }
    t0 = time.time()
    ns.publish([missing_a, missing_b_v1, corrupt])
    # and one that no replay can fix: an id the publisher would refuse, sent by a careless producer
    ns.publisher().app.send_task(
        "cardigan.index_event", args=[{"type": "delete", "product_id": "dl d", "version": 1}], queue=ns.settings.queue
    )
    wait_until(lambda: ns.dead().count() == 4 and ns.drained(), 60, "4 dead letters")

    # list: event, reason, attempts, time
    items = {d["event"]["product_id"]: d for d in dead_json(ns)}
    assert set(items) == {"dl-a", "dl-b", "dl-c", "dl d"}
    a = items["dl-a"]
    assert a["kind"] == "missing_image" and a["field"] == "images[0].uri" and f"s3://{bucket}/{key_a} does not exist" in a["reason"]
    assert a["attempts"] == 1 and t0 - 1 <= a["time"] <= time.time() and a["event"]["version"] == 1 and a["task_id"]
    assert items["dl-c"]["kind"] == "corrupt_image" and items["dl d"]["kind"] == "invalid_event"
    table = cli(ns, "dead", "list").stdout
    assert "4 dead letter(s)" in table
    for d in items.values():
        assert d["id"] in table and d["kind"] in table
    assert "add dl-a v1" in table and "delete dl d v1" in table and "does not exist" in table

    # show: the whole record, event included
    shown = json.loads(cli(ns, "dead", "show", a["id"]).stdout)
    assert shown == a
    assert "no dead letter 'nope'" in cli(ns, "dead", "show", "nope", rc=1).stderr

    # status counts them
    st = json.loads(cli(ns, "status", "--json").stdout)
    assert st["dead_letters"] == 4 and len(st["in_flight"]["workers"]) == 1

    # meanwhile dl-b moves on to v2, which indexes
    ns.publish([add(ns, "dl-b", 2, 2, kind="modify")])
    converge(ns, {"dl-b": Expected(2, 2), "dl-a": None})

    # the operator uploads the missing photos and replays: dl-a indexes, dl-b's v1 must not regress v2
    ns.put_image(key_a, photo(11))
    ns.put_image(key_b, photo(12))
    assert "no dead letter 'nope'" in cli(ns, "dead", "replay", a["id"], "nope", rc=1).stderr
    assert ns.dead().count() == 4, "an unknown id replays nothing"
    out = cli(ns, "dead", "replay", a["id"], items["dl-b"]["id"])
    assert "replayed 2, kept 0" in out.stdout
    converge(ns, {"dl-a": Expected(1, 1), "dl-b": Expected(2, 2)})
    assert {d.product_id for d in ns.dead().list()} == {"dl-c", "dl d"}
    row = ns.index().get_product("dl-a", 8)[0]
    assert row["image_uri"] == f"s3://{bucket}/{key_a}" and row["version"] == 1

    # --all: the invalid one is kept (the publisher refuses it), the corrupt one fails again in the
    # worker and comes back as a new dead letter
    out = cli(ns, "dead", "replay", "--all", rc=1)
    assert "replayed 1, kept 1" in out.stdout and "still invalid, kept" in out.stderr and "product_id" in out.stderr
    wait_until(lambda: ns.dead().count() == 2 and ns.drained(), 60, "the corrupt event to die again")
    again = {d.product_id: d.__dict__ for d in ns.dead().list()}
    assert again["dl d"]["id"] == items["dl d"]["id"] and again["dl-c"]["id"] != items["dl-c"]["id"]
    assert again["dl-c"]["kind"] == "corrupt_image" and "published_at_ms" in again["dl-c"]["event"]
    assert (
        again["dl-c"]["event"]["published_at_ms"] >= int(t0 * 1000)
        and again["dl-c"]["event"]["published_at_ms"] > items["dl-c"]["event"]["published_at_ms"]
    )

    # purge: one by id, then the rest
    assert "purged 1" in cli(ns, "dead", "purge", again["dl d"]["id"], "--yes").stdout
    assert [d.product_id for d in ns.dead().list()] == ["dl-c"]
    assert "purged 1" in cli(ns, "dead", "purge", "--yes").stdout
    assert dead_json(ns) == []
    assert json.loads(cli(ns, "status", "--json", "--no-inspect").stdout)["dead_letters"] == 0
    # what was indexed stays indexed
    assert verify_index(ns.index(), {"dl-a": Expected(1, 1), "dl-b": Expected(2, 2), "dl-c": None}, max_images=8).ok


# -- poison messages ------------------------------------------------------------------------


@pytest.fixture
def tarpit() -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers: a fetch hangs until killed.

    Stands in for whatever makes an event fatal to its worker (the OOM killer, a native crash):
    the test kills the worker while it holds the event, as the kernel would.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        srv.close()


def test_e2e_poison_message_dead_lettered_after_max_deliveries(ns: Namespace, tarpit: str) -> None:
    # a killed worker's message comes back after the visibility timeout: the smallest allowed
    s = ns.set_env(CARDIGAN_BROKER_VISIBILITY_TIMEOUT_S="10")
    assert s.broker_visibility_timeout_s == 10 and s.worker.max_deliveries == 3
    worker_env = {"CARDIGAN_S3_ENDPOINT_URL": tarpit}
    (task_id,) = ns.publish([{"type": "add", "product_id": "poison-1", "version": 1, "images": [{"uri": f"s3://{s.bucket}/poison.jpg"}]}])
    key = f"cardigan:deliveries:{task_id}"  # the worker's own count, per message id
    r = ns.state()
    t0 = time.monotonic()
    for n in range(1, s.worker.max_deliveries + 1):
        w = ns.start_worker(extra_env=worker_env)
        wait_until(lambda n=n: int(r.hget(key, "starts") or 0) >= n, 60, f"delivery {n} to start")
        assert int(r.hget(key, "starts")) == n and ns.dead().count() == 0
        w.kill()  # SIGKILL while it holds the event
        w.proc.wait(10)
        assert ns.unacked() == 1, "the killed worker's message waits for redelivery"
    w = ns.start_worker(extra_env=worker_env)
    wait_until(lambda: ns.dead().count() == 1 and ns.drained(), 60, "the poison message to be dead-lettered")
    (d,) = ns.dead().list()
    assert d.kind == "poison" and d.task_id == task_id and d.product_id == "poison-1"
    assert d.attempts == s.worker.max_deliveries + 1
    assert f"delivered {s.worker.max_deliveries + 1} times without finishing" in d.reason
    assert w.alive() and not r.exists(key), "the counter goes with the message's outcome"
    elapsed = time.monotonic() - t0
    assert elapsed < 150, f"took {elapsed:.0f}s"
    # the fleet goes on: a delete needs no fetch, so it completes despite the hanging S3
    (next_id,) = ns.publish([{"type": "delete", "product_id": "poison-2", "version": 1}])
    wait_until(lambda: f"[{next_id}] succeeded" in w.log_text(), 30, "the next event")
    assert ns.dead().count() == 1
