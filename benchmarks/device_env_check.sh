#!/usr/bin/env bash
# The GPU machine's software, proven on this CPU before a GPU run is spent on it (CI runs this after
# `make test`; a few minutes).
#
#   bash benchmarks/device_env_check.sh
#
# 1. Downloads the wheels fetch_wheels.sh carries, for the machine (CPython 3.12, manylinux x86_64),
#    and checks them: every wheel installs there, compiled ones are cp312/abi3 manylinux x86_64
#    builds, each requirement is met by the wheels plus the machine's own packages
#    (benchmarks/device_image.txt), and together they stay under 32 MiB.
# 2. Builds a virtual environment with the machine's package versions (transformers 5.17.0,
#    huggingface_hub 1.33.0, tokenizers 0.23.2, accelerate 1.15.0, safetensors 0.8.0, numpy 2.5.2 and
#    the unpinned rest), with this interpreter and the CPU build of torch 2.13.0 standing in for
#    Python 3.12 and the machine's CUDA torch 2.11.0.
# 3. Installs the same versions of the carried wheels the way device_check.sh installs them (pip
#    --target, no index, no dependencies) and runs `device_check.sh --cpu` end to end: imports, a
#    request, diffusers against ours, the server (v1, v2 polled as the SDK polls, a fused batch), the
#    batching tolerance, all 18 samplers and the compile warm-up, random:tiny on the CPU. It fails on
#    any unmet requirement, failed or skipped section.
#
# What differs from the machine is printed: the interpreter (where this one is not 3.12: the compiled
# wheels are then this Python's builds of the same versions, and numpy the newest release for it),
# torch (CPU build), and the versions of the machine's unpinned packages (the newest for this Python).
# PYTHON (default .venv/bin/python) is the project's environment, whose versions are carried;
# KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT_PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/beyond-device-env.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
step() { echo; echo "== $* ($(($(date +%s) - started)) s)"; }

step "the wheels for the machine (CPython 3.12, manylinux x86_64)"
PYTHON=$PROJECT_PY WHEELS=$WORK/wheels-cp312 bash benchmarks/fetch_wheels.sh 2> >(grep -v "is ignored: it is neither" >&2)

step "the same versions for this interpreter ($(python3 -V))"
PYTHON=$PROJECT_PY WHEELS=$WORK/wheels-here bash benchmarks/fetch_wheels.sh --local 2> >(grep -v "is ignored: it is neither" >&2)
differ=0
for wheel in "$WORK"/wheels-cp312/*.whl; do
    name=$(basename "$wheel")
    if [ ! -e "$WORK/wheels-here/$name" ]; then
        differ=$((differ + 1))
        here=$(cd "$WORK/wheels-here" && ls "${name%%-*}"-*.whl)
        echo "differs: $name (machine) / $here (here)"
    elif ! cmp -s "$wheel" "$WORK/wheels-here/$name"; then
        echo "PROBLEM: $name differs between the two downloads" >&2
        exit 1
    fi
done
echo "$differ compiled wheels are this interpreter's builds of the machine's versions; the others are the same files"

step "a copy of the machine's Python packages"
python3 -m venv "$WORK/venv"
requirements=$("$PROJECT_PY" -m benchmarks.wheels image-requirements 2> >(sed 's/^/differs: /' >&2))
# shellcheck disable=SC2086  # one argument per requirement
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check $requirements 2> >(grep -v "is ignored: it is neither" >&2)
"$WORK/venv/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -i -E "^(torch|transformers|huggingface.hub|tokenizers|accelerate|safetensors|numpy|pillow|scipy)==" \
    | tr '\n' ' '
echo

step "device_check.sh --cpu with them"
export PYTHON=$WORK/venv/bin/python WHEELS=$WORK/wheels-here SITE=$WORK/site OUT=$WORK/out STRICT=1
bash benchmarks/device_check.sh --cpu
step "done: the machine's environment works (see 'differs:' above for what this copy could not match)"
