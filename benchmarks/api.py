"""What the HTTP layer costs around the engine: status-poll rate against a trivial FastAPI endpoint
(wrk, side by side), status-poll latency, and v1 overhead.

    python -m benchmarks.api --quick      # under a minute
    python -m benchmarks.api              # more samples

It starts a real `beyond serve --model random:tiny --device cpu` (one engine thread) on a loopback
port, as the API tests do, and the smallest FastAPI app (benchmarks/trivial_app.py) under the same
uvicorn (uvloop, httptools) from the same Python environment, and measures:

- status throughput: `wrk` (Debian's package) at 8 connections on GET /v2/requests/{id}/status of a
  COMPLETED request and on the trivial endpoint, alternating rounds; the ratio is the goal's figure
  (>= 0.8). Skipped with a message when wrk is not installed.

- status polls: sequential GET /v2/requests/{id}/status of a finished request, with the worker idle
  and again while it runs jobs; p50/p99 latency.
- v1 overhead: POST /v1/seg-beyond round trip minus the engine's own time (x-inference-time): body
  parsing and image check, queueing, hand-over to the worker, reading the input, JPEG encoding,
  the store, and v1's wait. Measured through httpx and through the standard library's http.client
  (requests alternating), beside each client's round trip to the trivial endpoint: what the client
  itself costs is part of every overhead figure. Then, through http.client, a request with nothing
  to outpaint (the same path, no denoising): back to back, each after as long idle as a denoising takes,
  and each right after as much CPU work in another process: the serving path's own cost, and what a
  second of the server's threads asleep adds to it.
- hand-overs: a round trip between two processes over a pipe (as between the API and its worker),
  back to back and the first one after 1, 5 and 30 ms and a denoising's time idle. On a VM a thread
  woken on an idle (halted) CPU pays for its wake-up; the v1 path wakes a sleeping thread at each of
  its hand-overs.
- status polls per second at a few concurrencies (asyncio + httpx, bounded by count and time).

The client runs on the same machine as the server, so on a small CPU it competes with it: the
rates are a floor for the server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from multiprocessing.connection import Connection

import httpx

from benchmarks.common import machine_line, percentile, request_json, running_server, table
from tests.helpers import ROOT, free_port


def wait_done(client: httpx.Client, request_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/v2/requests/{request_id}/status")
        if response.status_code == 422 or response.json().get("status") == "COMPLETED":
            return response.json()
        time.sleep(0.05)
    raise TimeoutError(f"request {request_id} not done after {timeout}s")


def submit(client: httpx.Client, body: dict) -> str:
    response = client.post("/v2/seg-beyond", json=body)
    response.raise_for_status()
    return response.json()["request_id"]


def sequential_polls(client: httpx.Client, request_id: str, count: int) -> list[float]:
    latencies = []
    url = f"/v2/requests/{request_id}/status"
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(url)
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
    return latencies


class LeanClient:
    """One kept-alive connection through the standard library's http.client: a client that costs less
    of the shared CPU than httpx (the trivial round trips below show how much), so that less of the
    measured overhead is the client's own."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        headers = {"content-type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def close(self) -> None:
        self.conn.close()


def v1_overhead(post: Callable[[], tuple[int, dict[str, str]]]) -> tuple[float, float]:
    """One v1 request: its round trip minus the engine's own time (x-inference-time), and that time."""
    started = time.perf_counter()
    status, headers = post()
    elapsed = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"v1 answered {status}")
    inference = float(headers["x-inference-time"])
    return elapsed - inference, inference


# Another process's CPU work, as a CPU engine's denoising is: one thread of matrix products over a few MB.
CPU_LOAD = """
import sys, time
import numpy as np
a = np.random.rand(512, 512)
for line in sys.stdin:
    end = time.perf_counter() + float(line)
    while time.perf_counter() < end:
        a = a @ a
        a /= np.abs(a).max()
    print(flush=True)
"""


class CpuLoad:
    """A one-thread CPU load in another process, run for a given time when asked."""

    def __enter__(self) -> CpuLoad:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CPU_LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        return self

    def run(self, seconds: float) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        if not self.proc.stdout.readline():
            raise RuntimeError("the CPU load process ended")

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _echo(conn: Connection) -> None:
    while (message := conn.recv_bytes()) != b"":
        conn.send_bytes(message)


# Idle times (seconds) after which a hand-over is timed, besides a denoising's time.
SHORT_IDLES = (0.001, 0.005, 0.03)


def hand_overs(count: int, idles: tuple[float, ...]) -> dict[float, list[float]]:
    """Round trips over a pipe to another process: back to back (key 0), and each the first after one of
    `idles` seconds asleep."""
    context = multiprocessing.get_context("spawn")
    here, there = context.Pipe()
    echo = context.Process(target=_echo, args=(there,), daemon=True)
    echo.start()

    def round_trip() -> float:
        started = time.perf_counter()
        here.send_bytes(b"x")
        here.recv_bytes()
        return time.perf_counter() - started

    found: dict[float, list[float]] = {idle: [] for idle in (0.0, *idles)}
    try:
        for _ in range(20):
            round_trip()
        found[0.0].extend(round_trip() for _ in range(max(200, count)))
        for _ in range(count):
            for idle in idles:
                time.sleep(idle)
                found[idle].append(round_trip())
    finally:
        here.send_bytes(b"")
        echo.join(10)
    return found


def v1_overheads(server_url: str, client: httpx.Client, body: dict, count: int) -> dict[str, list[float]]:
    """v1 overheads through httpx and through the lean client, requests alternating between them; the same
    with nothing to outpaint, back to back, after idle time and after CPU load; and the round trip of each client
    to the trivial endpoint: the part of an overhead that is the client's."""
    lean = LeanClient(server_url)
    encoded = json.dumps(body).encode()
    unpadded = json.dumps({**body, "left": 0, "right": 0, "top": 0, "bottom": 0}).encode()

    def by_httpx() -> tuple[int, dict[str, str]]:
        response = client.post("/v1/seg-beyond", json=body)
        return response.status_code, dict(response.headers)

    def by_lean(payload: bytes) -> Callable[[], tuple[int, dict[str, str]]]:
        def post() -> tuple[int, dict[str, str]]:
            status, headers, _ = lean.request("POST", "/v1/seg-beyond", payload)
            return status, headers

        return post

    by_lean_padded, by_lean_plain = by_lean(encoded), by_lean(unpadded)

    names = ("httpx", "lean", "engine", "plain", "plain after idle", "plain after load", "httpx floor", "lean floor")
    found: dict[str, list[float]] = {name: [] for name in names}
    try:
        for _ in range(count):
            for name, post in (("httpx", by_httpx), ("lean", by_lean_padded)):
                overhead, inference = v1_overhead(post)
                found[name].append(overhead)
                found["engine"].append(inference)
        for _ in range(3):  # the CPUs awake again after the denoised requests
            v1_overhead(by_lean_plain)
        found["plain"].extend(v1_overhead(by_lean_plain)[0] for _ in range(count))
        denoising = statistics.median(found["engine"])
        for _ in range(count):
            time.sleep(denoising)
            found["plain after idle"].append(v1_overhead(by_lean_plain)[0])
        with CpuLoad() as load:
            for _ in range(count):
                load.run(denoising)
                found["plain after load"].append(v1_overhead(by_lean_plain)[0])
        with TrivialApp() as trivial_url, httpx.Client(timeout=30) as plain:
            trivial = LeanClient(trivial_url)
            path = urllib.parse.urlsplit(trivial_url).path
            gets = (
                ("httpx floor", lambda: plain.get(trivial_url).status_code),
                ("lean floor", lambda: trivial.request("GET", path)[0]),
            )
            for _ in range(max(50, count)):
                for name, get in gets:
                    started = time.perf_counter()
                    if get() != 200:
                        raise RuntimeError("the trivial endpoint did not answer 200")
                    found[name].append(time.perf_counter() - started)
            trivial.close()
    finally:
        lean.close()
    return found


async def concurrent_polls(
    base_url: str, request_id: str, concurrency: int, seconds: float, max_polls: int
) -> tuple[float, list[float]]:
    """Polls per second with `concurrency` requests in flight, and their latencies."""
    url = f"/v2/requests/{request_id}/status"
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        await client.get(url)  # open a connection before the clock starts
        started = time.perf_counter()
        deadline = started + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline and len(latencies) < max_polls:
                t = time.perf_counter()
                response = await client.get(url)
                latencies.append(time.perf_counter() - t)
                response.raise_for_status()

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


def wrk_rate(url: str, seconds: float, connections: int = 8) -> float:
    """Requests per second that wrk measured (two threads, `connections` connections)."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", url], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"no rate in wrk's output:\n{out}")
    return float(match.group(1))


class TrivialApp:
    """benchmarks/trivial_app.py under uvicorn, as `beyond serve` runs it (no access log)."""

    def __enter__(self) -> str:
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.trivial_app:app", "--port", str(port), "--no-access-log"]
            + ["--log-level", "warning"],
            cwd=ROOT,
        )
        url = f"http://127.0.0.1:{port}/status"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("the trivial app did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def status_throughput(status_url: str, rounds: int, seconds: float) -> list[list[object]]:
    """Alternating wrk rounds on the trivial endpoint and on ours; the median of each and the ratio."""
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk): status throughput skipped", flush=True)
        return []
    trivial_rates, our_rates = [], []
    with TrivialApp() as trivial_url:
        for _ in range(rounds):
            trivial_rates.append(wrk_rate(trivial_url, seconds))
            our_rates.append(wrk_rate(status_url, seconds))
    trivial, ours = statistics.median(trivial_rates), statistics.median(our_rates)
    return [
        ["trivial FastAPI endpoint", rounds, trivial, None],
        ["GET /v2/requests/{id}/status (COMPLETED)", rounds, ours, ours / trivial],
    ]


V1_ROWS = (
    ("v1 round trip minus x-inference-time (httpx)", "httpx"),
    ("v1 round trip minus x-inference-time (http.client)", "lean"),
    ("the same, nothing to outpaint (no denoising), back to back", "plain"),
    ("the same, each after a denoising's time idle", "plain after idle"),
    ("the same, each after a denoising's time of CPU work elsewhere", "plain after load"),
    ("trivial GET round trip (httpx)", "httpx floor"),
    ("trivial GET round trip (http.client)", "lean floor"),
)


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def latency_row(label: str, seconds: list[float], mean: bool = True) -> list[object]:
    """A table row: label, count, p50, p99 and (unless `mean` is False) the mean, in milliseconds."""
    return [label, len(seconds), ms(seconds, 50), ms(seconds, 99), 1000 * sum(seconds) / len(seconds) if mean else None]


def run(args: argparse.Namespace) -> None:
    # A small image: the v1 overhead is about the HTTP and queue path, not about pixels.
    body = request_json(64, 64, steps=20, left=32, right=0)
    print("# API benchmark: beyond serve --model random:tiny --device cpu (BEYOND_CPU_THREADS=1), loopback")
    print(machine_line())
    print("request: 64x64 PNG, left 32, steps 20 (the minimum), default styles\n")
    started = time.perf_counter()
    with running_server() as server, httpx.Client(base_url=server.url, timeout=300) as client:
        print(f"server ready in {time.perf_counter() - started:.1f} s", flush=True)
        done = submit(client, body)
        wait_done(client, done)  # also the warm-up run of the engine

        idle = sequential_polls(client, done, args.polls)
        # Keep the worker busy with queued jobs while polling again.
        busy_ids = [submit(client, body) for _ in range(2)]
        busy = sequential_polls(client, done, args.polls)
        for request_id in busy_ids:
            client.post(f"/v2/requests/{request_id}/cancel")
            wait_done(client, request_id)

        v1 = v1_overheads(server.url, client, body, args.v1)
        denoising = statistics.median(v1["engine"])
        pipe = hand_overs(args.v1, (*SHORT_IDLES, denoising))
        throughput = status_throughput(f"{server.url}/v2/requests/{done}/status", args.rounds, args.wrk_seconds)

        rates = []
        for concurrency in args.concurrency:
            rate, latencies = asyncio.run(concurrent_polls(server.url, done, concurrency, args.seconds, args.max_polls))
            rates.append([concurrency, len(latencies), rate, ms(latencies, 50), ms(latencies, 99)])

    print()
    print(
        table(
            ["measurement", "n", "p50 ms", "p99 ms", "mean ms"],
            [
                latency_row("status poll, worker idle", idle),
                latency_row("status poll, worker busy", busy),
                *(latency_row(label, v1[key]) for label, key in V1_ROWS),
                latency_row("(engine time, x-inference-time)", v1["engine"], mean=False),
                latency_row("round trip to another process (pipe), back to back", pipe[0.0]),
                *(
                    latency_row(f"the same, each the first after {idle * 1000:.0f} ms idle", pipe[idle])
                    for idle in SHORT_IDLES
                ),
                latency_row("the same, each the first after a denoising's time idle", pipe[denoising]),
            ],
        )
    )
    print()
    print(table(["concurrency", "polls", "polls/s", "p50 ms", "p99 ms"], rates))
    if throughput:
        print()
        print("wrk, 2 threads, 8 connections, median of the rounds:")
        print(table(["endpoint", "rounds", "req/s", "vs trivial"], throughput))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=None, help="sequential polls per setting (1000; quick 200)")
    parser.add_argument("--v1", type=int, default=None, help="v1 requests (20; quick 3)")
    parser.add_argument("--concurrency", default=None, help="comma-separated, for polls/s (1,8,32; quick 1,8)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per concurrency (5; quick 1.5)")
    parser.add_argument("--max-polls", type=int, default=20000, help="upper bound on polls per concurrency")
    parser.add_argument("--rounds", type=int, default=None, help="alternating wrk rounds per endpoint (3; quick 1)")
    parser.add_argument("--wrk-seconds", type=float, default=None, help="seconds per wrk round (5; quick 3)")
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args(argv)
    args.polls = args.polls or (200 if args.quick else 1000)
    args.v1 = args.v1 or (3 if args.quick else 20)
    args.seconds = args.seconds or (1.5 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.wrk_seconds = args.wrk_seconds or (3.0 if args.quick else 5.0)
    concurrency = args.concurrency or ("1,8" if args.quick else "1,8,32")
    args.concurrency = [int(c) for c in concurrency.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
