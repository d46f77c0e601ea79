"""The engine process ends with the API process that started it, by each of its two ties (server/jobs/lifeline.py).

tests/test_recovery.py kills a real server; here each tie is tried alone, in small processes without torch."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from server.jobs.engine_process import Worker
from server.jobs.lifeline import EXIT_ORPHANED
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.supervisor import Supervisor
from tests.helpers import ROOT, running, tiny_worker_config


def busy_engine(conn: Connection) -> None:
    """An engine process whose main thread is in a call that does not return soon, as in a long torch call."""
    Worker(conn, tiny_worker_config()).listen()
    conn.send("listening")
    time.sleep(120)


def test_the_pipe_closing_ends_the_engine_process_while_its_main_thread_is_busy() -> None:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    engine = context.Process(target=busy_engine, args=(child,), daemon=True)
    engine.start()
    child.close()
    try:
        assert parent.poll(60) and parent.recv() == "listening"
        parent.close()  # this process lives on: only the pipe can tell the engine
        closed = time.monotonic()
        engine.join(10)
        took = time.monotonic() - closed
        assert engine.exitcode == EXIT_ORPHANED and took < 2.0, (engine.exitcode, took)
    finally:
        if engine.is_alive():
            engine.kill()


# A child that asks for the parent-death signal, says so with a file, and then only sleeps: no pipe to its parent.
ARMED_CHILD = """
import sys, time
from server.jobs.lifeline import end_with_parent
end_with_parent(int(sys.argv[1]))
open(sys.argv[2], "w").close()
time.sleep(120)
"""
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_parent_death_signal_kills_the_child_of_a_killed_process(tmp_path: Path) -> None:
    armed = tmp_path / "armed"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, ARMED_CHILD, str(armed)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not armed.exists():
            assert time.monotonic() < deadline and parent.poll() is None, "the child never armed itself"
            time.sleep(0.02)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        killed = time.monotonic()
        while running(child) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        assert not running(child) and time.monotonic() - killed < 2.0
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
            if running(child):
                os.kill(child, signal.SIGKILL)
        parent.wait(30)


def test_a_process_adopted_before_it_asked_for_the_signal_ends_at_once() -> None:
    # Its parent died before the call (simulated: the pid it was told is not its parent's): no signal would come.
    code = "from server.jobs.lifeline import end_with_parent; end_with_parent(-1); print('still here')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_ORPHANED and "still here" not in done.stdout


def test_only_the_supervisor_s_own_thread_starts_the_worker(tmp_path: Path) -> None:
    # The parent-death signal fires when the starting thread ends: a request's thread must not start it.
    supervisor = Supervisor(SqliteJobStore(tmp_path, ttl=60), tiny_worker_config())
    with pytest.raises(RuntimeError):
        supervisor._spawn()
    assert supervisor._proc is None
