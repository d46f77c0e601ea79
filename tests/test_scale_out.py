"""Scale-out with real processes: a real redis-server, API nodes (`beyond serve --no-worker`) and
workers (`beyond worker`), all on loopback. Jobs are submitted to one node and read through another;
workers are killed, stopped and Redis is killed under them.

The module's cluster (2 API nodes, 3 workers) is shared by the tests in file order: the later ones
take workers away (SIGTERM, kill -9), each waits for what it needs first; the last adds two.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.jobs.contract import FailureKind, ImageSource, Job, JobParams, JobStatus
from server.jobs.redis_store import RedisJobStore
from server.jobs.supervisor import Supervisor
from tests.helpers import (
    LONG_JOB,
    ROOT,
    ServerProcess,
    encode,
    free_port,
    jpeg,
    request_body,
    smooth_image,
    tiny_worker_config,
)
from tests.redis_helpers import RedisServer

WORKERS = ("w1", "w2", "w3")
# Fast jobs: the tiny model, a small canvas, the fewest steps, no CFG batch.
QUICK = {"image": smooth_image(48, 48), "left": 16, "steps": 20, "guidance_scale": 1.0}
# Jobs long enough to be caught running (also the local node's): the shared long job on a larger canvas,
# 4.3 s alone on a 2-core machine that does the same 100 steps without guidance, one evaluation each, in
# 1.6 s (too close to the 1 s a test waits while its job must still run).
SLOW = {"image": smooth_image(192, 192), "left": 64, **LONG_JOB}


@dataclass
class Cluster:
    redis: RedisServer
    apis: list[ServerProcess]
    workers: dict[str, ServerProcess]
    metrics: dict[str, str]  # each worker's metrics URL (`beyond worker --metrics-port`)

    def stop(self) -> None:
        for proc in [*self.workers.values(), *self.apis]:
            proc.stop()
        self.redis.stop()


def node_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "BEYOND_REDIS_URL": redis.url,
        "BEYOND_RECLAIM_AFTER": "5",
        "BEYOND_HEARTBEAT_INTERVAL": "1",
        "BEYOND_CPU_THREADS": "1",
        **extra,
    }


def start_cluster(folder: Path, apis: int, workers: tuple[str, ...], **extra: str) -> Cluster:
    redis = RedisServer(folder / "redis").start()
    env = node_env(redis, **extra)
    api_nodes = [ServerProcess(folder / f"api{i}", env=env, args=("--no-worker",)).start() for i in range(apis)]
    ports = {name: free_port() for name in workers}
    worker_nodes = {
        name: ServerProcess(
            folder / name, env=env, role="worker", args=("--name", name, "--metrics-port", str(ports[name]))
        ).start()
        for name in workers
    }
    metrics = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
    cluster = Cluster(redis, api_nodes, worker_nodes, metrics)
    try:
        for api in api_nodes:
            api.wait_ready()
        wait_workers(api_nodes[0], lambda cards: sum(c["state"] == "ready" for c in cards) == len(workers))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def scrape(url: str) -> dict[str, float]:
    """A Prometheus page's samples by name, with their labels: 'name{label="value"}' -> value."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def worker_cards(api: ServerProcess) -> list[dict]:
    response = api.health()
    return response.json()["workers"] if response is not None else []


def wait_workers(api: ServerProcess, predicate, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cards = worker_cards(api)
        if predicate(cards):
            return cards
        time.sleep(0.2)
    raise TimeoutError(f"workers seen by {api.url}: {worker_cards(api)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("scale"), 2, WORKERS, BEYOND_PURGE_INTERVAL="1")
    try:
        yield started
    finally:
        started.stop()


def submit(api: ServerProcess, **fields: object) -> str:
    response = httpx.post(f"{api.url}/v2/seg-beyond", json=request_body(**fields), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def status(api: ServerProcess, request_id: str) -> tuple[int, dict]:
    """The status and its body; (503, {}) while the store cannot answer (Redis down)."""
    try:
        response = httpx.get(f"{api.url}/v2/requests/{request_id}/status", timeout=10)
    except httpx.HTTPError:
        return 503, {}
    return response.status_code, response.json()


def wait_status(api: ServerProcess, request_id: str, predicate, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        code, body = status(api, request_id)
        if code != 503 and predicate(body):
            return body
        time.sleep(0.1)
    raise TimeoutError(f"{request_id} on {api.url}: last status {body}")


def finished(body: dict) -> bool:
    return body.get("status") in ("COMPLETED", "FAILED")


def running_on(api: ServerProcess, request_id: str, timeout: float = 60.0) -> str:
    """The name of the worker whose card says it runs the job."""
    cards = wait_workers(api, lambda cs: any(c["current_job"] == request_id for c in cs), timeout)
    return next(c["name"] for c in cards if c["current_job"] == request_id)


@dataclass
class LocalNode:
    """A supervisor and its engine process in this process, on Redis, beside another node's store."""

    store: RedisJobStore
    other: RedisJobStore
    supervisor: Supervisor

    def submit(self, count: int) -> list[Job]:
        """`count` SLOW jobs, straight into this node's store."""
        image = encode(SLOW["image"])
        params = JobParams(prompt="x", left=SLOW["left"], **LONG_JOB)
        return [
            self.store.create(replace(params, seed=i), ImageSource(), image=image, base64=True, owner=None)
            for i in range(count)
        ]


@pytest.fixture
def local_node(redis_server: RedisServer) -> Iterator[LocalNode]:
    prefix = f"keep{time.monotonic_ns()}:"
    store = RedisJobStore(redis_server.url, prefix=prefix, reclaim_after=1.0)
    other = RedisJobStore(redis_server.url, prefix=prefix, reclaim_after=1.0)
    supervisor = Supervisor(store, tiny_worker_config(cpu_threads=1))
    supervisor.start()
    try:
        deadline = time.monotonic() + 120
        while not supervisor.ready and time.monotonic() < deadline:
            time.sleep(0.1)
        assert supervisor.ready, supervisor.status.error
        yield LocalNode(store, other, supervisor)
    finally:
        if supervisor.status.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor.status.pid, signal.SIGCONT)
        supervisor.stop()
        store.close()
        other.close()


def test_a_free_worker_gets_the_next_job_and_a_busy_one_keeps_its_own(local_node: LocalNode) -> None:
    """A busy worker does not take the next job ahead of time (it would wait there while another worker is
    free); the job it runs, through preparation, steps and finishing, is never taken for a dead one's."""
    node = local_node
    (running,) = node.submit(1)
    deadline = time.monotonic() + 60
    while (node.store.get(running.id).progress or 0) <= 0.02 and time.monotonic() < deadline:
        time.sleep(0.05)
    (waiting,) = node.submit(1)
    time.sleep(1.0)  # the busy worker has heard of it by now
    assert list(node.supervisor.status.in_flight) == [running.id]
    taken = node.other.claim_next()  # the free worker
    assert taken is not None and (taken.id, taken.attempts) == (waiting.id, 1)
    assert node.other.fail(waiting.id, "ended by the test", FailureKind.ENGINE, 1)  # this stand-in runs nothing
    stolen = []  # from here on the other node only ever finds jobs to reclaim
    while not node.store.get(running.id).finished and time.monotonic() < deadline + 120:
        if (job := node.other.claim_next()) is not None:
            stolen.append(job.id)
        time.sleep(0.2)
    final = node.store.get(running.id)
    assert not stolen, f"reclaimed from a live worker: {stolen}"
    assert (final.status, final.attempts) == (JobStatus.COMPLETED, 1)


def held_while(node: LocalNode, running: Job, timeout: float) -> tuple[list[str], float]:
    """The jobs the worker held when it first held more than `running`, and `running`'s progress then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = list(node.supervisor.status.in_flight)
        if len(held) > 1:
            return held, node.store.get(running.id).progress or 0.0
        time.sleep(0.01)
    raise TimeoutError(f"the worker never held more than {list(node.supervisor.status.in_flight)}")


def test_a_busy_worker_claims_ahead_in_its_last_steps_or_when_no_other_worker_is_idle(local_node: LocalNode) -> None:
    """Prefetch on a shared store: the next job is claimed while one denoises (so that it is prepared
    meanwhile) in the running job's last steps; sooner only when no other worker is idle."""
    node = local_node
    assert node.supervisor.others_idle is None  # nothing tells it: another worker may be idle
    first, second = node.submit(2)
    held, progress = held_while(node, first, 120)
    # Claimed ahead (the first still held), in its last steps: not while most of its steps were left.
    assert held == [first.id, second.id]
    assert progress >= 0.5, progress
    assert node.store.get(first.id).status == JobStatus.PROCESSING
    deadline = time.monotonic() + 60
    while (node.store.get(second.id).progress or 0) <= 0.02 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Every other worker busy: the next job is claimed at once, with nearly all of the running one left.
    node.supervisor.others_idle = lambda: False
    (third,) = node.submit(1)
    held, progress = held_while(node, second, 30)
    assert held == [second.id, third.id] and progress < 0.5, progress
    assert node.other.claim_next() is None  # the free stand-in finds nothing: it is held here
    for job in (second, third):
        node.store.request_cancel(job.id)
    while not node.store.get(second.id).finished and time.monotonic() < deadline + 60:
        time.sleep(0.1)
    ended = [node.store.get(job.id) for job in (first, second, third)]
    assert [(job.status, job.attempts) for job in ended] == [(JobStatus.COMPLETED, 1)] + [(JobStatus.FAILED, 1)] * 2
    # In queue order; the third, cancelled while it was held, never started.
    assert ended[0].started_at < ended[1].started_at and ended[2].started_at is None


@pytest.mark.parametrize("then", ["engine_killed", "stopped"])
def test_the_jobs_of_a_hung_engine_are_taken_over(local_node: LocalNode, then: str) -> None:
    """An engine process that is alive but silent (a hung driver; here SIGSTOP) does not keep its jobs. Once
    taken over, the job is the new attempt's: when the hung engine is then killed (its supervisor releases what
    it held) or its worker stopped (it gives back what it held), the new attempt runs on untouched."""
    node = local_node
    (job,) = node.submit(1)
    deadline = time.monotonic() + 60
    while (node.store.get(job.id).progress or 0) <= 0.02 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node.supervisor.status.pid is not None
    os.kill(node.supervisor.status.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    taken = None
    while taken is None and time.monotonic() < stopped + 10:
        taken = node.other.claim_next()
        time.sleep(0.1)
    assert taken is not None and (taken.id, taken.attempts) == (job.id, 2)
    # Silent for about reclaim_after, then left idle for reclaim_after: taken within two of them.
    assert time.monotonic() - stopped < 2.5 * node.store.reclaim_after + 1
    held = node.other.get(job.id)
    engine = node.supervisor.status.pid
    if then == "engine_killed":
        os.kill(engine, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while node.supervisor.status.pid == engine and time.monotonic() < deadline:  # a new engine: after the release
            time.sleep(0.05)
        assert node.supervisor.status.pid != engine and not node.supervisor.status.in_flight
    else:
        node.supervisor.stop()
    # Its last attempt (a release would have failed it) is still the other node's, and queued for nobody.
    assert node.other.get(job.id) == held and node.other.claim_next() is None
    assert node.other.fail(job.id, "ended by the test", FailureKind.ENGINE, taken.attempts)


@pytest.mark.parametrize("engine", ["heard_from", "silent"])
def test_a_stopped_worker_hands_its_running_job_back_unless_its_engine_was_silent(
    local_node: LocalNode, engine: str
) -> None:
    """A graceful stop gives the running job back as if never claimed (no attempt spent), once the engine and the
    loop have ended. An engine gone silent (hung, here SIGSTOP, past the time a live worker keeps its jobs alive)
    may be the job's doing: its job is released as for a death, and that attempt counts."""
    node = local_node
    (job,) = node.submit(1)
    deadline = time.monotonic() + 60
    while (node.store.get(job.id).progress or 0) <= 0.02 and time.monotonic() < deadline:
        time.sleep(0.05)
    if engine == "silent":
        assert node.supervisor.status.pid is not None
        os.kill(node.supervisor.status.pid, signal.SIGSTOP)
        time.sleep(1.5 * node.store.reclaim_after)  # well past 3/4 of it (and no node looks for work meanwhile)
    node.supervisor.stop()
    back = node.other.get(job.id)
    attempts = 0 if engine == "heard_from" else 1
    assert (back.status, back.attempts, back.progress, back.started_at) == (JobStatus.QUEUED, attempts, 0.0, None)
    taken = node.other.claim_next()
    assert taken is not None and (taken.id, taken.attempts) == (job.id, attempts + 1)


def test_thirty_jobs_on_two_api_nodes_and_three_workers(cluster: Cluster) -> None:
    a, b = cluster.apis
    health = a.health()
    assert health is not None and health.status_code == 200
    body = health.json()
    # The single-node fields stay, with every live worker beside them.
    assert {"state", "model", "device", "dtype", "worker_pid", "worker_restarts", "queued", "store"} <= set(body)
    assert body["state"] == "ready" and body["model"] == "random:tiny"
    assert sorted(c["name"] for c in body["workers"]) == list(WORKERS)
    pids = {c["name"]: c["pid"] for c in body["workers"]}
    assert pids == {name: proc.proc.pid for name, proc in cluster.workers.items()}
    assert sorted(c["name"] for c in worker_cards(b)) == list(WORKERS)  # the other node sees the same

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: (i, submit(cluster.apis[i % 2], seed=i, **QUICK)), range(30)))
    busy: set[str] = set()
    pending = dict(ids)
    deadline = time.monotonic() + 180
    while pending and time.monotonic() < deadline:
        busy |= {c["name"] for c in worker_cards(a) if c["current_job"]}
        for i, request_id in list(pending.items()):
            code, state = status(cluster.apis[(i + 1) % 2], request_id)
            if finished(state):
                assert state["status"] == "COMPLETED", state
                del pending[i]
        time.sleep(0.2)
    assert not pending, f"not finished: {pending}"
    assert busy == set(WORKERS), f"only {busy} were seen working"

    for i, request_id in ids:
        other = cluster.apis[(i + 1) % 2]
        result = httpx.get(f"{other.url}/v2/requests/{request_id}", timeout=30).json()
        assert result["status"] == "COMPLETED" and result["seeds"] == [i]
        assert result["output"].startswith(f"{other.url}/v2/requests/{request_id}/outputs/0")
        image = jpeg(httpx.get(result["output"], timeout=30).content)
        assert image.size == (48 + 16, 48)

    # v1 on an API node with no engine of its own: served by a worker, not refused with a 502.
    v1 = httpx.post(f"{b.url}/v1/seg-beyond", json=request_body(seed=5, **QUICK), timeout=120)
    assert v1.status_code == 200, v1.text
    assert jpeg(v1.content).size == (48 + 16, 48)


def test_with_every_worker_busy_one_claims_the_next_job_ahead(cluster: Cluster) -> None:
    """Prefetch across real workers: while another worker is idle a busy one leaves new jobs to it; with all
    three busy, one of them claims the next job at once (held, still QUEUED to the client), long before any
    running job ends. /metrics on an API node counts them in the stream."""
    a, b = cluster.apis
    wait_workers(a, lambda cards: sum(c["state"] == "ready" and not c["current_job"] for c in cards) == 3)
    ids = [submit(a, seed=30 + i, **SLOW) for i in range(3)]
    cards = wait_workers(b, lambda cs: sum(c["current_job"] in ids for c in cs) == 3)
    assert sorted(c["current_job"] for c in cards) == sorted(ids)  # one each: none was claimed ahead
    ahead = submit(b, seed=33, **SLOW)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = {name: scrape(url)["beyond_worker_jobs_held"] for name, url in cluster.metrics.items()}
        if sum(held.values()) == 4:
            break
        time.sleep(0.1)
    assert sorted(held.values()) == [1, 1, 2], held
    assert status(a, ahead)[1]["status"] == "QUEUED"
    assert all(status(a, request_id)[1]["status"] == "PROCESSING" for request_id in ids)
    queue = scrape(f"{a.url}/metrics")
    assert (queue["beyond_stream_length"], queue["beyond_stream_pending"], queue["beyond_queue_depth"]) == (4, 4, 1)
    assert "beyond_stream_lag" in queue and queue["beyond_queue_oldest_age_seconds"] > 0
    for request_id in [*ids, ahead]:
        assert httpx.post(f"{b.url}/v2/requests/{request_id}/cancel", timeout=30).status_code == 200
    for request_id in [*ids, ahead]:
        assert wait_status(a, request_id, finished, timeout=60)["status"] == "FAILED"
    wait_workers(a, lambda cs: not any(c["current_job"] for c in cs), timeout=30)


def test_cancel_on_the_node_that_did_not_accept_the_job(cluster: Cluster) -> None:
    a, b = cluster.apis
    wait_workers(a, lambda cards: sum(c["state"] == "ready" and not c["current_job"] for c in cards) == 3)
    # Three workers, four slow jobs: three run, one waits.
    ids = [submit(a, seed=i, **SLOW) for i in range(4)]
    wait_workers(b, lambda cards: sum(c["current_job"] in ids for c in cards) == 3)
    running = [c["current_job"] for c in worker_cards(b) if c["current_job"] in ids]
    queued = [r for r in ids if r not in running]
    assert len(queued) == 1 and status(b, queued[0])[1]["status"] == "QUEUED"
    for request_id in running:
        wait_status(b, request_id, lambda s: s.get("progress", 0) > 0.02)

    started = time.monotonic()
    for request_id in ids:
        response = httpx.post(f"{b.url}/v2/requests/{request_id}/cancel", timeout=30)
        assert response.status_code == 200, response.text
    for request_id in ids:
        final = wait_status(a, request_id, finished, timeout=60)
        assert final == {"status": "FAILED", "request_id": request_id, "error": "cancelled"}
    # Stopped at their next step, not after their hundred steps.
    assert time.monotonic() - started < 15
    cards = wait_workers(a, lambda cs: not any(c["current_job"] for c in cs), timeout=15)
    assert all(c["state"] == "ready" for c in cards)


def test_every_worker_exports_its_metrics(cluster: Cluster) -> None:
    """Each `beyond worker --metrics-port` serves its own counters and gauges: jobs, steps, busy time, the
    jobs it holds and the age of the oldest, failures and engine deaths; an API node the stream's."""
    a, b = cluster.apis
    wait_workers(a, lambda cards: sum(c["state"] == "ready" and not c["current_job"] for c in cards) == 3)
    before = {name: scrape(url) for name, url in cluster.metrics.items()}
    ids = [submit(cluster.apis[i % 2], seed=40 + i, **QUICK) for i in range(6)]
    for request_id in ids:
        assert wait_status(b, request_id, finished)["status"] == "COMPLETED"

    def grew(name: str, sample: str) -> float:
        return after[name].get(sample, 0.0) - before[name].get(sample, 0.0)

    # A job's result is stored a moment before its worker counts it: the pages are read until they settle.
    deadline = time.monotonic() + 10
    while True:
        after = {name: scrape(url) for name, url in cluster.metrics.items()}
        completed = {name: grew(name, "beyond_jobs_completed_total") for name in WORKERS}
        settled = all(page["beyond_worker_jobs_held"] == 0 for page in after.values())
        if (sum(completed.values()) >= len(ids) and settled) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(completed.values()) == len(ids), completed  # each job counted once, by the worker that ran it
    for name in WORKERS:
        page = after[name]
        assert page[f'beyond_worker_info{{name="{name}"}}'] == 1
        assert grew(name, "beyond_denoising_steps_total") == QUICK["steps"] * completed[name]
        assert grew(name, "beyond_job_inference_seconds_count") == completed[name]
        assert (grew(name, "beyond_worker_busy_seconds_total") > 0) == (completed[name] > 0)
        assert page["beyond_worker_jobs_held"] == 0 and page["beyond_worker_job_age_seconds"] == 0
        assert page["beyond_gpu_peak_memory_bytes"] == 0  # a CPU
        assert grew(name, "beyond_worker_deaths_total") == 0
    queue = scrape(f"{a.url}/metrics")
    assert (queue["beyond_stream_length"], queue["beyond_stream_pending"], queue["beyond_queue_depth"]) == (0, 0, 0)
    assert queue["beyond_queue_oldest_age_seconds"] == 0

    # A running job's age grows; cancelled, it is a failure of its worker.
    request_id = submit(a, seed=50, **SLOW)
    name = running_on(b, request_id)
    wait_status(a, request_id, lambda s: s.get("progress", 0) > 0.02)
    time.sleep(1.0)
    page = scrape(cluster.metrics[name])
    assert page["beyond_worker_jobs_held"] == 1 and page["beyond_worker_job_age_seconds"] >= 1.0
    assert httpx.post(f"{a.url}/v2/requests/{request_id}/cancel", timeout=30).status_code == 200
    wait_status(b, request_id, finished, timeout=60)
    cancelled = 'beyond_job_failures_total{reason="cancelled"}'
    deadline = time.monotonic() + 10
    while scrape(cluster.metrics[name]).get(cancelled, 0) == after[name].get(cancelled, 0):
        assert time.monotonic() < deadline, "the cancelled job was not counted"
        time.sleep(0.1)
    assert scrape(cluster.metrics[name])[cancelled] == after[name].get(cancelled, 0) + 1

    # Its engine process killed: a death, counted by the worker that restarts it.
    card = next(c for c in worker_cards(a) if c["name"] == name)
    os.kill(card["engine_pid"], signal.SIGKILL)
    wait_workers(
        a,
        lambda cs: any(
            c["name"] == name and c["state"] == "ready" and c["restarts"] == card["restarts"] + 1 for c in cs
        ),
    )
    assert scrape(cluster.metrics[name])["beyond_worker_deaths_total"] == after[name]["beyond_worker_deaths_total"] + 1


def test_sigterm_stops_a_worker_within_seconds_and_its_jobs_run_elsewhere(cluster: Cluster) -> None:
    """SIGTERM to a worker holding two jobs, the one it runs and one it claimed ahead and never started: both go
    back to the queue as if never claimed (no attempt spent), are taken by the other workers at once, and the
    stopped worker's consumer leaves the group once it holds nothing."""
    a, b = cluster.apis
    wait_workers(a, lambda cards: sum(c["state"] == "ready" and not c["current_job"] for c in cards) == 3)
    ids = [submit(a, seed=60 + i, **SLOW) for i in range(3)]
    wait_workers(b, lambda cs: sum(c["current_job"] in ids for c in cs) == 3)
    ahead = submit(b, seed=63, **SLOW)  # every worker busy: one of them claims it ahead of its turn
    deadline = time.monotonic() + 30
    while not (holding := [n for n, url in cluster.metrics.items() if scrape(url)["beyond_worker_jobs_held"] == 2]):
        assert time.monotonic() < deadline, "no worker claimed the fourth job ahead"
        time.sleep(0.1)
    (name,) = holding
    running = next(c["current_job"] for c in worker_cards(a) if c["name"] == name)
    wait_status(b, running, lambda s: s.get("progress", 0) > 0.02)
    store = RedisJobStore(cluster.redis.url, listen=False)
    try:
        assert (store.get(ahead).status, store.get(ahead).attempts) == (JobStatus.PROCESSING, 1)
        proc = cluster.workers.pop(name)
        assert proc.proc is not None
        stopping = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(15) == 0
        stopped = time.monotonic()
        assert stopped - stopping < 8, proc.log_tail()
        proc.stop()
        # Its card is removed at once; both jobs are taken at once by the other (busy) workers, well before a
        # dead worker's jobs would be (BEYOND_RECLAIM_AFTER=5).
        assert name not in [c["name"] for c in worker_cards(a)]
        while not all(store.get(job).status == JobStatus.PROCESSING for job in (running, ahead)):
            assert time.monotonic() - stopped < 5, [store.get(job) for job in (running, ahead)]
            time.sleep(0.05)
        for request_id in ids:
            if request_id != running:  # the other workers' own jobs: cancelled, so both run now
                assert httpx.post(f"{a.url}/v2/requests/{request_id}/cancel", timeout=30).status_code == 200
        for request_id in (running, ahead):
            assert wait_status(b, request_id, finished, timeout=120)["status"] == "COMPLETED"
        assert {job: store.get(job).attempts for job in (running, ahead)} == {running: 1, ahead: 1}
        log = proc.log_tail(200)
        assert f"job {running} on stop: handed back" in log and f"job {ahead} on stop: handed back" in log, log
        # Its consumer held both entries when it stopped; once they were taken, it holds nothing and is
        # forgotten by the other nodes' housekeeping (BEYOND_PURGE_INTERVAL=1).
        group = f"{store.prefix}stream"
        deadline = time.monotonic() + 20
        while any(c["name"].decode().endswith(f":{name}") for c in store.redis.xinfo_consumers(group, "workers")):
            assert time.monotonic() < deadline, store.redis.xinfo_consumers(group, "workers")
            time.sleep(0.2)
        for reader in store.redis.xinfo_consumers(group, "workers"):  # the live workers' own, if any
            assert any(reader["name"].decode().endswith(f":{live}") for live in cluster.workers), reader
    finally:
        store.close()


def test_kill_minus_nine_of_a_worker_mid_job_the_job_completes_on_another(cluster: Cluster) -> None:
    a, b = cluster.apis
    wait_workers(a, lambda cards: sum(c["state"] == "ready" for c in cards) == 2)
    request_id = submit(b, seed=12, **SLOW)
    name = running_on(a, request_id)
    wait_status(a, request_id, lambda s: s.get("progress", 0) > 0.02)
    proc = cluster.workers.pop(name)
    proc.kill()  # kill -9 of the worker node and its engine process: no goodbye, no release
    killed = time.monotonic()
    # Its card expires (3 heartbeats), and its job is reclaimed (BEYOND_RECLAIM_AFTER=5) by the other.
    wait_workers(a, lambda cards: name not in [c["name"] for c in cards], timeout=15)
    other = running_on(b, request_id, timeout=60)
    assert other != name
    final = wait_status(a, request_id, finished, timeout=120)
    assert final["status"] == "COMPLETED", final
    assert time.monotonic() - killed < 120
    result = httpx.get(f"{a.url}/v2/requests/{request_id}", timeout=30).json()
    assert jpeg(httpx.get(result["output"], timeout=30).content).size == (192 + 64, 192)


def test_redis_killed_and_restarted_from_its_append_only_file_loses_no_queued_job(cluster: Cluster) -> None:
    a, b = cluster.apis
    wait_workers(a, lambda cards: any(c["state"] == "ready" for c in cards))
    ids = [submit(cluster.apis[i % 2], seed=20 + i, **QUICK) for i in range(6)]
    cluster.redis.kill()
    # Down: the API nodes answer 503 (not 500), and /health says so.
    code, _ = status(a, ids[0])
    assert code == 503
    health = a.health()
    assert health is not None and health.status_code == 503
    time.sleep(1)
    cluster.redis.restart()
    for i, request_id in enumerate(ids):
        final = wait_status(cluster.apis[(i + 1) % 2], request_id, finished, timeout=120)
        assert final["status"] == "COMPLETED", final
    wait_workers(b, lambda cards: any(c["state"] == "ready" for c in cards), timeout=30)


def test_a_job_whose_workers_are_stopped_in_turn_while_it_runs_completes_as_its_first_attempt(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A rollout or a scale-down stops the worker running a job, then the one that took it over: each hands it
    back as if never claimed (a stop is not the job's doing), and a third worker completes it, attempt 1."""
    a, b = cluster.apis
    env = node_env(cluster.redis, BEYOND_PURGE_INTERVAL="1")
    added = {
        name: ServerProcess(tmp_path / name, env=env, role="worker", args=("--name", name)) for name in ("w4", "w5")
    }
    cluster.workers.update(added)  # stopped with the cluster, whatever happens here
    for proc in added.values():
        proc.start()
    wait_workers(a, lambda cards: sum(c["state"] == "ready" and not c["current_job"] for c in cards) >= 3)
    request_id = submit(a, seed=70, **SLOW)
    store = RedisJobStore(cluster.redis.url, listen=False)
    try:
        stopped = []
        for _ in range(2):
            name = running_on(b, request_id)
            assert name not in stopped
            wait_status(b, request_id, lambda s: s.get("progress", 0) > 0.02)
            assert store.get(request_id).attempts == 1
            proc = cluster.workers.pop(name)
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(15) == 0
            proc.stop()
            stopped.append(name)
            assert f"job {request_id} on stop: handed back" in proc.log_tail(200), proc.log_tail()
        assert running_on(a, request_id) not in stopped
        assert wait_status(b, request_id, finished, timeout=120)["status"] == "COMPLETED"
        assert store.get(request_id).attempts == 1
    finally:
        store.close()


def test_results_expire_on_every_node(tmp_path: Path) -> None:
    """Two API nodes with no worker, then a `beyond serve` with its local worker on the same Redis: its
    worker is the one the others see and use."""
    redis = RedisServer(tmp_path / "redis").start()
    env = node_env(redis, BEYOND_RESULT_TTL="3", BEYOND_PURGE_INTERVAL="1")
    apis = [ServerProcess(tmp_path / f"api{i}", env=env, args=("--no-worker",)).start() for i in range(2)]
    worker = None
    try:
        for api in apis:
            # No worker yet: not ready, and v1 says why instead of waiting.
            deadline = time.monotonic() + 120
            while (response := api.health()) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert response is not None and response.status_code == 503
            assert response.json()["workers"] == [] and response.json()["state"] == "no_workers"
            v1 = httpx.post(f"{api.url}/v1/seg-beyond", json=request_body(**QUICK), timeout=30)
            assert v1.status_code == 502 and "no live worker" in v1.json()["error"]
        worker = ServerProcess(tmp_path / "both", env={**env, "BEYOND_WORKER_NAME": "both"}).start().wait_ready()
        for api in apis:
            api.wait_ready()
            (seen,) = worker_cards(api)
            assert (seen["name"], seen["pid"], seen["state"]) == ("both", worker.proc.pid, "ready")
        assert worker_cards(worker) == worker_cards(apis[0])
        a, b = apis
        request_id = submit(a, **QUICK)
        wait_status(b, request_id, lambda s: s.get("status") == "COMPLETED", timeout=120)
        paths = [f"/v2/requests/{request_id}/status", f"/v2/requests/{request_id}"]
        output = httpx.get(f"{b.url}/v2/requests/{request_id}", timeout=30).json()["output"]
        paths.append(output.removeprefix(b.url))
        for api in [*apis, worker]:
            for path in paths:
                assert httpx.get(api.url + path, timeout=30).status_code == 200, path
        time.sleep(4.5)
        for api in [*apis, worker]:
            for path in paths:
                assert httpx.get(api.url + path, timeout=30).status_code == 404, (api.url, path)
    finally:
        for proc in [*([worker] if worker else []), *apis]:
            proc.stop()
        redis.stop()


@pytest.mark.parametrize("command", [["serve", "--no-worker"], ["worker"]])
def test_roles_that_need_redis_refuse_to_start_without_it(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BEYOND_REDIS_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "server.commands.cli", *command, "--model", "random:tiny", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().endswith("set BEYOND_REDIS_URL")
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_worker_whose_metrics_port_is_taken_stops_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "server.commands.cli", "worker", "--model", "random:tiny",
             "--data-dir", str(tmp_path), "--metrics-port", str(port)],
            cwd=ROOT,
            env={**os.environ, "BEYOND_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip() == f"beyond: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
