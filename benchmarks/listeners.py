"""Many listeners on one server: open event streams and status pollers, and what they cost everyone else.

    python -m benchmarks.listeners --quick    # 200 streams, 20 pollers: about a minute
    python -m benchmarks.listeners            # 1,000 streams, 100 pollers: about four minutes

It starts a real `beyond serve --model random:tiny --device cpu` (one engine thread) on a loopback port,
pauses its engine process (SIGSTOP) and queues `--jobs` small jobs behind it, so that every job stays
QUEUED and the engine uses no CPU: what is measured is the listeners' cost alone. Then, in one run:

1. no listeners: a probe in a process of its own polls /health and one job's status in turn, one request
   every `--probe-interval` seconds, over one kept-alive connection (the standard library's http.client);
   then the same for `--busy-seconds` with the engine resumed (it runs a few of the jobs), and paused again;
2. `--streams` open event streams (GET /v2/requests/{id}/events, spread evenly over the jobs) and
   `--pollers` pollers (GET /v2/requests/{id}/status, each on one job every `--poll-interval` seconds, as
   the SDK's wait does), then the same probe;
3. the engine resumed (SIGCONT): the jobs run one after the other, the streams get their queue positions,
   progress and results, and the same probe runs; then every job left is cancelled, which ends the streams.

Each phase gives /health and status latency (p50, p99, as the probe sees it), the pollers' own status
latency, and the CPU time the API process used per second of the phase. The listeners and pollers run in
one asyncio loop over raw loopback connections (no HTTP library), so that the client takes as little of
the shared CPU as it can; the client and the server share the machine. Every phase is bounded in time,
and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import multiprocessing
import os
import random
import resource
import signal
import time
import urllib.parse
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

from benchmarks.common import machine_line, percentile, request_json, running_server, table

PROBE_PATHS = ("/health", "status")  # "status": the probed job's status path


def probe(conn: Connection, url: str, status_path: str, interval: float, seconds: float) -> None:
    """In a process of its own: GET /health and the status path in turn until `seconds` pass; sends back
    {path: [latency, ...]}, or an error's text."""
    parts = urllib.parse.urlsplit(url)
    client = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    latencies: dict[str, list[float]] = {path: [] for path in PROBE_PATHS}
    errors = 0
    deadline = time.monotonic() + seconds
    turn = 0
    try:
        while time.monotonic() < deadline:
            name = PROBE_PATHS[turn % len(PROBE_PATHS)]
            turn += 1
            started = time.perf_counter()
            client.request("GET", status_path if name == "status" else name)
            response = client.getresponse()
            response.read()
            if response.status == 200:
                latencies[name].append(time.perf_counter() - started)
            else:
                errors += 1
            time.sleep(interval)
        conn.send((latencies, errors))
    except Exception as exc:  # said in the table, not lost in a child's traceback
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        client.close()


def run_probe(url: str, status_path: str, interval: float, seconds: float) -> tuple[dict[str, list[float]], int]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=probe, args=(child, url, status_path, interval, seconds), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(seconds + 60):
            raise TimeoutError("the probe did not answer")
        answer = parent.recv()
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()
    if isinstance(answer, str):
        raise RuntimeError(f"probe: {answer}")
    return answer


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client: raw HTTP/1.1 over asyncio streams ---------------------------------------------------


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return status, headers


@dataclass
class StreamCounts:
    opened: int = 0
    refused: int = 0  # not 200, or the connection failed
    status_events: int = 0
    results: int = 0
    pings: int = 0
    broken: int = 0  # ended without a result
    first: list[float] = field(default_factory=list)  # request to first status event, seconds


async def listen(host: str, port: int, path: str, counts: StreamCounts, first_event: asyncio.Future) -> None:
    """One event stream until its `result` event (or the connection's end); counts what it hears."""
    started = time.perf_counter()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status, headers = await read_head(reader)
        if status != 200 or headers.get("transfer-encoding") != "chunked":
            counts.refused += 1
            return
        counts.opened += 1
        pending = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                counts.broken += 1
                return
            pending += (await reader.readexactly(size + 2))[:-2]
            *events, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                if event.startswith(b":"):
                    counts.pings += 1
                elif b"event: status" in event:
                    counts.status_events += 1
                    if not first_event.done():
                        counts.first.append(time.perf_counter() - started)
                        first_event.set_result(None)
                elif b"event: result" in event:
                    counts.results += 1
                    return
    except (OSError, asyncio.IncompleteReadError, ValueError):
        counts.broken += 1
    finally:
        if not first_event.done():
            first_event.set_result(None)
        if writer is not None:
            writer.close()


class Poller:
    """One kept-alive connection polling one job's status at a steady interval, recording each latency."""

    def __init__(self, host: str, port: int, path: str, interval: float) -> None:
        self.host, self.port, self.path, self.interval = host, port, path, interval
        self.latencies: list[float] = []
        self.errors = 0
        self.recording = False

    async def run(self, stop: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        request = f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode()
        try:
            await asyncio.sleep(random.uniform(0, self.interval))  # the pollers do not poll in step
            while not stop.is_set():
                started = time.perf_counter()
                writer.write(request)
                status, headers = await read_head(reader)
                await reader.readexactly(int(headers.get("content-length", "0")))
                if self.recording:
                    if status == 200:
                        self.latencies.append(time.perf_counter() - started)
                    else:
                        self.errors += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            writer.close()


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    probe: dict[str, list[float]]
    probe_errors: int
    seconds: float
    server_cpu: float  # CPU seconds of the API process during the probe
    polls: list[float] = field(default_factory=list)
    poll_errors: int = 0


async def measure(args: argparse.Namespace, url: str, server_pid: int, jobs: list[str], engine: int) -> tuple:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    probed = f"/v2/requests/{jobs[len(jobs) // 2]}/status"  # a job in the middle of the queue
    phases: list[Phase] = []

    async def phase(name: str, seconds: float, pollers: list[Poller]) -> None:
        for poller in pollers:
            poller.latencies.clear()
            poller.recording = True
        before = cpu_seconds(server_pid)
        started = time.monotonic()
        latencies, errors = await asyncio.to_thread(run_probe, url, probed, args.probe_interval, seconds)
        elapsed = time.monotonic() - started
        used = cpu_seconds(server_pid) - before
        for poller in pollers:
            poller.recording = False
        polls = [x for poller in pollers for x in poller.latencies]
        poll_errors = sum(poller.errors for poller in pollers)
        phases.append(Phase(name, latencies, errors, elapsed, used, polls, poll_errors))
        print(f"  {name}: done in {elapsed:.1f} s", flush=True)

    print("phase 1: no listeners", flush=True)
    await phase("no listeners, engine paused", args.seconds, [])
    os.kill(engine, signal.SIGCONT)
    await phase("no listeners, engine running", args.busy_seconds, [])
    os.kill(engine, signal.SIGSTOP)

    counts = StreamCounts()
    print(f"opening {args.streams} event streams over {len(jobs)} jobs", flush=True)
    opening = time.monotonic()
    streams: list[asyncio.Task] = []
    gate = asyncio.Semaphore(args.open_concurrency)

    async def open_one(path: str, first: asyncio.Future) -> None:
        async with gate:
            task = asyncio.create_task(listen(host, port, path, counts, first))
            streams.append(task)
            await asyncio.wait_for(asyncio.shield(first), 60)

    firsts = [asyncio.get_running_loop().create_future() for _ in range(args.streams)]
    await asyncio.gather(
        *(open_one(f"/v2/requests/{jobs[i % len(jobs)]}/events", firsts[i]) for i in range(args.streams)),
        return_exceptions=True,
    )
    open_seconds = time.monotonic() - opening
    print(f"  {counts.opened} open ({counts.refused} refused) in {open_seconds:.1f} s", flush=True)

    stop = asyncio.Event()
    pollers = [
        Poller(host, port, f"/v2/requests/{jobs[i % len(jobs)]}/status", args.poll_interval)
        for i in range(args.pollers)
    ]
    polling = [asyncio.create_task(poller.run(stop)) for poller in pollers]
    await asyncio.sleep(args.poll_interval)  # every poller has started
    print(f"phase 2: {counts.opened} streams, {len(pollers)} pollers, engine paused", flush=True)
    await phase(f"{counts.opened} streams + {len(pollers)} pollers, engine paused", args.seconds, pollers)

    print("phase 3: the engine resumed", flush=True)
    os.kill(engine, signal.SIGCONT)
    await phase(f"{counts.opened} streams + {len(pollers)} pollers, engine running", args.busy_seconds, pollers)
    stop.set()
    await asyncio.gather(*polling, return_exceptions=True)

    # Every job left is cancelled: its streams get their result and end.
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for job in jobs:
            await client.post(f"/v2/requests/{job}/cancel")
    done, left = await asyncio.wait(streams, timeout=args.close_timeout) if streams else (set(), set())
    for task in left:
        task.cancel()
    return phases, counts, open_seconds, len(left)


def run(args: argparse.Namespace) -> None:
    # Every stream is a socket on both ends: the client's and the server's (which inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * (args.streams + args.pollers) + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard)
        )
    body = request_json(64, 64, steps=20, left=32, right=0)
    print("# Listeners benchmark: beyond serve --model random:tiny --device cpu (BEYOND_CPU_THREADS=1), loopback")
    print(machine_line())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    env = {"BEYOND_MAX_QUEUE": str(args.jobs + 10)}
    with running_server(env=env) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert server.proc is not None
        engine = int(client.get("/health").json()["worker_pid"])
        os.kill(engine, signal.SIGSTOP)
        try:
            jobs = []
            for i in range(args.jobs):
                response = client.post("/v2/seg-beyond", json={**body, "seed": i})
                response.raise_for_status()
                jobs.append(response.json()["request_id"])
            phases, counts, open_seconds, unclosed = asyncio.run(
                measure(args, server.url, server.proc.pid, jobs, engine)
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    rows = []
    for p in phases:
        health, status = p.probe["/health"], p.probe["status"]
        rows.append(
            [
                p.name,
                len(health) + len(status),
                ms(health, 50),
                ms(health, 99),
                ms(status, 50),
                ms(status, 99),
                len(p.polls) or None,
                ms(p.polls, 50) if p.polls else None,
                ms(p.polls, 99) if p.polls else None,
                f"{100 * p.server_cpu / p.seconds:.0f}%",
            ]
        )
    headers = ["phase", "probes", "/health p50", "p99", "status p50", "p99", "polls", "poller p50", "p99", "API CPU"]
    print(table(headers, rows))
    print("\n(milliseconds; probes: /health and status in turn from another process; API CPU: of one core)")
    errors = sum(p.probe_errors + p.poll_errors for p in phases)
    first = counts.first
    print(
        f"\nstreams: {counts.opened} opened in {open_seconds:.1f} s ({counts.refused} refused), first event"
        f" p50 {ms(first, 50):.1f} ms, p99 {ms(first, 99):.1f} ms; {counts.status_events} status events,"
        f" {counts.pings} pings, {counts.results} results, {counts.broken} ended without a result,"
        f" {unclosed} still open {args.close_timeout:g} s after the cancels; non-200 answers: {errors}"
    )


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listeners", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=None, help="open event streams (1000; quick 200)")
    parser.add_argument("--pollers", type=int, default=None, help="status pollers (100; quick 20)")
    parser.add_argument("--jobs", type=int, default=100, help="queued jobs the listeners are spread over")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between one poller's polls")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="seconds between the probe's requests")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per engine-paused phase (20; quick 5)")
    parser.add_argument(
        "--busy-seconds", type=float, default=None, help="seconds with the engine running (10; quick 3)"
    )
    parser.add_argument("--open-concurrency", type=int, default=50, help="streams being opened at once")
    parser.add_argument("--close-timeout", type=float, default=30.0, help="seconds the streams get to end")
    parser.add_argument("--quick", action="store_true", help="fewer listeners, shorter phases")
    args = parser.parse_args(argv)
    args.streams = args.streams or (200 if args.quick else 1000)
    args.pollers = args.pollers if args.pollers is not None else (20 if args.quick else 100)
    args.seconds = args.seconds or (5.0 if args.quick else 20.0)
    args.busy_seconds = args.busy_seconds or (3.0 if args.quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
