"""The checks docker/build_test.sh runs against the image's container can fail: on processes that are not a
container, started here in a session of their own as `buildah run` is there."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.image_check import session_processes, stop, wait_ready

# A main Python process with a Python child, as `beyond serve` and its engine: on SIGTERM it stops its
# child and exits, unless told to ignore SIGTERM.
MAIN = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def on_term(*_):
    child.terminate()
    child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "ignore" else on_term)
print("ready", flush=True)
time.sleep(60)
"""


def start(mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", MAIN, mode], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_stop_sends_sigterm_to_the_main_process_and_waits_for_all_of_the_session() -> None:
    proc = start("stop")
    try:
        # The child's argv can read empty for a moment after Popen returned (seen once under load: the exec is
        # still setting up the new program): looked at again until it is there.
        deadline = time.monotonic() + 5
        while True:
            processes = session_processes(proc.pid)
            if all(p.argv for p in processes.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(processes) == 2 and all(p.is_python for p in processes.values())
        stop(proc.pid, grace=20)
        assert proc.wait(5) == 0  # it got SIGTERM and stopped its child itself
        assert session_processes(proc.pid) == {}
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.wait(5)


def test_stop_fails_when_the_container_outlives_its_grace_period() -> None:
    proc = start("ignore")
    try:
        with pytest.raises(SystemExit) as exited:
            stop(proc.pid, grace=1)
        assert exited.value.code == 1
        assert proc.poll() is None
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.wait(5)


def test_waiting_for_health_fails_at_once_when_the_container_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(10)
    started = time.monotonic()
    with pytest.raises(SystemExit):
        # Nothing listens on port 9 of loopback (discard); the session's end, not the timeout, decides.
        wait_ready("http://127.0.0.1:9", proc.pid, timeout=60)
    assert time.monotonic() - started < 10
