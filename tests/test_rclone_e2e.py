"""The whole pipeline over the rclone S3 server (what ``cardigan bench`` runs by default).

The shared test stack uses moto; this module brings up its own stack with ``s3="rclone"``,
whose server verifies SigV4 signatures: the workers' presigned GETs must be right.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cardigan.ops.verify import Expected
from devkit.stack import Stack
from tests.harness import Namespace, new_namespace
from tests.test_index_e2e import add, converge, delete

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rclone_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("rclone-stack"), s3="rclone")
    with st.running():
        yield st


@pytest.fixture
def rns(rclone_stack: Stack, tmp_path) -> Iterator[Namespace]:  # noqa: ANN001
    ns = new_namespace(rclone_stack.info().env(), tmp_path)
    try:
        yield ns
    finally:
        ns.stop_workers()


def test_e2e_index_over_rclone_s3(rns: Namespace) -> None:
    w = rns.start_worker()
    missing = {"type": "add", "product_id": "r-missing", "version": 1, "images": [{"uri": f"s3://{rns.settings.bucket}/nope.jpg"}]}
    rns.publish([add(rns, "r-1", 1, 2), add(rns, "r-2", 1, 3), add(rns, "r-3", 1, 1), missing])
    rns.publish([add(rns, "r-2", 2, 1, kind="modify"), delete("r-3", 2)])
    converge(rns, {"r-1": Expected(1, 2), "r-2": Expected(2, 1), "r-3": None})
    (d,) = rns.dead().list()
    assert d.product_id == "r-missing" and d.kind == "missing_image" and "does not exist" in d.reason
    assert w.alive()
