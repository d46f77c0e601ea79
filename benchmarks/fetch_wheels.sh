#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the engine needs on a bare CUDA machine with no internet,
# for Python 3.12 on x86_64: every package that our engine, the benchmarks and their requirements
# import, except torch and what a torch install already brings (filelock, typing-extensions,
# sympy, networkx, jinja2, fsspec, setuptools, triton). Versions are those of the project's own
# environment, so the device runs what was tested here; --no-deps, because pip resolving
# accelerate's or torchsde's `torch` requirement would download a multi-GB CUDA build.
#
#   bash benchmarks/fetch_wheels.sh               # for the lent H100/H200 image: only what it lacks (~21 MiB)
#   bash benchmarks/fetch_wheels.sh --bare        # for a bare torch install: all of them (~92 MiB)
#   EXCLUDE="scipy" bash benchmarks/fetch_wheels.sh --bare   # ~58 MiB: scipy is only for the lms sampler
#
# The device tool carries at most 64 MiB (tree and wheels together), so --bare fits only with
# EXCLUDE. PYTHON (default: python3) is the environment whose versions are pinned; it needs pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LEAN=1
[ "${1:-}" = "--bare" ] && LEAN=0
EXCLUDE=${EXCLUDE:-}

# The device image's own packages (/work/.library/device/KINDS.md, "Python packages already there"
# and its pip list): by default these and their requirements stay behind. transformers travels anyway: the image's
# 5.17 is older than the one diffusers was tested with here.
IMAGE_HAS="accelerate annotated-doc anyio certifi charset-normalizer click h11 hf-xet huggingface-hub idna
markdown-it-py mdurl numpy packaging pillow psutil pydantic pydantic-core pygments pyyaml regex requests rich
safetensors scipy shellingham tokenizers tqdm typer typing-inspection annotated-types urllib3 zipp"

pins=$("$PY" - "$LEAN" "$IMAGE_HAS" "$EXCLUDE" <<'PYEOF'
import importlib.metadata as md
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement

lean, image_has, exclude = sys.argv[1] == "1", set(sys.argv[2].split()), set(sys.argv[3].split())
env = default_environment()
env.update(python_version="3.12", python_full_version="3.12.3", platform_machine="x86_64", sys_platform="linux")
roots = ["diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "tokenizers", "torchsde",
         "scipy", "numpy", "pillow"]
with_torch = {"torch", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
              "fsspec", "setuptools", "triton"}
seen: dict[str, str] = {}
todo = list(roots)
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in with_torch or name in exclude or (lean and name in image_has):
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        sys.exit(f"{name} is not installed in this environment: install the project first (pip install -e .)")
    seen[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            todo.append(req.name)
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PYEOF
)
mkdir -p .whl
rm -f .whl/*.whl
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    -d .whl $pins
echo "$(ls .whl/*.whl | wc -l) wheels in .whl/, $(du -sh .whl | cut -f1) (the device tool carries 64 MiB with the tree)"
