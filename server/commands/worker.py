"""`beyond worker`: one engine fed from the shared (Redis) store, with no HTTP of its own.

Any number of them, on any machine, one per GPU (`--device cuda:N`), take work from the same queue
as the API nodes put it in. Each is the supervisor of `beyond serve` without the API: it claims a
ready job, runs it in its engine process and writes the outcome back to the store; its card in the
worker registry (server/jobs/registry.py) is refreshed every BEYOND_HEARTBEAT_INTERVAL seconds.
SIGTERM (or Ctrl-C) stops it within a few seconds and puts its jobs back in the queue at once, as if never
claimed (no attempt spent; a running one whose engine did not end as asked counts an attempt, as a death).
With `--metrics-port` (BEYOND_METRICS_PORT) it serves its Prometheus metrics on that port of
BEYOND_HOST: its jobs, failures, engine deaths, steps, busy time, GPU memory and the jobs it holds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from server.commands.startup import MODEL_HELP, build_store, build_supervisor, load_settings, preflight, redis_tls

log = logging.getLogger("beyond.worker_node")


def add_parser(commands: argparse._SubParsersAction) -> None:
    worker = commands.add_parser("worker", help="run one engine that takes jobs from the shared Redis store")
    worker.add_argument("--model", help=MODEL_HELP)
    worker.add_argument("--data-dir", help="local scratch space only: jobs live in Redis (BEYOND_DATA_DIR)")
    worker.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps: one worker per GPU (BEYOND_DEVICE)")
    worker.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="compute precision (BEYOND_DTYPE)")
    worker.add_argument("--name", help="its name in the worker registry (BEYOND_WORKER_NAME, default <host>-<pid>)")
    worker.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (BEYOND_METRICS_PORT; default: none)"
    )
    worker.add_argument("--host", help="interface the metrics port listens on (BEYOND_HOST, default 127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from server.jobs.registry import Heartbeat, LocalWorker, RedisRegistry, share_state, worker_name
    from server.jobs.store import StoreError
    from server.metrics import Metrics

    settings = load_settings(
        model=args.model,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        worker_name=args.name,
        metrics_port=args.metrics_port,
        host=args.host,
    )
    if settings is None:
        return 2
    if not settings.redis_url:
        print("beyond: `beyond worker` takes its jobs from Redis: set BEYOND_REDIS_URL", file=sys.stderr)
        return 2
    problem = preflight(settings, engine=True)
    if problem:
        print(f"beyond: {problem}", file=sys.stderr)
        return 2
    metrics = Metrics()
    exporter = None
    if settings.metrics_port is not None:
        try:
            exporter, _ = start_http_server(settings.metrics_port, settings.host, metrics.registry)
        except OSError as exc:
            where = f"{settings.host}:{settings.metrics_port}"
            print(f"beyond: cannot serve metrics on {where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        log.info("metrics on http://%s:%s/metrics", settings.host, settings.metrics_port)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = build_store(settings)
    except (StoreError, ValueError) as exc:
        print(f"beyond: {exc}", file=sys.stderr)
        return 2

    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    supervisor = build_supervisor(settings, store, metrics)
    name = worker_name(settings.worker_name)
    metrics.name_worker(name)
    registry = RedisRegistry(settings.redis_url, ttl=3 * settings.heartbeat_interval, tls=redis_tls(settings))
    heartbeat = Heartbeat(registry, LocalWorker(supervisor, name, os.getpid()), settings.heartbeat_interval)
    share_state(supervisor, registry, heartbeat)
    try:
        supervisor.start()  # gives back the jobs this worker ran before a restart
    except StoreError as exc:
        print(f"beyond: the job store cannot be used: {exc}", file=sys.stderr)
        return 1
    heartbeat.start()
    log.info("worker %s serving %s on %s", name, settings.model, settings.device)
    while not stopping.wait(1.0):
        pass
    supervisor.stop()
    heartbeat.stop()
    if exporter is not None:
        exporter.shutdown()
    log.info("worker %s stopped", name)
    return 0
