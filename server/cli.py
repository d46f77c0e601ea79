"""`beyond serve`: start the API server (and through it, the engine's worker process)."""

from __future__ import annotations

import argparse
import os
import sys

from models.names import DEFAULT_MODEL
from server import hubcache, oneshot
from server.version import package_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beyond", description="Self-hosted seg-beyond outpainting server.")
    parser.add_argument("--version", action="version", version=f"beyond {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    # Each option defaults to its BEYOND_* variable; Settings reads both, the option wins.
    serve.add_argument("--host", help="interface to listen on (BEYOND_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (BEYOND_PORT, default 8000)")
    serve.add_argument(
        "--model",
        help=f"random:tiny, random:sdxl, a diffusers folder, a .safetensors file or a hub id "
        f"(BEYOND_MODEL, default {DEFAULT_MODEL})",
    )
    serve.add_argument("--data-dir", help="where jobs and images are kept (BEYOND_DATA_DIR, default ./data)")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (BEYOND_DEVICE, default auto)")
    serve.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="compute precision (BEYOND_DTYPE)")
    oneshot.add_parser(commands)
    hubcache.add_parser(commands)
    return parser


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from models.loading import ModelSpecError, check_spec
    from models.styles import StyleFileError, default_registry
    from server.app import create_app
    from server.logs import configure as configure_logs
    from server.settings import Settings

    overrides = {
        name: value
        for name, value in (
            ("host", args.host),
            ("port", args.port),
            ("model", args.model),
            ("data_dir", args.data_dir),
            ("device", args.device),
            ("dtype", args.dtype),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValueError as exc:
        print(f"beyond: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logs(settings.log_level, settings.log_format)
    try:
        check_spec(settings.model)
    except ModelSpecError as exc:
        print(f"beyond: cannot use model {settings.model!r}:\n{exc}", file=sys.stderr)
        return 2
    try:
        default_registry(settings.styles_dir)
    except StyleFileError as exc:
        print(f"beyond: cannot load the styles: {exc}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"beyond: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "outpaint":
        return oneshot.outpaint(args)
    if args.command == "download":
        return hubcache.run(args)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
