"""URL inputs with several API nodes on one Redis: each input is fetched once across the nodes, also when a
node restarts while another fetches it; a node that dies mid-fetch leaves the fetch to another node after
its lease (BEYOND_RECLAIM_AFTER), or to itself restarted. A real redis-server, real `beyond serve
--no-worker` processes and a loopback image server that holds its answer until the test lets it go.

The module's two API nodes are shared by the tests in file order; a test that kills one starts it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from server.jobs.redis_store import RedisJobStore
from tests.helpers import ImageServer, ServerProcess, encode, request_body, smooth_image
from tests.redis_helpers import RedisServer

RECLAIM_AFTER = 3.0  # the lease of a fetch; held longer every third of it while the fetch goes on
PNG = encode(smooth_image(48, 48))


@dataclass
class Nodes:
    redis: RedisServer
    images: ImageServer
    apis: list[ServerProcess]
    store: RedisJobStore  # the test's own view of the shared store

    def submit(self, api: ServerProcess, path: str, gate: threading.Event | None = None) -> str:
        url = self.images.add(path, PNG, gate=gate)
        body = request_body(input_image=url)
        response = httpx.post(f"{api.url}/v2/seg-beyond", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def fetcher(self, job_id: str, submitted_to: ServerProcess) -> ServerProcess:
        """The node that holds the fetch of the job's input (its lease names its consumer: host, data folder,
        device); with no lease, the node it was submitted to."""
        holder = self.store.redis.get(f"beyond:fetch:{job_id}")
        if holder is None:
            return submitted_to
        (node,) = [api for api in self.apis if f":{api.data_dir.resolve()}:" in holder.decode()]
        return node

    def stored(self, job_id: str) -> bool:
        job = self.store.get(job_id)
        return job is not None and job.input_ready


def wait_for(predicate, timeout: float, what: str) -> float:
    """Waits until `predicate()`; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"waited {timeout} s for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def up(api: ServerProcess) -> ServerProcess:
    """Started and answering (503 without a worker: none is needed to fetch inputs)."""
    api.start()
    wait_for(lambda: api.health() is not None, 120, f"{api.url} to answer")
    return api


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    folder = tmp_path_factory.mktemp("inputs")
    redis = RedisServer(folder / "redis").start()
    images = ImageServer()
    env = {"BEYOND_REDIS_URL": redis.url, "BEYOND_RECLAIM_AFTER": str(RECLAIM_AFTER), "BEYOND_FETCH_TIMEOUT": "60"}
    apis = [ServerProcess(folder / f"api{i}", env=env, args=("--no-worker",)) for i in range(2)]
    store = RedisJobStore(redis.url, listen=False)
    try:
        for api in apis:
            up(api)
        yield Nodes(redis, images, apis, store)
    finally:
        images.close()
        for api in apis:
            api.stop()
        store.close()
        redis.stop()


def test_a_node_restarting_while_another_fetches_fetches_nothing_again(nodes: Nodes) -> None:
    a = nodes.apis[0]
    done = nodes.submit(a, "/stored.png")
    wait_for(lambda: nodes.stored(done), 30, "the first input to be stored")
    gate = threading.Event()
    held = nodes.submit(a, "/held.png", gate)
    wait_for(lambda: nodes.images.hits["/held.png"] == 1, 30, "the fetch to begin")
    fetcher = nodes.fetcher(held, a)
    other = next(api for api in nodes.apis if api is not fetcher)
    other.stop()
    up(other)  # at start it looks at every job still waiting for its input
    time.sleep(RECLAIM_AFTER)  # and then every half of RECLAIM_AFTER, for fetches whose node died
    gate.set()
    wait_for(lambda: nodes.stored(held), 30, "the held input to be stored")
    assert nodes.images.hits["/held.png"] == 1
    assert nodes.images.hits["/stored.png"] == 1


def test_a_node_killed_mid_fetch_leaves_the_fetch_to_another_after_its_lease(nodes: Nodes) -> None:
    gate = threading.Event()
    job_id = nodes.submit(nodes.apis[1], "/orphan.png", gate)
    wait_for(lambda: nodes.images.hits["/orphan.png"] == 1, 30, "the fetch to begin")
    fetcher = nodes.fetcher(job_id, nodes.apis[1])
    fetcher.kill()
    # Its lease was held longer a third of RECLAIM_AFTER ago at most: another node waits for it to run out.
    took = wait_for(lambda: nodes.images.hits["/orphan.png"] == 2, 10 * RECLAIM_AFTER, "another node's fetch")
    assert took > RECLAIM_AFTER / 2
    assert nodes.fetcher(job_id, fetcher) is not fetcher
    gate.set()
    wait_for(lambda: nodes.stored(job_id), 30, "the input to be stored")
    assert nodes.images.hits["/orphan.png"] == 2  # the dead one's, cut short, and the other's
    up(fetcher)


def test_a_node_killed_mid_fetch_and_restarted_fetches_once_more_in_all(nodes: Nodes) -> None:
    gate = threading.Event()
    job_id = nodes.submit(nodes.apis[0], "/restarted.png", gate)
    wait_for(lambda: nodes.images.hits["/restarted.png"] == 1, 30, "the fetch to begin")
    fetcher = nodes.fetcher(job_id, nodes.apis[0])
    fetcher.kill()
    up(fetcher)
    # Taken over by the restarted node (its own lease) or, if it came back after the lease, by the other.
    wait_for(lambda: nodes.images.hits["/restarted.png"] == 2, 10 * RECLAIM_AFTER, "the fetch to start again")
    time.sleep(RECLAIM_AFTER)  # time for a third fetch, had the other node also taken it
    gate.set()
    wait_for(lambda: nodes.stored(job_id), 30, "the input to be stored")
    assert nodes.images.hits["/restarted.png"] == 2
