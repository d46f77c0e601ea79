"""Images per minute at a constant queue depth (1, 4, 8), through the v2 queue of a real server.

    python -m benchmarks.throughput --quick    # a few minutes: three worker modes
    python -m benchmarks.throughput            # more completions per depth
    python -m benchmarks.throughput --workers 1,2   # scale-out: Redis, one API node, N workers
    python -m benchmarks.throughput --workers 1,2 --prefetch off,on --rounds 2
    python -m benchmarks.throughput --modes batch4 --v1 0

Worker modes (one server each): `serial` (BEYOND_WORKER_PREFETCH=0: one job at a time, nothing
prepared ahead), `pipelined` (the default worker, BEYOND_MAX_BATCH=1) and `batch4` (pipelined,
BEYOND_MAX_BATCH=4). The busy share is the part of the measured span during which at least one
job was between its start (denoising) and its completion (stored), from the jobs' own timestamps.
`--v1 N` also times N sequential v1 requests per mode: the overhead is wall minus x-inference-time.

It starts `beyond serve --model random:tiny --device cpu` (one engine thread) on a loopback port.
For each depth it keeps that many requests submitted and unfinished, submitting a new one as each
completes, and counts completions. The rate is taken between the first and the last completion,
so the ramp-up is left out; the engine ceiling is 60 / the median x-inference-time of the same
requests, and the ratio of the two is the share of wall time the worker spends in the engine.
The queued leftovers of a depth are cancelled before the next depth starts.

With --workers, for each N and each prefetch setting (`--prefetch off,on`: BEYOND_WORKER_PREFETCH) it
starts a redis-server, one `beyond serve --no-worker` and N `beyond worker` processes (one torch thread
each), keeps 2 x N requests outstanding, and prints the images per minute of each, its ratio to one
worker with the same setting, and prefetch on against off for the same N. With `--rounds R` the whole
set runs R times, every other round in reverse order, so that a change in the machine's load over the
run weighs on every case alike; the summary's ratios are the median of each round's own ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.common import machine_line, request_json, running_server, table
from tests.helpers import ServerProcess
from tests.redis_helpers import RedisServer

POLL = 0.05


def status(client: httpx.Client, request_id: str) -> str:
    response = client.get(f"/v2/requests/{request_id}/status")
    return "FAILED" if response.status_code == 422 else response.json()["status"]


def submit(client: httpx.Client, body: dict) -> str:
    response = client.post("/v2/seg-beyond", json=body)
    response.raise_for_status()
    return response.json()["request_id"]


MODES = {
    "serial": {"BEYOND_WORKER_PREFETCH": "0", "BEYOND_MAX_BATCH": "1"},
    "pipelined": {"BEYOND_MAX_BATCH": "1"},
    "batch4": {"BEYOND_MAX_BATCH": "4"},
}


def job_times(client: httpx.Client, request_id: str) -> tuple[float, float, float]:
    """inference_time, started_at and completed_at (epoch seconds) of a finished request."""
    from datetime import datetime

    body = client.get(f"/v2/requests/{request_id}").json()
    started = datetime.fromisoformat(body["started_at"]).timestamp()
    completed = datetime.fromisoformat(body["completed_at"]).timestamp()
    return float(body["metrics"]["inference_time"]), started, completed


def busy_share(intervals: list[tuple[float, float]]) -> float:
    """Share of [first start, last completion] covered by at least one job's [start, completion]."""
    if not intervals:
        return float("nan")
    ordered = sorted(intervals)
    covered, (lo, hi) = 0.0, ordered[0]
    for start, end in ordered[1:]:
        if start > hi:
            covered += hi - lo
            lo, hi = start, end
        else:
            hi = max(hi, end)
    covered += hi - lo
    span = max(e for _, e in ordered) - ordered[0][0]
    return covered / span if span > 0 else float("nan")


def drain(client: httpx.Client, outstanding: list[str], timeout: float = 300) -> None:
    for request_id in outstanding:
        client.post(f"/v2/requests/{request_id}/cancel")
    deadline = time.monotonic() + timeout
    while outstanding and time.monotonic() < deadline:
        outstanding[:] = [r for r in outstanding if status(client, r) not in ("COMPLETED", "FAILED")]
        time.sleep(POLL)


def at_depth(client: httpx.Client, body: dict, depth: int, completions: int, max_seconds: float) -> list:
    outstanding = [submit(client, body) for _ in range(depth)]
    finished: list[tuple[float, str]] = []
    deadline = time.monotonic() + max_seconds
    while len(finished) < completions and time.monotonic() < deadline:
        for request_id in list(outstanding):
            state = status(client, request_id)
            if state in ("COMPLETED", "FAILED"):
                outstanding.remove(request_id)
                if state == "FAILED":
                    raise RuntimeError(f"request {request_id} failed: {client.get(f'/v2/requests/{request_id}').text}")
                finished.append((time.perf_counter(), request_id))
                outstanding.append(submit(client, body))
        time.sleep(POLL)
    drain(client, outstanding)
    times = [job_times(client, r) for _, r in finished]
    engine = [t[0] for t in times]
    span = finished[-1][0] - finished[0][0] if len(finished) > 1 else float("nan")
    per_minute = 60 * (len(finished) - 1) / span if len(finished) > 1 else float("nan")
    return [depth, len(finished), per_minute, statistics.median(engine), busy_share([t[1:] for t in times])]


def v1_overhead(client: httpx.Client, body: dict, count: int) -> list[float]:
    """Seconds per v1 request outside the engine: wall minus x-inference-time."""
    overheads = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.post("/v1/seg-beyond", json=body)
        response.raise_for_status()
        overheads.append(time.perf_counter() - started - float(response.headers["x-inference-time"]))
    return overheads


@contextlib.contextmanager
def running_cluster(workers: int, prefetch: bool = True, pin: bool = False) -> Iterator[ServerProcess]:
    """redis-server, one API node and `workers` worker nodes, all on loopback; yields the API node.
    With `pin`, worker i runs on core i only (the API node and Redis on any)."""
    with tempfile.TemporaryDirectory(prefix="beyond-scale-") as folder:
        root = Path(folder)
        redis = RedisServer(root / "redis").start()
        env = {
            "BEYOND_REDIS_URL": redis.url,
            "BEYOND_HEARTBEAT_INTERVAL": "1",
            "BEYOND_WORKER_PREFETCH": "1" if prefetch else "0",
        }
        procs = [ServerProcess(root / "api", env=env, args=("--no-worker",)).start()]
        procs += [
            ServerProcess(root / f"w{i}", env=env, role="worker", args=("--name", f"w{i}")).start()
            for i in range(workers)
        ]
        if pin:
            cores = sorted(os.sched_getaffinity(0))
            for i, proc in enumerate(procs[1:]):
                # Set before the worker starts its engine process and threads, which inherit it.
                os.sched_setaffinity(proc.proc.pid, {cores[i % len(cores)]})
        try:
            api = procs[0].wait_ready()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                cards = httpx.get(f"{api.url}/health", timeout=10).json()["workers"]
                if sum(card["state"] == "ready" for card in cards) == workers:
                    break
                time.sleep(0.5)
            else:
                raise TimeoutError(f"{workers} workers not ready: {cards}")
            yield api
        finally:
            for proc in procs:
                proc.stop()
            redis.stop()


def warm_up(client: httpx.Client, body: dict, count: int) -> None:
    """One request per worker first: each engine's first request is slower than the rest."""
    ids = [submit(client, body) for _ in range(count)]
    while any(status(client, r) not in ("COMPLETED", "FAILED") for r in ids):
        time.sleep(POLL)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_scale_out(args: argparse.Namespace, body: dict) -> None:
    cases = [(workers, prefetch) for workers in args.workers for prefetch in args.prefetch]
    rows = []
    rates: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
    for number in range(args.rounds):
        for workers, prefetch in cases if number % 2 == 0 else cases[::-1]:
            load_before = load_average()
            cluster = running_cluster(workers, prefetch, args.pin)
            with cluster as api, httpx.Client(base_url=api.url, timeout=300) as client:
                warm_up(client, body, workers)
                depth, completed, per_minute, engine, _ = at_depth(
                    client, body, 2 * workers, args.completions * workers, args.max_seconds
                )
            ceiling = 60 / engine
            rates[workers, prefetch].append(per_minute)
            # The share of N engines' time spent in the engine: images/min against N x one engine's ceiling.
            rows.append([
                number + 1, workers, "on" if prefetch else "off", depth, completed, per_minute, engine, ceiling,
                per_minute / (workers * ceiling), f"{load_before} / {load_average()}",
            ])  # fmt: skip
            print(f"round {number + 1}: {workers} worker(s), prefetch {'on' if prefetch else 'off'} done", flush=True)
    print()
    headers = ["round", "workers", "prefetch", "queue depth", "completed", "images/min", "median engine s",
               "one engine's ceiling /min", "share", "load before / after"]  # fmt: skip
    print(table(headers, rows))
    # Ratios within each round (cases run minutes apart), then their median: a load that changes between
    # rounds moves both sides of a ratio alike.
    first = args.workers[0]
    summary = []
    for workers, prefetch in cases:
        mine = rates[workers, prefetch]
        scale = [rate / base for rate, base in zip(mine, rates[first, prefetch], strict=True)]
        off = rates.get((workers, False))
        against_off = [rate / base for rate, base in zip(mine, off, strict=True)] if off else [math.nan]
        summary.append([
            workers, "on" if prefetch else "off", statistics.mean(mine), statistics.median(scale),
            statistics.median(against_off), " ".join(f"{r:.2f}" for r in scale),
        ])  # fmt: skip
    print()
    print(table(["workers", "prefetch", f"images/min (mean of {args.rounds})", f"vs {first} worker(s)",
                 "vs prefetch off", f"vs {first} worker(s), each round"], summary))  # fmt: skip
    print("(ratios: the median of the rounds' own ratios)")


def run(args: argparse.Namespace) -> None:
    scale = 0.5 if args.quick else 1.0
    width, height = round(1024 * scale), round(1024 * scale)
    padding = {"left": round(300 * scale), "right": round(100 * scale)}
    body = request_json(width, height, steps=20, **padding)
    if args.workers:
        print("# scale-out benchmark: redis-server, 1 x beyond serve --no-worker, N x beyond worker")
        print("# (random:tiny, --device cpu, BEYOND_CPU_THREADS=1 per worker)")
        if args.pin:
            print("# --pin: worker i on CPU core i alone (its engine process and threads too)")
        print(machine_line())
        print(f"load average at the start: {load_average()}")
        print(
            f"request: {width}x{height} PNG, left {padding['left']}, right {padding['right']}, steps 20; "
            f"queue depth 2 x N, {args.completions} x N completions or {args.max_seconds:.0f} s per N\n"
        )
        run_scale_out(args, body)
        return
    print("# throughput benchmark: beyond serve --model random:tiny --device cpu (BEYOND_CPU_THREADS=1)")
    print(machine_line())
    print(
        f"request: {width}x{height} PNG, left {padding['left']}, right {padding['right']}, steps 20, default styles; "
        f"{args.completions} completions or {args.max_seconds:.0f} s per depth\n"
    )
    rows, per_mode, overhead_rows = [], {}, []
    for mode in args.modes:
        with running_server(env=MODES[mode]) as server, httpx.Client(base_url=server.url, timeout=300) as client:
            warm = submit(client, body)
            while status(client, warm) not in ("COMPLETED", "FAILED"):
                time.sleep(POLL)
            for depth in args.depths:
                row = at_depth(client, body, depth, args.completions, args.max_seconds)
                per_mode[mode, depth] = row[2]
                rows.append([mode, *row])
                print(f"{mode}: depth {depth} done", flush=True)
            if args.v1:
                overheads = v1_overhead(client, body, args.v1)
                overhead_rows.append([mode, len(overheads), 1000 * statistics.median(overheads), 1000 * max(overheads)])
    print()
    headers = ["mode", "queue depth", "completed", "images/min", "median engine s", "busy share"]
    print(table(headers, rows))
    if "batch4" in args.modes and "pipelined" in args.modes:
        print()
        ratios = [[d, per_mode["batch4", d] / per_mode["pipelined", d]] for d in args.depths]
        print(table(["queue depth", "images/min batch4 / pipelined"], ratios))
    if overhead_rows:
        print()
        print(table(["mode", "v1 requests", "median overhead ms", "max overhead ms"], overhead_rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="1,4,8", help="comma-separated queue depths")
    parser.add_argument("--completions", type=int, default=None, help="per depth (12; quick 3)")
    parser.add_argument("--max-seconds", type=float, default=None, help="per depth (180; quick 10)")
    parser.add_argument("--quick", action="store_true", help="fewer completions and a half-size image")
    parser.add_argument("--workers", help="comma-separated worker counts, e.g. 1,2: the Redis scale-out mode")
    parser.add_argument("--prefetch", default="on", help="with --workers: comma-separated, of on, off (e.g. off,on)")
    parser.add_argument("--rounds", type=int, default=1, help="with --workers: times the whole set runs")
    parser.add_argument("--pin", action="store_true", help="with --workers: worker i on CPU core i alone")
    parser.add_argument("--modes", default="serial,pipelined,batch4", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--v1", type=int, default=5, help="sequential v1 requests per mode for the overhead (0: none)")
    args = parser.parse_args(argv)
    args.depths = [int(d) for d in args.depths.split(",") if d.strip()]
    args.workers = [int(w) for w in (args.workers or "").split(",") if w.strip()]
    args.modes = [m for m in args.modes.split(",") if m.strip()]
    choices = {"on": True, "off": False}
    prefetch = [m.strip() for m in args.prefetch.split(",") if m.strip()]
    if not prefetch or set(prefetch) - set(choices):
        parser.error("--prefetch takes on, off or both")
    args.prefetch = [choices[m] for m in prefetch]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    args.completions = args.completions or (3 if args.quick else 12)
    args.max_seconds = args.max_seconds or (10.0 if args.quick else 180.0)
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
