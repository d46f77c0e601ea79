"""`beyond serve`: start the API server (and through it, the engine's worker process)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.commands import download, outpaint, worker
from server.settings import Settings
from server.version import package_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beyond", description="Self-hosted seg-beyond outpainting server.")
    parser.add_argument("--version", action="version", version=f"beyond {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    # Each option defaults to its BEYOND_* variable; Settings reads both, the option wins.
    serve.add_argument("--host", help="interface to listen on (BEYOND_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (BEYOND_PORT, default 8000)")
    serve.add_argument("--model", help=worker.MODEL_HELP)
    serve.add_argument("--data-dir", help="where jobs and images are kept (BEYOND_DATA_DIR, default ./data)")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (BEYOND_DEVICE, default auto)")
    serve.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="compute precision (BEYOND_DTYPE)")
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="API only, no engine: jobs go to `beyond worker` nodes through BEYOND_REDIS_URL (docs/scaling.md)",
    )
    outpaint.add_parser(commands)
    worker.add_parser(commands)
    download.add_parser(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.http.app import create_app
    from server.jobs.store import StoreCorrupt, StoreUnavailable

    settings = load_settings(
        host=args.host,
        port=args.port,
        model=args.model,
        data_dir=args.data_dir,
        device=args.device,
        dtype=args.dtype,
        local_worker=False if args.no_worker else None,
    )
    if settings is None:
        return 2
    if not settings.local_worker and not settings.redis_url:
        print(
            "beyond: an API node without a worker (--no-worker) shares its jobs through Redis: set BEYOND_REDIS_URL",
            file=sys.stderr,
        )
        return 2
    problem = preflight(settings, engine=settings.local_worker)
    if problem:
        print(f"beyond: {problem}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        app = create_app(settings)
    except StoreCorrupt as exc:
        if exc.problem == "missing":
            advice = (
                f"Put it back; or, to start with an empty store, move the old files aside"
                f" (mv {Path(exc.path).parent / 'jobs'} {Path(exc.path).parent / 'jobs.orphaned'})."
            )
        else:
            advice = (
                f"Move it aside (mv {exc.path} {exc.path}.broken) and start again: a new, empty store is made;"
                " the requests in the old one are lost."
            )
        print(f"beyond: {exc}.\n{advice}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"beyond: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"beyond: {exc}", file=sys.stderr)
        return 2
    # Our own access log (server/middleware.py) replaces uvicorn's, which would log query strings.
    # X-Forwarded-* only from the proxies named in BEYOND_FORWARDED_ALLOW_IPS: uvicorn's own default believes
    # any client on 127.0.0.1, which on a shared host is anyone with a shell.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips or "",
        log_level=settings.log_level.lower(),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "outpaint":
        return outpaint.outpaint(args)
    if args.command == "download":
        return download.run(args)
    if args.command == "worker":
        return worker.run(args)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
