"""Fixtures: one embedded stack per session (real Valkey, Milvus Lite server, moto S3)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.stack import Stack, StackInfo
from tests.harness import Namespace, new_namespace


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Hardware-bound tests (marker ``cuda``) run where a GPU is and are deselected elsewhere.

    Tests on the real Milvus server run last, together: the server's coordinators use ~5-10 % of
    a core even when idle, so it is started late (a session fixture) rather than kept up for the
    whole suite.
    """
    import torch

    if not torch.cuda.is_available():
        gpu = [i for i in items if i.get_closest_marker("cuda")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [i for i in items if not i.get_closest_marker("cuda")]
    items.sort(key=_on_the_real_server)  # stable: the order within each part is kept


def _on_the_real_server(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "server_stack_env" in getattr(item, "fixturenames", ()) or any(isinstance(v, str) and v == "server" for v in params.values())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``real_milvus`` run twice: on Milvus Lite and on the real Milvus server."""
    if "milvus_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker("real_milvus"):
        metafunc.parametrize("milvus_kind", ["lite", "server"])


@pytest.fixture
def milvus_kind() -> str:
    """Which Milvus a test's namespace writes to (``real_milvus`` tests get both)."""
    return "lite"


@pytest.fixture(autouse=True)
def _seeded_rng() -> Iterator[None]:
    """Tests that draw random data draw the same data every run."""
    state = random.getstate()
    random.seed(1234)
    yield
    random.setstate(state)


@pytest.fixture
def torch_rng_isolated() -> Iterator[None]:
    """Tests may seed torch's global RNG; the next test must not notice."""
    import torch

    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small batches on 2 busy cores: two intra-op threads spin in OpenMP barriers (3-30x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    st = Stack(tmp_path_factory.mktemp("stack"))
    with st.running() as info:
        yield info


@pytest.fixture(scope="session")
def stack_env(stack: StackInfo) -> dict[str, str]:
    return stack.env()


@pytest.fixture(scope="session")
def server_stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A second stack whose Milvus is the real standalone server (devkit/milvus_server.py), with auth on."""
    st = Stack(tmp_path_factory.mktemp("server-stack"), milvus="server")
    with st.running(timeout=180) as info:
        yield info.env()


@pytest.fixture
def ns(request: pytest.FixtureRequest, milvus_kind: str, tmp_path: Path) -> Iterator[Namespace]:
    """A fresh namespace (Redis db, queues, Milvus alias) with no workers yet."""
    env = request.getfixturevalue("server_stack_env" if milvus_kind == "server" else "stack_env")
    n = new_namespace(env, tmp_path)
    try:
        yield n
    finally:
        n.stop_workers()


def local_broker_urls() -> list[str]:
    """The machine's own Redis / RabbitMQ, when present: an extra matrix, never required."""
    import socket

    urls = []
    for port, url in ((6379, "redis://127.0.0.1:6379/14"), (5672, "amqp://guest:guest@127.0.0.1:5672//")):
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                urls.append(url)
    return urls if not os.environ.get("CARDIGAN_TEST_NO_LOCAL_BROKERS") else []
