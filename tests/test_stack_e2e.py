"""The embedded stack against real processes: Valkey, the Milvus Lite server, moto, Flower.

One stack is shared by the module (each server takes about a second to start); tests that
break a service put it back. Nothing here needs the Redis or RabbitMQ of the dev machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.exceptions import ClientError
from pymilvus import MilvusClient

from devkit.stack import Stack, StackError, StackInfo, free_port, wait_for


def _dead_pid() -> int:
    """A pid that belonged to a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _kill_out_of_band(stack: Stack, name: str) -> int:
    """Crash a service behind the stack's back (SIGKILL), as the OOM killer would."""
    pid = stack.status()[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        with contextlib.suppress(ChildProcessError):  # our child if this process started it
            os.waitpid(pid, os.WNOHANG)
        if _gone(pid):
            return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"{name} pid {pid} did not die")


def _s3(info: StackInfo) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint_url,
        aws_access_key_id=info.aws_access_key_id,
        aws_secret_access_key=info.aws_secret_access_key,
        region_name=info.aws_region,
    )


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def stack(stack_dir: Path) -> Iterator[Stack]:
    s = Stack(stack_dir, flower=True, flower_password="s3cret")
    try:
        yield s
    finally:
        s.down()


@pytest.fixture(scope="module")
def info(stack: Stack) -> StackInfo:
    t0 = time.monotonic()
    info = stack.up(timeout=60)
    print(f"stack up in {time.monotonic() - t0:.2f}s")
    return info


def test_up_all_healthy(stack: Stack, info: StackInfo) -> None:
    status = stack.status()
    assert set(status) == {"valkey", "milvus", "moto", "flower"}
    for name, st in status.items():
        assert st["running"] and st["healthy"], (name, st)
        assert (stack.run_dir / f"{name}.pid").read_text().strip() == str(st["pid"])
        record = json.loads((stack.run_dir / f"{name}.json").read_text())
        assert record["port"] == st["port"]
        assert Path(st["log"]).exists()

    r = redis.Redis.from_url(info.broker_url)
    assert r.ping()
    assert r.config_get("appendonly")["appendonly"] == "yes"
    assert r.config_get("appendfsync")["appendfsync"] == "everysec"
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert r.config_get("bind")["bind"] == "127.0.0.1"
    r.close()

    _s3(info).head_bucket(Bucket="catalog")

    mc = MilvusClient(uri=info.milvus_uri)
    assert isinstance(mc.list_collections(), list)
    mc.close()

    assert info.flower_url
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(info.flower_url + "/workers", timeout=5)
    assert denied.value.code == 401
    token = base64.b64encode(b"admin:s3cret").decode()
    req = urllib.request.Request(info.flower_url + "/workers", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    # The password is not on the command line for every local user to read.
    assert "s3cret" not in (stack.run_dir / "flower.json").read_text()

    env = info.env()
    assert env["CARDIGAN_BROKER_URL"] == info.broker_url
    assert env["CARDIGAN_S3_ENDPOINT_URL"] == info.s3_endpoint_url
    assert "CARDIGAN_LOCAL_ROOT" not in env
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "s3cret" not in json.dumps(info.to_json())


def test_second_up_reuses_running_services(stack: Stack, info: StackInfo) -> None:
    before = stack.status()
    t0 = time.monotonic()
    again = Stack(stack.data_dir, flower=True, flower_password="s3cret").up()
    assert time.monotonic() - t0 < 5  # probes only, nothing started
    after = stack.status()
    assert {n: (s["pid"], s["port"]) for n, s in after.items()} == {n: (s["pid"], s["port"]) for n, s in before.items()}
    assert again.to_json() == info.to_json()


def test_stale_pid_file_restarts_service_and_s3_objects_survive(stack: Stack, info: StackInfo) -> None:
    s3 = _s3(info)
    s3.put_object(Bucket="catalog", Key="p/sku-1/front.jpg", Body=b"\xff\xd8jpeg")
    s3.put_object(Bucket="catalog", Key="p/sku-2/front.jpg", Body=b"gone")
    s3.delete_object(Bucket="catalog", Key="p/sku-2/front.jpg")
    port = stack.status()["moto"]["port"]

    _kill_out_of_band(stack, "moto")
    dead = _dead_pid()
    (stack.run_dir / "moto.pid").write_text(f"{dead}\n")
    assert stack.status()["moto"]["running"] is False

    stack.up()
    st = stack.status()["moto"]
    assert st["running"] and st["healthy"] and st["pid"] != dead
    assert st["port"] == port  # the recorded port was free again: clients keep their URL
    # moto keeps nothing on disk; the stack replays its recording of writes.
    body = s3.get_object(Bucket="catalog", Key="p/sku-1/front.jpg")["Body"].read()
    assert body == b"\xff\xd8jpeg"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="catalog")["Contents"]]
    assert keys == ["p/sku-1/front.jpg"]


def test_pid_reused_by_another_program_is_not_ours(stack: Stack) -> None:
    _kill_out_of_band(stack, "flower")
    # The pid now belongs to someone else (here: this test process). It must not be
    # reported as flower, and above all not be signalled.
    (stack.run_dir / "flower.pid").write_text(f"{os.getpid()}\n")
    assert stack.status()["flower"]["running"] is False
    assert stack.stop_service("flower") is False
    stack.up()
    st = stack.status()["flower"]
    assert st["running"] and st["healthy"] and st["pid"] != os.getpid()


def test_restart_milvus_keeps_port_and_data(stack: Stack, info: StackInfo) -> None:
    mc = MilvusClient(uri=info.milvus_uri)
    mc.create_collection("stack_probe", dimension=4)
    mc.insert("stack_probe", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
    mc.close()
    port = stack.status()["milvus"]["port"]

    assert stack.stop_service("milvus") is True
    assert stack.status()["milvus"] == {
        **stack.status()["milvus"],
        "running": False,
        "healthy": False,
    }
    t0 = time.monotonic()
    stack.start_service("milvus")
    print(f"milvus restart in {time.monotonic() - t0:.2f}s")
    assert stack.status()["milvus"]["port"] == port

    mc = MilvusClient(uri=info.milvus_uri)
    assert "stack_probe" in mc.list_collections()
    mc.load_collection("stack_probe")  # released after a restart: the worker must load it
    got = mc.get("stack_probe", ids=[1])
    assert [row["id"] for row in got] == [1]
    mc.drop_collection("stack_probe")
    mc.close()


def test_restart_valkey_keeps_data_via_aof(stack: Stack, info: StackInfo) -> None:
    r = redis.Redis.from_url(info.broker_url)
    r.set("cardigan:probe", "kept")
    r.close()
    stack.stop_service("valkey")  # SIGTERM: valkey fsyncs the AOF on the way out
    stack.start_service("valkey")
    r = redis.Redis.from_url(info.broker_url)
    assert r.get("cardigan:probe") == b"kept"
    r.close()
    assert list((stack.data_dir / "valkey" / "appendonlydir").glob("*.aof"))


def test_wait_for_names_service_and_log(tmp_path: Path) -> None:
    log = tmp_path / "thing.log"
    log.write_text("starting\nFATAL: address already in use\n")
    with pytest.raises(StackError) as err:
        wait_for(lambda: False, 0.2, "thing on 127.0.0.1:1", log=log)
    assert "thing on 127.0.0.1:1" in str(err.value)
    assert "address already in use" in str(err.value)
    assert str(log) in str(err.value)


def test_down_leaves_no_processes(stack: Stack, info: StackInfo) -> None:
    pids = {n: s["pid"] for n, s in stack.status().items()}
    # A second Stack object (as a later CLI call would) holds no process handles: it must
    # still stop and reap everything by pid file.
    stopped = Stack(stack.data_dir).down()
    assert sorted(stopped) == sorted(pids)
    for name, pid in pids.items():
        assert _gone(pid), name
        assert not (stack.run_dir / f"{name}.pid").exists()
    assert Stack(stack.data_dir).down() == []
    assert not any(s["running"] for s in stack.status().values())


def test_folder_mode_has_no_moto(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "st", s3="folder")
    with stack.running() as info:
        assert info.s3_endpoint_url is None
        assert info.local_root == tmp_path / "st" / "images"
        assert info.local_root.is_dir()
        assert set(stack.status()) == {"valkey", "milvus"}
        assert not (stack.run_dir / "moto.pid").exists()
        env = info.env()
        assert env["CARDIGAN_LOCAL_ROOT"] == str(info.local_root)
        assert "CARDIGAN_S3_ENDPOINT_URL" not in env
        pids = [s["pid"] for s in stack.status().values()]
    assert all(_gone(pid) for pid in pids)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_rclone_mode_serves_signed_s3_keeps_objects_as_files_and_stops_cleanly(tmp_path: Path) -> None:
    """``--s3 rclone``: a Go S3 server over a folder. It checks signatures (moto does not), keeps
    objects as plain files (no replay needed after a restart), and goes down with the rest."""
    stack = Stack(tmp_path / "st", s3="rclone")
    with stack.running() as info:
        assert set(stack.status()) == {"valkey", "milvus", "rclone"} and all(s["healthy"] for s in stack.status().values())
        assert info.s3_endpoint_url and info.local_root is None
        s3 = _s3(info)
        s3.put_object(Bucket=info.bucket, Key="p/1.jpg", Body=b"\xff\xd8 bytes")
        assert (tmp_path / "st" / "s3data" / info.bucket / "p" / "1.jpg").read_bytes() == b"\xff\xd8 bytes"
        wrong = boto3.client(
            "s3", endpoint_url=info.s3_endpoint_url, aws_access_key_id=info.aws_access_key_id,
            aws_secret_access_key="not-the-secret", region_name=info.aws_region,
        )  # fmt: skip
        with pytest.raises(ClientError) as e:
            wrong.get_object(Bucket=info.bucket, Key="p/1.jpg")
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        cmdline = Path(f"/proc/{stack.status()['rclone']['pid']}/cmdline").read_bytes()
        assert info.aws_secret_access_key.encode() not in cmdline  # the key goes through the environment
        pids = [s["pid"] for s in stack.status().values()]
    assert all(_gone(pid) for pid in pids)
    with Stack(tmp_path / "st", s3="rclone").running() as info:  # same data dir: the object is back
        assert _s3(info).get_object(Bucket=info.bucket, Key="p/1.jpg")["Body"].read() == b"\xff\xd8 bytes"
