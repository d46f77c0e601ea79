from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import ImageServer, ServerProcess, keys_file
from tests.redis_helpers import RedisServer
from tests.store_helpers import KINDS, Stores

# The in-process engine tests run tiny models: one thread avoids oversubscribing a small CI machine,
# where the test process shares its cores with the server processes it starts.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server on random:tiny for the tests that do not restart or break it."""
    proc = ServerProcess(tmp_path_factory.mktemp("server")).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def server_with_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A shared server on random:tiny with the keys of tests.helpers.KEYS (a keys file)."""
    folder = tmp_path_factory.mktemp("server-with-keys")
    proc = ServerProcess(folder / "data", env={"BEYOND_API_KEYS_FILE": str(keys_file(folder))}).start()
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def images() -> Iterator[ImageServer]:
    srv = ImageServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the in-process store tests; each test keeps to its own key prefix."""
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    """Stores of each kind in turn (SQLite in tmp_path, Redis under a fresh key prefix)."""
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    made = Stores(request.param, tmp_path, server)
    try:
        yield made
    finally:
        made.close()
