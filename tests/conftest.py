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
    """Hardware-bound tests (marker ``cuda``) run where a GPU is and are deselected elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("cuda")]


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


@pytest.fixture
def ns(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Namespace]:
    """A fresh namespace (Redis db, queues, Milvus alias) with no workers yet."""
    n = new_namespace(stack_env, tmp_path)
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
