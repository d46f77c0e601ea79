"""The `beyond` command line: its options, and which command runs (serve, worker, outpaint, download)."""

from __future__ import annotations

import argparse
import os
import sys

from server.commands import download, outpaint, serve, worker
from server.version import package_version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beyond", description="Self-hosted seg-beyond outpainting server.")
    parser.add_argument("--version", action="version", version=f"beyond {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    outpaint.add_parser(commands)
    worker.add_parser(commands)
    download.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
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
