"""Checks a running container of the image from the outside (docker/build_test.sh starts it).

`check`: /health answers 200 for the tiny model, one POST /v1/seg-beyond returns a JPEG of the outpainted
size, and every Python process of the container runs as the image's unprivileged user.
`stop`: SIGTERM to the container's main process (what `docker stop` sends to the entrypoint), then
nothing of the container may be left within the grace period.

The container's processes are found by their session: the script starts `buildah run` with setsid, and
chroot isolation puts the processes in no PID namespace of their own, so they are visible here.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import jpeg, request_body, smooth_image

# The image's user (docker/Dockerfile: useradd --uid 10001).
IMAGE_UID = 10001


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    uid: int
    argv: tuple[str, ...]

    @property
    def is_python(self) -> bool:
        return bool(self.argv) and Path(self.argv[0]).name.startswith("python")


def session_processes(sid: int) -> dict[int, Proc]:
    found: dict[int, Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # After the command name in parentheses: state, ppid, pgrp, session, ...
            fields = stat[stat.rindex(")") + 2 :].split()
            # A zombie has ended; its parent (the script's shell) reaps it later.
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            uid_line = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:"))
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, StopIteration, ValueError):
            continue  # gone meanwhile, or a kernel thread
        argv = tuple(part.decode(errors="replace") for part in cmdline.split(b"\0") if part)
        found[int(entry.name)] = Proc(int(entry.name), int(fields[1]), int(uid_line.split()[1]), argv)
    return found


def fail(message: str) -> None:
    print(f"image check FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def wait_ready(url: str, sid: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not session_processes(sid):
            fail("the container exited before /health answered 200")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    fail(f"/health did not answer 200 within {timeout:.0f} s")
    raise AssertionError  # fail() exits


def check(url: str, sid: int, timeout: float) -> None:
    waited = wait_ready(url, sid, timeout)
    health = httpx.get(f"{url}/health", timeout=10)
    body = health.json()
    if health.status_code != 200 or body.get("state") != "ready" or body.get("model") != "random:tiny":
        fail(f"/health answered {health.status_code}: {body}")
    print(f"GET /health: 200 after {waited:.1f} s, state {body['state']}, model {body['model']}, {body['device']}")

    image = smooth_image(96, 64)
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/seg-beyond", json=request_body(image, left=32, seed=7), timeout=300)
    if response.status_code != 200 or response.headers.get("content-type") != "image/jpeg":
        fail(f"POST /v1/seg-beyond answered {response.status_code} {response.headers.get('content-type')}")
    size = jpeg(response.content).size
    if size != (96 + 32, 64):
        fail(f"POST /v1/seg-beyond returned a {size} JPEG, expected (128, 64)")
    took = time.monotonic() - started
    print(f"POST /v1/seg-beyond: 200, a {size[0]}x{size[1]} JPEG of {len(response.content)} bytes in {took:.1f} s")

    pythons = [p for p in session_processes(sid).values() if p.is_python]
    # The API process and its engine process at least.
    if len(pythons) < 2 or any(p.uid != IMAGE_UID for p in pythons):
        fail(f"expected the API and engine processes as uid {IMAGE_UID}: {pythons}")
    print(f"{len(pythons)} Python processes, all as uid {IMAGE_UID}")


def stop(sid: int, grace: float) -> None:
    processes = session_processes(sid)
    # The entrypoint's process: the Python process whose parent is not Python (buildah's chroot helper).
    main = [p for p in processes.values() if p.is_python and not (p.ppid in processes and processes[p.ppid].is_python)]
    if len(main) != 1:
        fail(f"cannot tell the container's main process: {list(processes.values())}")
    os.kill(main[0].pid, signal.SIGTERM)
    started = time.monotonic()
    while session_processes(sid):
        if time.monotonic() - started > grace:
            fail(f"still running {grace:.0f} s after SIGTERM: {list(session_processes(sid).values())}")
        time.sleep(0.2)
    print(f"SIGTERM: every process of the container ended within {time.monotonic() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["check", "stop"])
    parser.add_argument("--session", type=int, required=True, help="session id of the `buildah run` process")
    parser.add_argument("--url", help="the server's base URL (check)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for /health (check)")
    parser.add_argument("--grace", type=float, default=30, help="seconds to wait after SIGTERM (stop)")
    args = parser.parse_args()
    if args.action == "check":
        if not args.url:
            parser.error("check needs --url")
        check(args.url.rstrip("/"), args.session, args.timeout)
    else:
        stop(args.session, args.grace)


if __name__ == "__main__":
    main()
