#!/usr/bin/env bash
# The whole GPU check in one command, for a bare CUDA machine with no internet (H100/H200):
#
#   bash benchmarks/device_check.sh            # GPU: random:sdxl, fp16, 6 minutes at most, the install included
#   bash benchmarks/device_check.sh --cpu      # the same code here: random:tiny on the CPU
#
# Installs the wheels in .whl/ (fill it with benchmarks/fetch_wheels.sh) into /tmp/site the way pip
# does with no index and no dependencies, checks every requirement of the project and of what it
# imports against the versions it finds, checks the imports, then runs `python -m
# benchmarks.device_check` with the remaining arguments and the time left. Results go to $OUT when it
# is set, else to benchmarks/results/; the JSON is written after every section, and the summary is
# printed last even when the run was stopped at the time limit.
#
# PYTHON (default python3) is the interpreter; WHEELS (default .whl) and SITE (default /tmp/site)
# the wheel folder and where it is installed; DEVICE_CHECK_BUDGET (default 360 s, 600 with --cpu) is
# the whole run's wall time; STRICT=1 (CI) fails on an unmet requirement or a failed or skipped section.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEELS:-.whl}
SITE_DIR=${SITE:-/tmp/site}
OUT_DIR=${OUT:-benchmarks/results}
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
BUDGET=${DEVICE_CHECK_BUDGET:-$([ $CPU = 1 ] && echo 600 || echo 360)}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# The libraries' notices (diffusers repeats one at every fp32 VAE decode) would crowd out the figures.
export DIFFUSERS_VERBOSITY=${DIFFUSERS_VERBOSITY:-error} TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}
started=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - started))); }

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE_DIR" \
        "$WHEEL_DIR"/*.whl || { echo "installing $WHEEL_DIR/ failed" >&2; exit 1; }
    export PYTHONPATH=$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels in $(( $(date +%s) - started )) s"
elif [ $CPU = 0 ]; then
    echo "no wheels in $WHEEL_DIR/: using the interpreter's own packages (run benchmarks/fetch_wheels.sh first if they are missing)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
# Unmet requirements are said first: an import error later would name only one of them.
if ! "$PY" -m benchmarks.wheels check-installed; then
    [ "${STRICT:-0}" = 1 ] && exit 1
    echo "(going on: the imports decide)"
fi
"$PY" -c "import torch, diffusers, transformers, huggingface_hub, fastapi, pydantic, uvicorn; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), \
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__, \
'| huggingface_hub', huggingface_hub.__version__, '| fastapi', fastapi.__version__)" \
    || { echo "the engine's or the server's packages do not import" >&2; exit 1; }

strict=()
[ "${STRICT:-0}" = 1 ] && strict=(--strict)
# The Python part gets what is left, less a margin for the summary; the timeout is the hard stop.
limit=$(left)
[ "$limit" -lt 60 ] && limit=60
timeout "$limit" "$PY" -m benchmarks.device_check --out "$OUT_DIR" --budget-s "$((limit - 15))" "${strict[@]}" "$@" \
    2>&1 | tee "$OUT_DIR/device_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" != 0 ]; then
    latest=$(ls -t "$OUT_DIR"/*.json 2>/dev/null | head -1)
    [ -n "$latest" ] && "$PY" -m benchmarks.device_check --summary "$latest"
fi
echo "device_check exit status $rc after $(( $(date +%s) - started )) s (124: stopped at the time limit; the JSON has the sections done)"
exit "$rc"
