"""What the benchmark scripts share: percentiles, a markdown table, and a line about the machine."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the engine benchmarks run without the server's test helpers
    from tests.helpers import ServerProcess


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an observed value, never an interpolation."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """Machine, Python, torch and diffusers versions, and the GPU if there is one."""
    import diffusers
    import torch

    parts = [
        f"{cpu_name()} ({os.cpu_count()} logical cores)",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"diffusers {diffusers.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        parts.append("no GPU")
    idle = cpu_idle()
    if idle:
        parts.append(idle)
    return "; ".join(parts)


def cpu_idle() -> str | None:
    """How idle CPUs wait, where Linux says: what a sleeping thread's wake-up costs depends on it (a VM that
    halts its virtual CPUs at once, as with haltpoll's guest_halt_poll_ns=0, pays the host for each wake-up)."""
    try:
        driver = Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return None
    words = f"cpuidle {driver}"
    try:
        poll = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text().strip()
        words += f", guest_halt_poll_ns={poll}"
    except OSError:
        pass
    return words


@contextlib.contextmanager
def running_server(model: str = "random:tiny", env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A real `beyond serve` on a free loopback port with a throw-away data folder (CPU, one thread)."""
    from tests.helpers import ServerProcess

    with tempfile.TemporaryDirectory(prefix="beyond-bench-") as folder:
        server = ServerProcess(Path(folder), model=model, env=env).start()
        try:
            yield server.wait_ready()
        finally:
            server.stop()


def request_json(width: int, height: int, **fields: object) -> dict:
    """A request body with a smooth PNG of the given size; fields override the defaults."""
    from tests.helpers import request_body, smooth_image

    return request_body(smooth_image(width, height), **fields)
