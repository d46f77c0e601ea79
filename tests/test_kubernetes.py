"""deploy/kubernetes/ holds together, offline.

- Every manifest validates against the Kubernetes schemas of the oldest and the newest version we
  support (kubernetes-validate bundles them), and the KEDA ScaledObject against a strict schema derived
  from KEDA's CRDs (cloudcoil-models-keda), with its trigger's metadata checked against the parameters
  KEDA documents for the redis-streams scaler.
- Names, labels, ports, secrets, volumes and settings agree across the files and with the code: the
  stream the ScaledObject measures is the one the job store writes, the settings the pods get are valid
  Settings, the workers' grace period covers their hand-back on SIGTERM.
- The autoscaling metric counts what it claims, on a real Redis with the real job store, and the API's
  readiness probe, run as written, against a real API node.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import inspect
import ipaddress
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from server.jobs.contract import FailureKind, ImageSource, JobParams, JobStatus
from server.jobs.redis_store import GROUP, RedisJobStore
from server.jobs.registry import REDIS_TIMEOUT
from server.jobs.supervisor import Supervisor
from server.settings import Settings
from tests.helpers import ROOT, ServerProcess
from tests.redis_helpers import RedisServer

DEPLOY = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests are meant for, and the newest whose schemas the package bundles.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())

# The redis-streams scaler's parameters as KEDA documents them (keda.sh/docs/2.20/scalers/redis-streams/,
# "Parameter list" and the environment-variable alternatives); KEDA ignores a misspelt one silently.
REDIS_STREAMS_PARAMETERS = frozenset(
    {
        "address", "host", "port", "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
        "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
        "databaseIndex", "addressFromEnv", "hostFromEnv", "portFromEnv",
    }
)  # fmt: skip
INTEGER_PARAMETERS = frozenset(
    {"port", "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount", "databaseIndex"}
)
BOOLEAN_PARAMETERS = frozenset({"enableTLS", "unsafeSsl"})
# `beyond worker` notices SIGTERM within this long: its main loop waits on the stop event for 1 s at a time.
WORKER_SIGNAL_POLL = 1.0


# -- reading the manifests -----------------------------------------------------------------------------


@functools.cache
def parsed(name: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc)


def kustomization() -> dict[str, Any]:
    return copy.deepcopy(parsed("kustomization.yaml")[0])


def manifests() -> list[dict[str, Any]]:
    """Every object of every file the kustomization lists, in order (copies: a test may change them)."""
    return [copy.deepcopy(doc) for name in kustomization()["resources"] for doc in parsed(name)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def config_data() -> dict[str, str]:
    return one("ConfigMap", "beyond-config")["data"]


def generated_secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, as the kustomization's secretGenerator makes them."""
    made: dict[str, set[str]] = {}
    for generator in kustomization().get("secretGenerator", []):
        keys = made.setdefault(generator["name"], set())
        for entry in generator.get("files", []) + generator.get("literals", []):
            keys.add(entry.split("=", 1)[0])
    return made


def pod_env(workload: dict[str, Any], secrets: dict[str, str], fields: dict[str, str]) -> dict[str, str]:
    """The environment its container starts with: envFrom ConfigMaps, then env (values from the given
    secret values and pod fields)."""
    spec = container(workload)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("BEYOND_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def bytes_of(quantity: str) -> int:
    """A Kubernetes quantity (8Gi) or a Redis size (6gb, where gb means 1024^3) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    scale = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}[unit]
    return int(number) * scale


def strict_schema(model: type) -> dict[str, Any]:
    """The model's JSON schema with no unknown field allowed anywhere and no null where a value belongs:
    the generated models accept (and drop) fields they do not know, which would hide a misspelt one."""

    def tighten(node: Any) -> Any:
        if isinstance(node, dict):
            node = {key: tighten(value) for key, value in node.items()}
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            if "anyOf" in node:
                node["anyOf"] = [option for option in node["anyOf"] if option != {"type": "null"}]
            return node
        if isinstance(node, list):
            return [tighten(value) for value in node]
        return node

    return tighten(model.model_json_schema(by_alias=True, mode="validation"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection beyond loopback fails the test: validation must need no network."""
    real_connect = socket.socket.connect

    def loopback(host: str) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            raise AssertionError(f"a connection to {address} while validating offline")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


# -- schemas ---------------------------------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_and_nothing_else() -> None:
    listed = kustomization()["resources"]
    assert sorted(listed) == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    kinds = sorted(m["kind"] for m in manifests())
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "Service", "StatefulSet", "NetworkPolicy", "Deployment", "Service"]
        + ["PodDisruptionBudget", "Deployment", "PersistentVolumeClaim", "ScaledObject"]
    )
    # The Secret is generated from files kept out of git, and so are those files.
    assert generated_secrets() == {"beyond-secrets": {"api-keys", "webhook-secret"}}
    files = ["deploy/kubernetes/secrets/api-keys", "deploy/kubernetes/secrets/webhook-secret"]
    ignored = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == files, "the secret files must be ignored by git"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str, offline: None) -> None:
    checked = 0
    for manifest in manifests():
        if manifest["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']} on {version}: {where}: {exc.message}")
        checked += 1
    assert checked == len(manifests()) - 1


def test_the_scaled_object_validates_against_kedas_crd(offline: None) -> None:
    scaled = one("ScaledObject", "beyond-worker")
    try:
        jsonschema.validate(scaled, strict_schema(ScaledObject))
    except jsonschema.ValidationError as exc:
        pytest.fail(f"ScaledObject: {'.'.join(str(p) for p in exc.absolute_path)}: {exc.message}")
    ScaledObject.model_validate(scaled)
    # The strict schema catches a misspelt field, which the model itself drops without a word.
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicasCount": 0}}
    ScaledObject.model_validate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, strict_schema(ScaledObject))


def test_the_trigger_uses_only_documented_redis_streams_parameters() -> None:
    spec = one("ScaledObject", "beyond-worker")["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    unknown = set(meta) - REDIS_STREAMS_PARAMETERS
    assert not unknown, f"not parameters of the redis-streams scaler: {unknown}"
    assert all(isinstance(value, str) for value in meta.values()), "trigger metadata is a map of strings"
    for name in INTEGER_PARAMETERS & set(meta):
        assert re.fullmatch(r"\d+", meta[name]), f"{name}: {meta[name]!r} is not a whole number"
    for name in BOOLEAN_PARAMETERS & set(meta):
        assert meta[name] in ("true", "false"), f"{name}: {meta[name]!r}"
    # KEDA measures the stream's length only without consumerGroup (with one, pending entries or lag).
    assert "consumerGroup" not in meta and "lagCount" not in meta and "pendingEntriesCount" not in meta
    assert int(meta["streamLength"]) >= 1
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0


# -- cross-references ----------------------------------------------------------------------------------


def test_every_object_is_in_the_one_namespace() -> None:
    (namespace,) = [m["metadata"]["name"] for m in manifests() if m["kind"] == "Namespace"]
    for manifest in manifests():
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"].get("namespace") == namespace, manifest["metadata"]["name"]
    assert all(g.get("namespace") == namespace for g in kustomization()["secretGenerator"])


def test_selectors_match_the_pods_they_are_for() -> None:
    api, worker = one("Deployment", "beyond-api"), one("Deployment", "beyond-worker")
    redis_set = one("StatefulSet", "beyond-redis")
    for workload in (api, worker, redis_set):
        assert selects(workload["spec"]["selector"]["matchLabels"], pod_labels(workload))
    assert selects(one("Service", "beyond-api")["spec"]["selector"], pod_labels(api))
    assert not selects(one("Service", "beyond-api")["spec"]["selector"], pod_labels(worker))
    assert selects(one("Service", "beyond-redis")["spec"]["selector"], pod_labels(redis_set))
    assert selects(one("PodDisruptionBudget", "beyond-api")["spec"]["selector"]["matchLabels"], pod_labels(api))
    # Redis admits the API nodes and the workers, and the policy is on Redis.
    policy = one("NetworkPolicy", "beyond-redis")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(redis_set))
    peers = [peer["podSelector"]["matchLabels"] for peer in policy["ingress"][0]["from"] if "podSelector" in peer]
    assert any(selects(peer, pod_labels(api)) for peer in peers)
    assert any(selects(peer, pod_labels(worker)) for peer in peers)
    redis_port = container(redis_set)["ports"][0]
    assert [p["port"] for p in policy["ingress"][0]["ports"]] == [redis_port["name"]]


def test_services_reach_the_ports_the_containers_listen_on() -> None:
    api = one("Deployment", "beyond-api")
    (port,) = container(api)["ports"]
    (service_port,) = one("Service", "beyond-api")["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]
    env = {item["name"]: item.get("value") for item in container(api)["env"]}
    assert env["BEYOND_PORT"] == str(port["containerPort"])
    redis_set = one("StatefulSet", "beyond-redis")
    (redis_port,) = container(redis_set)["ports"]
    (service_port,) = one("Service", "beyond-redis")["spec"]["ports"]
    assert service_port["targetPort"] == redis_port["name"] and service_port["port"] == redis_port["containerPort"]
    assert redis_set["spec"]["serviceName"] == "beyond-redis"
    assert one("Service", "beyond-redis")["spec"]["clusterIP"] == "None"


def test_the_redis_address_is_the_redis_service_everywhere() -> None:
    service = one("Service", "beyond-redis")
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    port = service["spec"]["ports"][0]["port"]
    url = urlsplit(config_data()["BEYOND_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", host, port)
    meta = one("ScaledObject", "beyond-worker")["spec"]["triggers"][0]["metadata"]
    assert meta["address"] == f"{host}:{port}"
    assert meta.get("databaseIndex", "0") == url.path.lstrip("/")
    assert meta.get("enableTLS", "false") == "false"  # redis:// is plain TCP, as KEDA's default


def test_the_scaled_object_measures_the_stream_the_store_writes_and_scales_the_workers() -> None:
    spec = one("ScaledObject", "beyond-worker")["spec"]
    target = spec["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    worker = one("Deployment", target["name"])
    assert container(worker)["args"][0] == "worker"
    # KEDA owns the count: a `replicas` here would be put back by every `kubectl apply`.
    assert "replicas" not in worker["spec"]
    prefix = inspect.signature(RedisJobStore).parameters["prefix"].default
    assert spec["triggers"][0]["metadata"]["stream"] == f"{prefix}stream"


def test_secrets_and_config_referenced_by_the_pods_exist() -> None:
    secrets = generated_secrets()
    claims = {m["metadata"]["name"] for m in manifests() if m["kind"] == "PersistentVolumeClaim"}
    configs = {m["metadata"]["name"] for m in manifests() if m["kind"] == "ConfigMap"}
    referenced = set()
    for workload in (one("Deployment", "beyond-api"), one("Deployment", "beyond-worker")):
        spec = container(workload)
        for source in spec.get("envFrom", []):
            assert source["configMapRef"]["name"] in configs
        for item in spec.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets.get(ref["name"], set()), ref
                assert not ref.get("optional"), f"{item['name']} must not start without its secret"
                referenced.add(ref["key"])
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        for mount in spec["volumeMounts"]:
            claim = volumes[mount["name"]].get("persistentVolumeClaim")
            if claim:
                assert claim["claimName"] in claims
    assert referenced == secrets["beyond-secrets"], "every key of the Secret is used, by the API"
    api_env = {item["name"] for item in container(one("Deployment", "beyond-api"))["env"]}
    assert {"BEYOND_API_KEYS", "BEYOND_WEBHOOK_SECRET"} <= api_env


def test_redis_keeps_an_append_only_file_on_its_own_volume() -> None:
    redis_set = one("StatefulSet", "beyond-redis")
    spec = container(redis_set)
    args = spec["args"]
    option = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}
    assert args[0] == "redis-server"
    assert option["--appendonly"] == "yes"
    assert option["--appendfsync"] == "always"
    assert option["--maxmemory-policy"] == "noeviction"
    assert bytes_of(option["--maxmemory"]) < bytes_of(spec["resources"]["limits"]["memory"])
    (template,) = redis_set["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in spec["volumeMounts"]}
    assert mounts[option["--dir"]] == template["metadata"]["name"]
    assert template["spec"]["resources"]["requests"]["storage"]


def test_workers_ask_for_one_gpu_and_get_time_to_hand_their_job_back(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = one("Deployment", "beyond-worker")
    spec = container(worker)
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["resources"]["requests"]["nvidia.com/gpu"] == 1
    # SIGTERM goes to the container's first process: `beyond` itself, with no shell in between.
    assert "command" not in spec
    settings = settings_from(pod_env(worker, {}, {"metadata.name": "beyond-worker-7d4b9c8f6d-x2x9q"}), monkeypatch)
    # What `beyond worker` does on SIGTERM: notices it, stops its engine (asked, then terminated, then
    # killed: Supervisor.stop's timeout each), hands its jobs back, and stops its heartbeat (one interval
    # plus one Redis call) after removing its card.
    stop_timeout = inspect.signature(Supervisor.stop).parameters["timeout"].default
    needed = WORKER_SIGNAL_POLL + 3 * stop_timeout + settings.heartbeat_interval + REDIS_TIMEOUT
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 2 * needed, f"{grace} s leaves too little for a {needed} s stop"
    assert settings.worker_name == "beyond-worker-7d4b9c8f6d-x2x9q"


def test_the_pods_get_valid_settings_and_share_the_ones_that_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    api = settings_from(
        pod_env(one("Deployment", "beyond-api"), {"api-keys": "k1,k2", "webhook-secret": secret}, {}), monkeypatch
    )
    worker = settings_from(
        pod_env(one("Deployment", "beyond-worker"), {}, {"metadata.name": "beyond-worker-0"}), monkeypatch
    )
    assert api.redis_url == worker.redis_url == config_data()["BEYOND_REDIS_URL"]
    # docs/scaling.md: every node needs the same result TTL and reclaim delay: they come from the ConfigMap.
    for name in ("BEYOND_RESULT_TTL", "BEYOND_RECLAIM_AFTER"):
        assert name in config_data()
        for workload in (one("Deployment", "beyond-api"), one("Deployment", "beyond-worker")):
            assert name not in {item["name"] for item in container(workload).get("env", [])}
    assert (api.result_ttl, api.reclaim_after) == (worker.result_ttl, worker.reclaim_after)
    assert api.api_keys is not None and api.api_keys.get_secret_value() == "k1,k2"
    # Every worker's model is on the weights volume it mounts.
    mounts = [m["mountPath"] for m in container(one("Deployment", "beyond-worker"))["volumeMounts"]]
    assert any(worker.model.startswith(path.rstrip("/") + "/") for path in mounts)


# -- what the metric counts, on a real Redis -------------------------------------------------------------


def live_jobs(store: RedisJobStore, ids: list[str]) -> int:
    """The jobs a worker has or will have to run: queued with their input, or running."""
    jobs = [store.get(job_id) for job_id in ids]
    return sum(
        1
        for job in jobs
        if job is not None
        and (job.status == JobStatus.PROCESSING or (job.status == JobStatus.QUEUED and job.input_ready))
    )


def keda_replicas(length: int, spec: dict[str, Any]) -> int:
    """The workers KEDA asks for at this stream length (its documented rules): none while the trigger is
    inactive (length not above activationLagCount, default 0) and minReplicaCount is 0, else the HPA's
    ceil(length / streamLength) within [1, maxReplicaCount]."""
    meta = spec["triggers"][0]["metadata"]
    if length <= int(meta.get("activationLagCount", "0")):
        return spec["minReplicaCount"]
    return max(1, min(spec["maxReplicaCount"], math.ceil(length / int(meta["streamLength"]))))


def test_the_stream_length_is_every_job_waiting_or_held_and_zero_when_none(tmp_path: Path) -> None:
    spec = one("ScaledObject", "beyond-worker")["spec"]
    stream = spec["triggers"][0]["metadata"]["stream"]
    with RedisServer(tmp_path) as server:
        store = RedisJobStore(server.url, listen=False)  # the prefix `beyond worker` and the API use
        client = redis.Redis.from_url(server.url)
        try:
            # The API nodes create the stream and its group at start: KEDA finds the key before any job.
            assert client.type(stream) == b"stream"
            assert GROUP in [group["name"].decode() for group in client.xinfo_groups(stream)]
            ids: list[str] = []
            lags: list[tuple[int | None, int]] = []  # (the group's lag as Redis reports it, jobs waiting)

            def check(expected: int) -> None:
                length = client.xlen(stream)
                assert length == live_jobs(store, ids) == expected
                (group,) = client.xinfo_groups(stream)
                lags.append((group["lag"], length - group["pending"]))

            check(0)
            assert keda_replicas(0, spec) == 0
            for _ in range(3):
                ids.append(store.create(JobParams(prompt="p"), ImageSource(), image=b"i", base64=False, owner=None).id)
            check(3)
            assert keda_replicas(1, spec) == 1  # one waiting job wakes a worker
            assert keda_replicas(3, spec) == min(3, spec["maxReplicaCount"])
            held = store.claim_next()
            assert held is not None and held.id == ids[0]
            check(3)  # a held job still counts: its worker is still wanted
            # A URL job counts once its input is there (the API node fetches it; no worker is needed before).
            url_job = store.create(
                JobParams(prompt="p"), ImageSource(url="http://127.0.0.1:9/x.png"), image=None, base64=False, owner=None
            )
            ids.append(url_job.id)
            check(3)
            assert store.attach_input(url_job.id, b"i")
            check(4)
            store.request_cancel(ids[1])  # a queued job cancelled: its entry goes
            check(3)
            # Its worker died: the job is queued again, its entry kept (pending, for the next claim).
            assert store.release(held.id, "the worker died", held.attempts) == JobStatus.QUEUED
            check(3)
            again = store.claim_next()
            assert again is not None and again.id == held.id
            assert store.fail(again.id, "boom", FailureKind.ENGINE, again.attempts)
            check(2)
            for job_id in (ids[2], url_job.id):
                store.request_cancel(job_id)
            check(0)
            assert keda_replicas(0, spec) == 0  # nothing waiting or held: scale to zero
            # Why not the group's lag: after entries are deleted ahead of the group's read position, Redis
            # reports none (KEDA: -1, inactive) or more than is left (here, jobs when none is).
            assert lags[0] == (0, 0) and lags[1] == (3, 3)
            assert any(lag is None for lag, _ in lags), lags
            assert lags[-1][0] != 0, f"Redis now counts the lag right {lags}: the ScaledObject could use it"
        finally:
            client.close()
            store.close()


# -- the API's readiness probe, as written, against real API nodes ----------------------------------------


def readiness_command() -> list[str]:
    probe = container(one("Deployment", "beyond-api"))["readinessProbe"]
    command = probe["exec"]["command"]
    assert command[0] == "python3" and "/health" in command[-1]
    return [sys.executable, *command[1:]]


def probe(port: int) -> int:
    env = {**os.environ, "BEYOND_PORT": str(port)}
    return subprocess.run(readiness_command(), env=env, capture_output=True, timeout=30).returncode


def api_node(directory: Path, redis_url: str, **env: str) -> ServerProcess:
    return ServerProcess(directory, env={"BEYOND_REDIS_URL": redis_url, **env}, args=("--no-worker",))


@contextlib.contextmanager
def answering(*nodes: ServerProcess) -> Iterator[None]:
    """The nodes started together, until each answers /health (with any status)."""
    for node in nodes:
        node.start()
    try:
        deadline = time.monotonic() + 60
        for node in nodes:
            while node.health() is None:
                assert node.proc is not None and node.proc.poll() is None, node.log_tail()
                assert time.monotonic() < deadline, node.log_tail()
                time.sleep(0.1)
        yield
    finally:
        for node in nodes:
            node.stop()


def test_the_api_is_ready_without_workers_or_redis_but_not_with_a_full_disk(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        node = api_node(tmp_path / "api", server.url)
        full = api_node(tmp_path / "full", server.url, BEYOND_MIN_FREE_BYTES=str(10**18))
        with answering(node, full):
            # No worker at all (scaled to zero): /health says 503, and the node must stay in the Service.
            assert node.health().status_code == 503  # type: ignore[union-attr]
            assert probe(node.port) == 0
            # Its own disk is full: route requests to the other nodes.
            assert "disk" in full.health().json()  # type: ignore[union-attr]
            assert probe(full.port) == 1
            server.kill()
            # Redis down: the node still answers (503 with the reason), like every other node.
            assert node.health().json()["store"] != "ok"  # type: ignore[union-attr]
            assert probe(node.port) == 0
        # Not answering at all: not ready.
        assert probe(node.port) == 1
