from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.harness import Pipeline, bootstrap, drop_session_topics


def _reachable(address: str) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    address = bootstrap()
    if not _reachable(address):
        pytest.fail(f"no Kafka at {address}: start the local stack with `ops/stack up` (make test does)")
    return address


@pytest.fixture(scope="session", autouse=True)
def _pipeline_topics_dropped() -> Iterator[None]:
    """Set up first, so torn down last: every pipeline's processes are stopped when its topics are deleted."""
    yield
    drop_session_topics()


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap, tmp_path_factory):
    """Private topics plus one worker and the processors, shared by a module's tests."""
    p = Pipeline(tmp_path_factory.mktemp("pipeline"))
    p.start("worker-1", "worker", ZIMAGE_RENDERING_NOTE_AFTER_MS="0")  # every batch notes `rendering`, however quick
    p.start("processors", "processors", wait_ready=False)
    yield p
    p.stop_all()


@pytest.fixture
def fresh_pipeline(kafka_bootstrap, tmp_path):
    """Private topics and no processes: the test starts what it needs."""
    p = Pipeline(tmp_path)
    yield p
    p.stop_all()


def pytest_collection_modifyitems(items):
    os.environ.setdefault("ZIMAGE_BOOTSTRAP_SERVERS", bootstrap())
