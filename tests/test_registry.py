"""The worker registry in-process: cards in a real redis-server expire, are removed, and a broken
card or a Redis that is down is reported, never raised as something else; the embedded registry
describes the local supervisor; the 502 reason and /health's pick of the worker it describes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.http.routes.health import _primary
from server.jobs.registry import (
    KEY_PREFIX,
    EmbeddedRegistry,
    Heartbeat,
    LocalWorker,
    RedisRegistry,
    WorkerInfo,
    unavailable_reason,
    worker_name,
)
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import StoreUnavailable
from server.jobs.supervisor import Supervisor, WorkerStatus
from tests.helpers import tiny_worker_config
from tests.redis_helpers import RedisServer


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("registry")).start()
    try:
        yield server
    finally:
        server.stop()


def card(name: str, state: str = "ready", **fields: object) -> WorkerInfo:
    values: dict = {
        "name": name, "state": state, "model": "random:tiny", "device": "cpu", "dtype": "float32", "pid": 10,
        "engine_pid": 11, "current_job": None, "since": time.time(),
    }  # fmt: skip
    values.update(fields)
    return WorkerInfo(**values)


def supervisor(tmp_path: Path) -> Supervisor:
    return Supervisor(SqliteJobStore(tmp_path, ttl=60), tiny_worker_config())


def test_cards_are_listed_until_their_ttl_passes_or_they_are_removed(redis: RedisServer) -> None:
    registry = RedisRegistry(redis.url, ttl=1.0)
    registry.client.flushdb()
    registry.publish(card("b", current_job="job1"))
    registry.publish(card("a", state="loading"))
    listed = registry.workers()
    assert [w.name for w in listed] == ["a", "b"]
    assert listed[1] == card("b", current_job="job1", since=listed[1].since)
    assert unavailable_reason(listed) is None
    registry.remove("b")
    assert [w.name for w in registry.workers()] == ["a"]
    time.sleep(1.3)
    assert registry.workers() == []
    # The expired name is dropped from the set of names too, so the list does not grow without end.
    assert registry.client.smembers("beyond:workers") == set()


def test_an_unreadable_card_is_skipped(redis: RedisServer) -> None:
    registry = RedisRegistry(redis.url, ttl=5.0)
    registry.client.flushdb()
    registry.publish(card("good"))
    registry.client.sadd("beyond:workers", "bad")
    registry.client.set(KEY_PREFIX + "bad", "{not json", px=5000)
    assert [w.name for w in registry.workers()] == ["good"]


def test_a_registry_that_cannot_be_reached_is_store_unavailable(tmp_path: Path) -> None:
    down = RedisServer(tmp_path / "down").start()
    registry = RedisRegistry(down.url, ttl=5.0)
    down.kill()
    with pytest.raises(StoreUnavailable, match="registry cannot be read"):
        registry.workers()
    with pytest.raises(StoreUnavailable, match="registry cannot be written"):
        registry.publish(card("x"))


def test_heartbeat_publishes_the_local_worker_and_removes_it_on_stop(redis: RedisServer, tmp_path: Path) -> None:
    registry = RedisRegistry(redis.url, ttl=1.5)
    registry.client.flushdb()
    sup = supervisor(tmp_path)
    beat = Heartbeat(registry, LocalWorker(sup, "local", 1234), interval=0.2)
    beat.start()
    try:
        deadline = time.monotonic() + 10
        while not registry.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        (seen,) = registry.workers()
        assert (seen.name, seen.state, seen.pid, seen.model) == ("local", "starting", 1234, "random:tiny")
        sup.status.state = WorkerStatus.READY
        sup.status.in_flight["job7"], sup.status.started = 1, {"job7"}
        sup.status.info = {"device": "cpu", "dtype": "float32"}
        deadline = time.monotonic() + 10
        while registry.workers()[0].state != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
        (seen,) = registry.workers()
        assert (seen.state, seen.current_job, seen.dtype) == ("ready", "job7", "float32")
        assert seen.since >= time.time() - 10
    finally:
        beat.stop()
    assert registry.workers() == []


def test_this_nodes_own_worker_is_read_from_its_supervisor_not_from_its_last_card(
    redis: RedisServer, tmp_path: Path
) -> None:
    sup = supervisor(tmp_path)
    sup.status.state = WorkerStatus.READY
    local = LocalWorker(sup, "mine", 1234)
    registry = RedisRegistry(redis.url, ttl=5.0, local=local)
    registry.client.flushdb()
    registry.publish(local.info())
    registry.publish(card("other", state="loading"))
    sup.status.state = WorkerStatus.RESTARTING  # its engine just died: the card published says ready still
    assert [(w.name, w.state) for w in registry.workers()] == [("mine", "restarting"), ("other", "loading")]
    assert unavailable_reason(registry.workers()) == "the worker is restarting"
    registry.remove("mine")  # not published yet, or expired: this node knows its own worker all the same
    assert [w.name for w in registry.workers()] == ["mine", "other"]
    assert [w.name for w in RedisRegistry(redis.url, ttl=5.0).workers()] == ["other"]  # another node's view


def test_the_embedded_registry_describes_the_local_supervisor(tmp_path: Path) -> None:
    sup = supervisor(tmp_path)
    registry = EmbeddedRegistry(LocalWorker(sup, worker_name(None), 99))
    (only,) = registry.workers()
    assert only.state == "starting" and only.pid == 99 and only.dtype == "auto"
    assert unavailable_reason(registry.workers()) == "the worker is starting"
    sup.status.state, sup.status.error = WorkerStatus.FAILED, "OSError: no weights"
    assert unavailable_reason(registry.workers()) == "OSError: no weights"
    first = registry.workers()[0].since
    time.sleep(0.01)
    sup.status.state = WorkerStatus.READY
    assert unavailable_reason(registry.workers()) is None
    assert registry.workers()[0].since > first


def test_health_describes_a_ready_worker_this_nodes_own_first() -> None:
    assert unavailable_reason([]) == "no live worker is known"
    assert _primary([], None) is None
    cards = [card("a", state="loading"), card("b"), card("c")]
    assert _primary(cards, None).name == "b"
    assert _primary(cards, "c").name == "c"
    assert _primary(cards, "a").name == "b"  # a ready one before this node's own that is not
    assert _primary([card("a", state="failed"), card("z", state="loading")], "z").name == "z"
