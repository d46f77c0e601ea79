"""`beyond serve`: the API server, and through it (unless --no-worker) the engine's supervisor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.commands.startup import MODEL_HELP, load_settings, preflight


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="start the HTTP server")
    # Each option defaults to its BEYOND_* variable; Settings reads both, the option wins.
    serve.add_argument("--host", help="interface to listen on (BEYOND_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (BEYOND_PORT, default 8000)")
    serve.add_argument("--model", help=MODEL_HELP)
    serve.add_argument("--data-dir", help="where jobs and images are kept (BEYOND_DATA_DIR, default ./data)")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (BEYOND_DEVICE, default auto)")
    serve.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="compute precision (BEYOND_DTYPE)")
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="API only, no engine: jobs go to `beyond worker` nodes through BEYOND_REDIS_URL (docs/scaling.md)",
    )


def run(args: argparse.Namespace) -> int:
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
    # Our own access log (server/http/middleware.py) replaces uvicorn's, which would log query strings.
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
