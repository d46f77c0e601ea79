#!/usr/bin/env bash
# The whole GPU check in one command, for a bare H100/H200 machine with no internet:
#
#   bash benchmarks/device_check.sh            # GPU: random:sdxl, fp16, under 8 minutes
#   bash benchmarks/device_check.sh --cpu      # the same plumbing here, random:tiny (~1 min)
#
# Installs the wheels carried in .whl/ (fill it with benchmarks/fetch_wheels.sh) into /tmp/site,
# then runs `python -m benchmarks.device_check` with the remaining arguments. Results go to $OUT
# when it is set (the device tool's folder that comes back), else to benchmarks/results/.
# PYTHON (default python3) picks the interpreter; DEVICE_CHECK_TIMEOUT (default 470 s) is a hard
# stop for the Python part on top of its own per-section guards (it saves its JSON after every section).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
started=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(ls .whl/*.whl | wc -l) wheels in $(( $(date +%s) - started )) s"
elif [ "${1:-}" != "--cpu" ]; then
    echo "no wheels in .whl/: using the interpreter's own packages (run benchmarks/fetch_wheels.sh first if they are missing)"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)" \
    || { echo "the engine's packages do not import" >&2; exit 1; }

timeout "${DEVICE_CHECK_TIMEOUT:-470}" "$PY" -m benchmarks.device_check --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/device_check.log"
rc=${PIPESTATUS[0]}
echo "device_check exit status $rc after $(( $(date +%s) - started )) s (124: stopped by the timeout; the JSON has the sections done)"
exit "$rc"
