#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the server, the engine and the benchmarks need on a bare
# CUDA machine with no internet, on top of what that machine already has (benchmarks/device_image.txt:
# Python 3.12 on x86_64, a CUDA torch, transformers, huggingface_hub, numpy, ...). Versions are those
# of the project's own environment, so the machine runs what was tested here; a package the machine
# has is carried only when something asks for a version its own is not (benchmarks/wheels.py decides).
# --no-deps: pip resolving accelerate's or torchsde's `torch` requirement would fetch a multi-GB CUDA build.
#
#   bash benchmarks/fetch_wheels.sh            # for the machine of device_image.txt (~15 MiB), then checked
#   bash benchmarks/fetch_wheels.sh --bare     # for a machine with torch alone: everything else (~100 MiB)
#   bash benchmarks/fetch_wheels.sh --local    # the same versions built for this interpreter (the CPU copy)
#   EXCLUDE="scipy" bash benchmarks/fetch_wheels.sh --bare    # leave packages out
#
# PYTHON (default python3) is the project's environment, whose versions are pinned (it needs pip and
# packaging); WHEELS (default .whl) is the folder. The check (python -m benchmarks.wheels check-wheels)
# makes sure every wheel installs on CPython 3.12 manylinux x86_64, that every requirement is met by the
# wheels plus the machine's packages, and that they stay small: tree and wheels travel together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELS:-.whl}
BARE=""
LOCAL=0
for arg in "$@"; do
    case $arg in
        --bare) BARE=--bare ;;
        --local) LOCAL=1 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

pins=$("$PY" -m benchmarks.wheels pins $BARE --exclude "${EXCLUDE:-}")
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
if [ "$LOCAL" = 1 ]; then
    # shellcheck disable=SC2086  # one argument per pin
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DEST" $pins
    echo "$(ls "$DEST"/*.whl | wc -l) wheels for $("$PY" -V) in $DEST/"
    exit 0
fi
# shellcheck disable=SC2086  # one argument per pin and per platform
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $("$PY" -m benchmarks.wheels platforms) -d "$DEST" $pins
max_mib=32
[ -n "$BARE" ] && max_mib=128
"$PY" -m benchmarks.wheels check-wheels "$DEST" --max-mib "$max_mib"
