"""The engine process's tie to the API process that started it: it ends within moments of that process's death.

An API process killed by `kill -9`, the OOM killer or a crash runs no clean-up: its engine process would be
orphaned and go on denoising (and holding its GPU memory) while a restarted server loads a new engine and
runs the same job again; on a GPU that can end in an out-of-memory failure of the restart. Two ties:

- the supervisor's pipe, everywhere: its other end closes when the API process dies, and the worker's reader
  thread, which reads the pipe from start-up (loading included) to the end, ends the process at its EOF;
- on Linux, the kernel's parent-death signal (prctl PR_SET_PDEATHSIG): SIGKILL, which needs nothing from this
  process, not even a free interpreter lock, should the pipe outlive its process (a copy held elsewhere).

The parent-death signal fires when the *thread* that started this process ends, not only the process. The
supervisor starts every worker from its own loop thread (supervisor.py checks that), which ends only when the
supervisor is stopped: a worker restart happens in that same thread, and a stopped supervisor's worker is
ended anyway (it would have nobody left to read its answers).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import NoReturn

log = logging.getLogger("beyond.worker")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# The exit status of an engine process that outlived its server (seen by nobody: its parent is gone).
EXIT_ORPHANED = 3


def end_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel kill this process when its parent dies; then make sure it has not already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            reason = os.strerror(ctypes.get_errno())
            log.warning("no parent-death signal (%s): the pipe alone ends this process", reason)
    # A parent that died before the call above sends no signal: this process already has another parent.
    if os.getppid() != parent_pid:
        parent_gone()


def parent_gone() -> NoReturn:
    """The API process is gone: end now, from whichever thread noticed.

    os._exit, not an exception or sys.exit: the main thread may be inside a long torch call that nothing can
    interrupt, and only the main thread's end would end the process. Nothing is lost by skipping the clean
    ending: the store is written by the API process alone (the next server puts this process's jobs back in
    the queue), its answers have no reader left, and the operating system frees its memory, the GPU's too.
    """
    log.warning("the server process is gone: the engine process ends")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_ORPHANED)
