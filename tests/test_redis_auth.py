"""Redis as people run it: a password on the default user, ACL users, TLS with a CA of the test's own
(and mutual TLS), against a real redis-server on loopback. Every node (`beyond serve`, an API node,
`beyond worker`, the worker registry) connects the same way; a Redis that turns a node away stops it
at once, saying why; the password never shows in a log, /health or an error.

One secured redis-server serves the module: a password, ACL users and a TLS port beside the plain one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from server.jobs.contract import ImageSource, JobParams
from server.jobs.redis_connection import RedisRefused, RedisTLS, connect, probe
from server.jobs.redis_store import RedisJobStore
from server.jobs.registry import RedisRegistry, WorkerInfo
from server.jobs.store import StoreUnavailable
from tests.helpers import ROOT, ServerProcess, jpeg, request_body, smooth_image
from tests.redis_helpers import RedisServer, TestCA

# Distinct strings, so that finding one anywhere it must not be is certain.
DEFAULT_PASSWORD = "default-Pw-9f3c1"
ALICE_PASSWORD = "alice-Pw-7d20e"
CAROL_PASSWORD = "carol-Pw-51aa4"
WRONG_PASSWORD = "wrong-Pw-c0ffee"
SECRETS = (DEFAULT_PASSWORD, ALICE_PASSWORD, CAROL_PASSWORD, WRONG_PASSWORD)
# alice may use beyond's keys and channels only (what a managed Redis's per-app user looks like);
# carol none of them.
ALICE = f"alice on >{ALICE_PASSWORD} ~beyond:* &beyond:* +@all"
CAROL = f"carol on >{CAROL_PASSWORD} ~other:* &* +@all"
QUICK = {"image": smooth_image(48, 48), "left": 16, "steps": 20, "guidance_scale": 1.0}
# A refused node stops in well under the 30 s it waits for a Redis that is not up (start-up included).
PROMPT = 15.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    folder = tmp_path_factory.mktemp("secured")
    server = RedisServer(
        folder / "redis", password=DEFAULT_PASSWORD, users=(ALICE, CAROL), tls=TestCA.make(folder / "ca")
    ).start()
    try:
        yield server
    finally:
        server.stop()


def url(server: RedisServer, user: str, password: str | None, *, tls: bool = False) -> str:
    credentials = f"{user}:{password}@" if password is not None else ""
    if tls:
        return f"rediss://{credentials}127.0.0.1:{server.tls_port}/0"
    return f"redis://{credentials}127.0.0.1:{server.port}/0"


def ca_of(server: RedisServer) -> RedisTLS:
    assert server.tls is not None
    return RedisTLS(ca_file=server.tls.ca_file)


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, password=DEFAULT_PASSWORD)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a password shows in: {text[:2000]}"


# -- in-process: the connection itself ------------------------------------------------------------


@pytest.mark.parametrize(
    "user, password, tls",
    [("", DEFAULT_PASSWORD, False), ("alice", ALICE_PASSWORD, False), ("alice", ALICE_PASSWORD, True)],
    ids=["default-user-password", "acl-user", "acl-user-over-tls"],
)
def test_the_store_and_the_registry_work_with_each_way_of_logging_in(
    secured: RedisServer, user: str, password: str, tls: bool
) -> None:
    address = url(secured, user, password, tls=tls)
    # A prefix of its own (within alice's beyond:*), so the end-to-end test's worker never sees this job.
    prefix = f"beyond:auth-{user or 'default'}-{tls}:"
    store = RedisJobStore(address, wait=5, tls=ca_of(secured) if tls else None, prefix=prefix)
    try:
        job = store.create(JobParams(prompt="p"), ImageSource(), image=b"input", base64=False, owner=None)
        stored = store.get(job.id)
        assert stored is not None and stored.id == job.id and store.health() is None
    finally:
        store.close()
    registry = RedisRegistry(address, ttl=5, tls=ca_of(secured) if tls else None)
    card = WorkerInfo("w-" + (user or "default"), "ready", "random:tiny", "cpu", "fp32", 1, 2, None, time.time())
    registry.publish(card)
    assert card in registry.workers()
    registry.remove(card.name)


@pytest.mark.parametrize(
    "user, password",
    [("", WRONG_PASSWORD), ("alice", WRONG_PASSWORD), ("nobody", WRONG_PASSWORD), ("", None)],
    ids=["wrong-password", "wrong-acl-password", "unknown-user", "no-password"],
)
def test_wrong_credentials_are_refused_at_once_saying_authentication_failed(
    secured: RedisServer, user: str, password: str | None
) -> None:
    started = time.monotonic()
    with pytest.raises(RedisRefused) as refused:
        RedisJobStore(url(secured, user, password), wait=30, listen=False)
    assert time.monotonic() - started < 5
    assert "authentication failed" in str(refused.value) and f"127.0.0.1:{secured.port}" in str(refused.value)
    with pytest.raises(RedisRefused) as registry_refused:
        RedisRegistry(url(secured, user, password), ttl=5).workers()
    assert "authentication failed" in str(registry_refused.value)
    assert_no_secret(str(refused.value), str(registry_refused.value))


def test_a_certificate_from_an_unknown_ca_is_refused_at_once(secured: RedisServer, tmp_path: Path) -> None:
    other = TestCA.make(tmp_path / "other-ca")
    for tls in (None, RedisTLS(ca_file=other.ca_file)):  # the system's CAs, then another CA
        started = time.monotonic()
        with pytest.raises(RedisRefused) as refused:
            RedisJobStore(url(secured, "alice", ALICE_PASSWORD, tls=True), wait=30, listen=False, tls=tls)
        assert time.monotonic() - started < 5
        assert "certificate verification failed" in str(refused.value)
        assert "BEYOND_REDIS_CA_FILE" in str(refused.value)


def test_a_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    ca = TestCA.make(tmp_path / "ca", hosts=("127.0.0.1",))
    server = RedisServer(tmp_path / "redis", tls=ca).start()
    try:
        tls = RedisTLS(ca_file=ca.ca_file)
        store = RedisJobStore(f"rediss://127.0.0.1:{server.tls_port}/0", tls=tls, wait=5, listen=False)
        assert store.health() is None
        store.close()
        with pytest.raises(RedisRefused, match="certificate verification failed") as refused:
            RedisJobStore(f"rediss://localhost:{server.tls_port}/0", tls=tls, wait=30, listen=False)
        assert "mismatch" in str(refused.value).lower()  # the certificate names 127.0.0.1 only
    finally:
        server.stop()


def test_a_user_without_beyonds_keys_is_refused_at_once(secured: RedisServer) -> None:
    with pytest.raises(RedisRefused, match="refused a command beyond needs"):
        RedisJobStore(url(secured, "carol", CAROL_PASSWORD), wait=30, listen=False)


def test_mutual_tls_sends_the_client_certificate(secured: RedisServer, tmp_path: Path) -> None:
    assert secured.tls is not None
    ca = secured.tls
    server = RedisServer(tmp_path / "mtls", tls=ca, client_certs="yes").start()
    try:
        address = f"rediss://127.0.0.1:{server.tls_port}/0"
        store = RedisJobStore(address, tls=RedisTLS(ca.ca_file, ca.client_cert, ca.client_key), wait=5)
        try:
            assert store.health() is None and store.queued_count() == 0
        finally:
            store.close()
        # Without it the handshake fails (in TLS 1.3 the server's alert can arrive after the client wrote,
        # so the failure reads as refused or as a dropped connection).
        with pytest.raises(StoreUnavailable):
            probe(address, RedisTLS(ca.ca_file), "the job store")
    finally:
        server.stop()


def test_tls_settings_that_cannot_work_are_refused_naming_the_setting(secured: RedisServer, tmp_path: Path) -> None:
    assert secured.tls is not None
    plain = url(secured, "alice", ALICE_PASSWORD)
    with pytest.raises(ValueError, match="BEYOND_REDIS_URL must start with rediss://"):
        connect(plain, RedisTLS(ca_file=secured.tls.ca_file))
    secure = url(secured, "alice", ALICE_PASSWORD, tls=True)
    with pytest.raises(ValueError, match="BEYOND_REDIS_CA_FILE: .* is not a file"):
        connect(secure, RedisTLS(ca_file=tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="BEYOND_REDIS_CA_FILE: .* holds no PEM certificate"):
        connect(secure, RedisTLS(ca_file=secured.tls.server_key))
    with pytest.raises(ValueError, match="BEYOND_REDIS_KEY_FILE needs BEYOND_REDIS_CERT_FILE"):
        connect(secure, RedisTLS(key_file=secured.tls.client_key))
    with pytest.raises(ValueError, match="BEYOND_REDIS_URL must start with") as wrong:
        connect(f"http://alice:{ALICE_PASSWORD}@127.0.0.1:{secured.port}/0")
    assert_no_secret(str(wrong.value))


# -- real processes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "role, redis_url, expected",
    [
        (["serve"], lambda s: url(s, "", WRONG_PASSWORD), "authentication failed"),
        (["serve", "--no-worker"], lambda s: url(s, "alice", WRONG_PASSWORD), "authentication failed"),
        (["worker"], lambda s: url(s, "", None), "authentication failed"),
        (["serve", "--no-worker"], lambda s: url(s, "alice", ALICE_PASSWORD, tls=True), "certificate verification"),
    ],
    ids=["serve-wrong-password", "api-node-wrong-acl-password", "worker-no-password", "api-node-untrusted-tls"],
)
def test_a_node_that_redis_turns_away_stops_at_once_saying_why(
    secured: RedisServer, tmp_path: Path, role: list[str], redis_url, expected: str
) -> None:
    env = {**os.environ, "BEYOND_REDIS_URL": redis_url(secured), "BEYOND_LOG_LEVEL": "debug"}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "server.commands.cli", *role, "--model", "random:tiny", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr and "Redis at 127.0.0.1:" in out.stderr, out.stderr
    assert "waiting for" not in out.stderr and elapsed < PROMPT, (elapsed, out.stderr)
    assert_no_secret(out.stdout, out.stderr)


def test_an_acl_user_over_tls_runs_a_job_end_to_end_and_no_password_shows(secured: RedisServer, tmp_path: Path) -> None:
    """An API node on rediss:// as alice (with the test's CA), a worker on redis:// with the default
    user's password. Then alice's password is changed under them: /health says authentication failed."""
    assert secured.tls is not None
    common = {"BEYOND_HEARTBEAT_INTERVAL": "1", "BEYOND_LOG_LEVEL": "debug"}
    api = ServerProcess(
        tmp_path / "api",
        env={
            **common,
            "BEYOND_REDIS_URL": url(secured, "alice", ALICE_PASSWORD, tls=True),
            "BEYOND_REDIS_CA_FILE": str(secured.tls.ca_file),
        },
        args=("--no-worker",),
    ).start()
    worker = ServerProcess(
        tmp_path / "worker",
        env={**common, "BEYOND_REDIS_URL": url(secured, "", DEFAULT_PASSWORD)},
        role="worker",
        args=("--name", "w1"),
    ).start()
    bodies: list[str] = []
    try:
        api.wait_ready()  # 200 only once the registry, read over TLS, lists the worker as ready
        response = httpx.post(f"{api.url}/v2/seg-beyond", json=request_body(**QUICK), timeout=30)
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        deadline = time.monotonic() + 120
        while (result := httpx.get(f"{api.url}/v2/requests/{request_id}", timeout=10).json())["status"] not in (
            "COMPLETED",
            "FAILED",
        ):
            assert time.monotonic() < deadline, result
            time.sleep(0.1)
        assert result["status"] == "COMPLETED", result
        assert jpeg(httpx.get(result["output"], timeout=30).content).size == (48 + 16, 48)
        health = httpx.get(f"{api.url}/health", timeout=10)
        assert [card["name"] for card in health.json()["workers"]] == ["w1"]
        bodies += [response.text, health.text, httpx.get(f"{api.url}/v2/requests/nope/status", timeout=10).text]
        bodies.append(httpx.post(f"{api.url}/v2/seg-beyond", json={"prompt": 3}, timeout=10).text)

        # The password is rotated in Redis and alice's connections dropped: this node is turned away.
        with admin(secured) as client:
            client.acl_setuser("alice", enabled=True, reset_passwords=True, passwords=[f"+{WRONG_PASSWORD}"])
            client.client_kill_filter(user="alice")
        deadline = time.monotonic() + 30
        while "authentication failed" not in (health := httpx.get(f"{api.url}/health", timeout=10)).text:
            assert time.monotonic() < deadline, health.text
            time.sleep(0.2)
        assert health.status_code == 503 and "unreachable" not in health.json()["store"], health.text
        refused = httpx.post(f"{api.url}/v2/seg-beyond", json=request_body(**QUICK), timeout=30)
        assert refused.status_code == 503, refused.text
        bodies += [health.text, refused.text]
    finally:
        with admin(secured) as client:
            client.acl_setuser("alice", enabled=True, reset_passwords=True, passwords=[f"+{ALICE_PASSWORD}"])
        worker.stop()
        api.stop()
    logs = api.log_path.read_text(errors="replace") + worker.log_path.read_text(errors="replace")
    assert "authentication failed" in logs  # the refusal was logged, in these words
    assert_no_secret(logs, *bodies)
