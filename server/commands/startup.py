"""What `beyond serve` and `beyond worker` both do to start: read the settings, check them ahead, and
build the job store and the engine's supervisor from them.

Its own module so that neither command imports the other, and so that `beyond worker`, which has no
HTTP, does not import the HTTP layer for them (server/http/app.py builds its services from here too).
The job modules are imported inside the builders: `import server.commands.cli` stays light.
"""

from __future__ import annotations

import socket
import sys
from typing import TYPE_CHECKING

from models.names import DEFAULT_MODEL
from server.settings import Settings

if TYPE_CHECKING:
    from server.guard.images import ImageLimits
    from server.jobs.redis_connection import RedisTLS
    from server.jobs.store import JobStore
    from server.jobs.supervisor import Supervisor
    from server.metrics import Metrics

REDIS_START_WAIT = 30.0  # seconds
# The --model help of `beyond serve` and `beyond worker`.
MODEL_HELP = (
    "random:tiny, random:sdxl, a diffusers folder, a .safetensors file or a hub id"
    f" (BEYOND_MODEL, default {DEFAULT_MODEL})"
)


def load_settings(**options: object) -> Settings | None:
    """The BEYOND_* settings with the command line's options over them (None: not given); None, with
    the reason on stderr, when they are invalid."""
    try:
        return Settings(**{name: value for name, value in options.items() if value is not None})
    except ValueError as exc:
        print(f"beyond: invalid settings: {exc}", file=sys.stderr)
        return None


def preflight(settings: Settings, *, engine: bool) -> str | None:
    """Configure the logs, then check what would otherwise fail later: the styles and, for a process
    that runs the engine, the model spec and the device. Returns why it cannot start, or None."""
    from models.loading import ModelSpecError, check_spec
    from models.styles import StyleFileError, default_registry
    from server.logs import configure as configure_logs

    configure_logs(settings.log_level, settings.log_format)
    if engine:  # an API node loads no model: the workers check theirs
        try:
            check_spec(settings.model, tokenizer_dir=settings.tokenizer_dir)
        except ModelSpecError as exc:
            return f"cannot use model {settings.model!r}:\n{word_model_error(exc)}"
    try:
        default_registry(settings.styles_dir)
    except StyleFileError as exc:
        return f"cannot load the styles: {exc}"
    problem = device_problem(settings.device) if engine else None
    if problem:
        return f"cannot use device {settings.device!r}: {problem}"
    return None


def word_model_error(exc: Exception) -> str:
    """The engine's facts, with the server's own settings named where they are the way out."""
    from models.errors import InvalidTokenizerDir, TokenizersNotFound

    if isinstance(exc, InvalidTokenizerDir):
        return f"BEYOND_TOKENIZER_DIR={exc.tokenizer_dir}: {exc}"
    if isinstance(exc, TokenizersNotFound):
        return f"{exc}\n(set BEYOND_TOKENIZER_DIR to a folder holding tokenizer/ and tokenizer_2/)"
    return str(exc)


DEVICE_CHECK = """
import sys, torch
name = sys.argv[1]
kind, _, index = name.partition(":")
if kind == "cuda":
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available on this machine (no GPU, no driver, or a CPU build of torch)")
    if index and int(index) >= torch.cuda.device_count():
        sys.exit(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
elif kind == "mps" and not torch.backends.mps.is_available():
    sys.exit("MPS is not available on this machine")
"""


def device_problem(device: str) -> str | None:
    """Why an explicitly asked-for accelerator cannot be used, checked in a child process (this one
    never imports torch); None when it can, or for auto and cpu."""
    if device in ("auto", "cpu"):
        return None
    import subprocess

    out = subprocess.run([sys.executable, "-c", DEVICE_CHECK, device], capture_output=True, text=True, timeout=120)
    if out.returncode == 0:
        return None
    return (out.stderr.strip().splitlines() or ["unknown"])[-1]


def redis_tls(settings: Settings) -> RedisTLS:
    """The TLS files of the Redis connection (BEYOND_REDIS_CA_FILE, _CERT_FILE, _KEY_FILE)."""
    from server.jobs.redis_connection import RedisTLS

    return RedisTLS(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)


def build_store(settings: Settings) -> JobStore:
    """The one place the job store is chosen: Redis shared by several nodes, or SQLite embedded."""
    if settings.redis_url:
        from server.jobs.redis_store import RedisJobStore

        # A name stable across restarts of this node, so a restarted node releases its own jobs at once; the
        # worker's name or device keeps apart the workers of one host that share a data folder (one per GPU).
        consumer = f"{socket.gethostname()}:{settings.data_dir.resolve()}:{settings.worker_name or settings.device}"
        # A node started with its Redis waits a while for it, then stops with StoreUnavailable.
        return RedisJobStore(
            settings.redis_url,
            ttl=settings.result_ttl,
            reclaim_after=settings.reclaim_after,
            consumer=consumer,
            wait=REDIS_START_WAIT,
            tls=redis_tls(settings),
        )
    from server.jobs.sqlite_store import SqliteJobStore

    return SqliteJobStore(settings.data_dir, ttl=settings.result_ttl)


def image_limits(settings: Settings) -> ImageLimits:
    from server.guard.images import ImageLimits

    return ImageLimits(
        max_bytes=settings.max_input_bytes,
        max_pixels=settings.max_input_pixels,
        max_canvas_pixels=settings.max_canvas_pixels,
        allow_private_urls=settings.allow_private_urls,
        timeout=settings.fetch_timeout,
    )


def build_supervisor(settings: Settings, store: JobStore, metrics: Metrics | None) -> Supervisor:
    """The supervisor of one engine process: `beyond serve`'s local worker, or a `beyond worker`."""
    from server.jobs.messages import WorkerConfig
    from server.jobs.supervisor import Supervisor

    config = WorkerConfig(
        model=settings.model,
        device=settings.device,
        dtype=settings.dtype,
        limits=image_limits(settings),
        styles_dir=settings.styles_dir,
        expansion_model=settings.expansion_model,
        lora_dir=settings.lora_dir,
        lora_cache=settings.lora_cache,
        tokenizer_dir=settings.tokenizer_dir,
        cpu_threads=settings.cpu_threads,
        channels_last=settings.channels_last,
        fuse_qkv=settings.fuse_qkv,
        compile=settings.compile,
        compile_sizes=settings.compile_sizes or "",
        log_level=settings.log_level,
        log_format=settings.log_format,
        max_batch=settings.max_batch,
        prefetch=settings.worker_prefetch,
    )
    return Supervisor(
        store,
        config,
        purge_interval=settings.purge_interval,
        backoff=settings.worker_restart_backoff,
        metrics=metrics,
    )
