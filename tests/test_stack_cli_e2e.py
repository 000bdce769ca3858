"""``cardigan stack up|down|status`` as a user runs it: a separate process, real servers."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from pymilvus import MilvusClient

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def cardigan(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cardigan.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def up_json(data_dir: Path, *extra: str) -> dict[str, Any]:
    res = cardigan("stack", "up", "--json", "--data-dir", str(data_dir), *extra)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def status_json(data_dir: Path) -> tuple[int, dict[str, Any]]:
    res = cardigan("stack", "status", "--json", "--data-dir", str(data_dir))
    return res.returncode, dict(json.loads(res.stdout))


def exports(stdout: str) -> dict[str, str]:
    """``export K=V`` lines as a dict, parsed by a real shell (so the quoting is checked too)."""
    script = stdout + '\nenv -0 | grep -z -E "^(CARDIGAN|AWS)_"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, check=True).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if item)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_stack_up_reuse_status_down(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    try:
        info = up_json(data_dir)
        for key in ("broker_url", "milvus_uri", "s3_endpoint_url", "bucket", "data_dir"):
            assert info[key], key
        assert info["reused"] == []
        assert Path(info["data_dir"]) == data_dir
        # every address is loopback and every service answers
        for url in (info["broker_url"], info["milvus_uri"], info["s3_endpoint_url"]):
            assert "://127.0.0.1:" in url, url
        assert redis.Redis.from_url(info["broker_url"]).ping()
        milvus = MilvusClient(uri=info["milvus_uri"])
        assert isinstance(milvus.list_collections(), list)
        milvus.close()
        s3 = boto3.client(
            "s3",
            endpoint_url=info["s3_endpoint_url"],
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        )
        assert info["bucket"] in {b["Name"] for b in s3.list_buckets()["Buckets"]}

        # a second up reuses the running servers: same ports, nothing restarted
        code, before = status_json(data_dir)
        assert code == 0 and before["up"] is True
        again = cardigan("stack", "up", "--data-dir", str(data_dir))
        assert again.returncode == 0, again.stderr
        env = exports(again.stdout)
        assert env["CARDIGAN_BROKER_URL"] == info["broker_url"]
        assert env["CARDIGAN_MILVUS_URI"] == info["milvus_uri"]
        assert env["CARDIGAN_S3_ENDPOINT_URL"] == info["s3_endpoint_url"]
        assert env["CARDIGAN_BUCKET"] == info["bucket"] and env["AWS_ACCESS_KEY_ID"]
        assert "reused milvus, moto, valkey" in again.stderr
        code, after = status_json(data_dir)
        assert code == 0
        assert {n: s["pid"] for n, s in after["services"].items()} == {n: s["pid"] for n, s in before["services"].items()}
        assert set(after["services"]) == {"valkey", "milvus", "moto"}
        assert all(s["healthy"] for s in after["services"].values())
        pids = [s["pid"] for s in after["services"].values()]
    finally:
        down = cardigan("stack", "down", "--json", "--data-dir", str(data_dir))
    assert down.returncode == 0, down.stderr
    assert sorted(json.loads(down.stdout)["stopped"]) == ["milvus", "moto", "valkey"]
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    code, st = status_json(data_dir)
    assert code == 1 and st["up"] is False
    assert not any(s["running"] for s in st["services"].values())
    # down again: nothing left to stop, and says so
    assert json.loads(cardigan("stack", "down", "--json", "--data-dir", str(data_dir)).stdout)["stopped"] == []


def test_stack_up_with_flower_needs_the_password(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    try:
        res = cardigan("stack", "up", "--flower", "--data-dir", str(data_dir))
        assert res.returncode == 0, res.stderr
        env = exports(res.stdout)
        code, st = status_json(data_dir)  # no --flower: remembered from up
        assert code == 0 and set(st["services"]) == {"valkey", "milvus", "moto", "flower"}
        url = f"http://127.0.0.1:{st['services']['flower']['port']}/"
        with pytest.raises(urllib.error.HTTPError) as no_auth:
            urllib.request.urlopen(url, timeout=5)
        assert no_auth.value.code == 401
        token = base64.b64encode(f"{env['CARDIGAN_FLOWER_USER']}:{env['CARDIGAN_FLOWER_PASSWORD']}".encode()).decode()
        req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        # JSON output is for logs and scripts: it carries no password
        assert "PASSWORD" not in json.dumps(up_json(data_dir))
    finally:
        down = cardigan("stack", "down", "--json", "--data-dir", str(data_dir))
    assert sorted(json.loads(down.stdout)["stopped"]) == ["flower", "milvus", "moto", "valkey"]


def test_stack_default_data_dir(tmp_path: Path) -> None:
    """``.cardigan/stack`` under the current directory, or $CARDIGAN_STACK_DIR; status starts nothing."""
    env = {k: v for k, v in os.environ.items() if k != "CARDIGAN_STACK_DIR"}
    res = cardigan("stack", "status", "--json", cwd=tmp_path, env=env)
    assert res.returncode == 1  # nothing runs
    assert Path(json.loads(res.stdout)["data_dir"]) == tmp_path / ".cardigan" / "stack"
    res = cardigan("stack", "status", "--json", cwd=tmp_path, env={**env, "CARDIGAN_STACK_DIR": str(tmp_path / "elsewhere")})
    assert Path(json.loads(res.stdout)["data_dir"]) == tmp_path / "elsewhere"
    assert not (tmp_path / "elsewhere" / "run" / "valkey.pid").exists()


def test_s3_objects_survive_down_and_up_after_concurrent_uploads(tmp_path: Path) -> None:
    """moto keeps objects by recording PUTs; parallel PUTs once interleaved the recording's lines."""
    from concurrent.futures import ThreadPoolExecutor

    data_dir = tmp_path / "stack"
    blobs = {f"photos/{i}.jpg": os.urandom(150_000 + i) for i in range(48)}
    try:
        info = up_json(data_dir)

        def client() -> Any:
            return boto3.client(
                "s3", endpoint_url=info["s3_endpoint_url"], aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
            )

        s3 = client()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket=info["bucket"], Key=kv[0], Body=kv[1]), blobs.items()))
        assert cardigan("stack", "down", "--data-dir", str(data_dir)).returncode == 0
        info = up_json(data_dir)  # a fresh moto process, restored from the recording
        assert info["reused"] == []
        s3 = client()
        for key, body in blobs.items():
            assert s3.get_object(Bucket=info["bucket"], Key=key)["Body"].read() == body, key
    finally:
        cardigan("stack", "down", "--data-dir", str(data_dir))
