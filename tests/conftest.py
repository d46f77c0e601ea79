from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.helpers import ImageServer, ServerProcess

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
def images() -> Iterator[ImageServer]:
    srv = ImageServer()
    try:
        yield srv
    finally:
        srv.close()
