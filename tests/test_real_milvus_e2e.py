"""What only a real Milvus server shows: auth, its version string, consistency, range search.

The server is the standalone C++ binary of the ``milvus`` wheel (devkit/milvus_server.py), started
once per session by ``server_stack_env``. The pipeline's own tests run on it too: every test
marked ``real_milvus`` runs on Milvus Lite and on this server (tests/conftest.py).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from cardigan.errors import IndexUnavailable
from cardigan.store.index import Index, collection_name
from cardigan.store.schema import DIM

pytestmark = pytest.mark.e2e


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _row(pk: str, vec: np.ndarray) -> dict[str, object]:
    product, index = pk.split("#")
    return {
        "pk": pk,
        "product_id": product,
        "image_index": int(index),
        "image_uri": f"s3://catalog/{product}.jpg",
        "crop": {},
        "version": 1,
        "model_version": "test",
        "attributes": {},
        "embedding": vec.astype(np.float32).tolist(),
    }


def test_the_server_refuses_a_missing_or_wrong_token_and_says_so(server_stack_env: dict[str, str]) -> None:
    uri = server_stack_env["CARDIGAN_MILVUS_URI"]
    token = server_stack_env["CARDIGAN_MILVUS_TOKEN"]
    assert token.startswith("root:") and token != "root:Milvus"  # the stack replaced the default password
    for bad in ("", "root:Milvus", "root:wrong"):
        with pytest.raises(IndexUnavailable) as err:
            Index(uri, token=bad, alias="t_auth", timeout=5).collections()
        assert "refused the credentials" in str(err.value) and "CARDIGAN_MILVUS_TOKEN" in str(err.value), err.value
        assert token.split(":", 1)[1] not in str(err.value)


def test_a_real_server_is_not_taken_for_lite_and_its_range_search_keeps_only_close_hits(server_stack_env: dict[str, str]) -> None:
    """The range-search branch (``radius`` sent, no client-side filter) runs only on a real server."""
    alias = f"t_range_{random.randrange(1 << 30)}"
    ix = Index(server_stack_env["CARDIGAN_MILVUS_URI"], token=server_stack_env["CARDIGAN_MILVUS_TOKEN"], alias=alias)
    try:
        assert not ix.is_lite()
        name = ix.ensure()
        assert name == collection_name(alias, 1)
        assert ix.client.describe_collection(name)["consistency_level"] in (1, "Session")  # what the writer relies on
        rng = np.random.default_rng(7)
        q = _unit(rng.standard_normal(DIM))
        r = rng.standard_normal(DIM)
        ortho = _unit(r - q * float(q @ r))  # a unit vector at right angles to q
        at = {"same": 1.0, "near": 0.98, "mid": 0.90, "far": 0.30}  # cosine to q, by construction
        rows = [_row(f"{p}#0", c * q + np.sqrt(1 - c * c) * ortho) for p, c in at.items()]
        assert ix.upsert(name, rows) == len(rows)
        for radius, expect in ((0.95, {"same", "near"}), (0.85, {"same", "near", "mid"}), (0.995, {"same"})):
            [hits] = ix.range_search([q], radius, limit=8, fields=["product_id"])  # Strong: sees the upsert
            assert {h["product_id"] for h in hits} == expect, (radius, hits)
            assert all(h["score"] > radius for h in hits)
        assert ix.delete(name, ["near#0", "nobody#0"]) == 2  # a server counts what it was asked to delete
        [hits] = ix.range_search([q], 0.95, limit=8, fields=["product_id"])
        assert {h["product_id"] for h in hits} == {"same"}
    finally:
        for c in ix.collections():
            ix.drop(c)
        ix.close()


def test_stack_cli_runs_the_real_server_with_a_token_remembers_it_and_refuses_to_swap_it(tmp_path: Path) -> None:
    from tests.test_stack_cli_e2e import cardigan, exports, gone, status_json, up_json

    data_dir = tmp_path / "stack"
    try:
        info = up_json(data_dir, "--milvus", "server", "--s3", "folder")
        assert "CARDIGAN_MILVUS_TOKEN" not in info["env"]  # JSON may end up in logs: no secrets in it
        again = cardigan("stack", "up", "--data-dir", str(data_dir))  # the choice is remembered
        assert again.returncode == 0, again.stderr
        env = exports(again.stdout)
        assert env["CARDIGAN_MILVUS_URI"] == info["milvus_uri"] and env["CARDIGAN_MILVUS_TOKEN"].startswith("root:")
        secret = data_dir / "run" / "milvus.secret"
        assert secret.stat().st_mode & 0o077 == 0 and env["CARDIGAN_MILVUS_TOKEN"] == "root:" + secret.read_text().strip()
        ix = Index(env["CARDIGAN_MILVUS_URI"], token=env["CARDIGAN_MILVUS_TOKEN"], alias="t_cli")
        assert not ix.is_lite()
        ix.close()
        swap = cardigan("stack", "up", "--data-dir", str(data_dir), "--milvus", "lite")
        said = " ".join(swap.stderr.split())  # rich wraps long lines
        assert swap.returncode == 1 and "runs Milvus server, not lite" in said and "cardigan stack down" in said, said
        rc, status = status_json(data_dir)
        milvus = status["services"]["milvus"]
        assert rc == 0 and milvus["healthy"], status
        pid = milvus["pid"]
    finally:
        down = cardigan("stack", "down", "--data-dir", str(data_dir))
    assert down.returncode == 0, down.stderr
    assert gone(pid)
