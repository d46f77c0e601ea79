#!/usr/bin/env bash
# Builds docker/Dockerfile and runs the image: /health must answer 200 and one POST /v1/seg-beyond must
# return the outpainted JPEG, as the image's unprivileged user; the image's HEALTHCHECK must pass while it
# serves and fail once it stopped; SIGTERM must stop it. Everything it made is removed at the end.
#
# Needs no Docker daemon and no registry: root, buildah and debootstrap (Debian: apt-get install buildah
# debootstrap), Debian's mirror and PyPI. It builds on a local Debian 12 base made with debootstrap (the
# default base, debian:bookworm-slim, is the same release) with the CPU build of torch, which the host's
# pip fetches from wherever it is configured to (BEYOND_IMAGE_TORCH names it).
#
#   docker/build_test.sh     # about 5 minutes on 2 cores, up to 12 when they are busy (CI runs it)
#
# Settings (environment):
#   BEYOND_IMAGE_TORCH           torch for the image (default torch==2.13.0+cpu)
#   BEYOND_IMAGE_TORCH_FROM      `host` (default): the host's pip fetches that wheel and the build installs
#                                the file; `build`: the build installs the requirement from PyPI, as for
#                                production. BEYOND_IMAGE_TORCH=torch==2.13.0 BEYOND_IMAGE_TORCH_FROM=build
#                                builds the default CUDA image (5.75 GB, 17 minutes here) and runs it on the CPU
#   BEYOND_IMAGE_COMPRESSED_SIZE 1: also report the gzipped size (a registry's; minutes for a large image)
#   BEYOND_IMAGE_MIRROR          the Debian mirror (default http://deb.debian.org/debian)
#   BEYOND_IMAGE_CA_BUNDLE       the CA bundle pip trusts in the build (default the host's, which holds a
#                                TLS-inspecting proxy's certificate where there is one)
#   BEYOND_IMAGE_PYTHON          a Python with the project's test extras (default .venv/bin/python, made by
#                                `make install` when missing)
#   TMPDIR                       where its storage goes (default /var/tmp; 4 GB, 11 GB for the CUDA image)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env "$0" "$@"  # debootstrap and buildah's storage need root
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build_test.sh: needs $tool (apt-get install buildah debootstrap)" >&2; exit 2; }
done

TORCH=${BEYOND_IMAGE_TORCH:-torch==2.13.0+cpu}
TORCH_FROM=${BEYOND_IMAGE_TORCH_FROM:-host}
MIRROR=${BEYOND_IMAGE_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${BEYOND_IMAGE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PYTHON=${BEYOND_IMAGE_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || make install
export PYTHONPATH=$ROOT

# Storage of its own: nothing shared with other users of buildah, and all of it goes at the end.
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/beyond-image.XXXXXX")
B=(buildah --root "$WORK/storage" --runroot "$WORK/run")
BASE=localhost/beyond-test-base:bookworm
IMAGE=localhost/beyond-test:latest
SERVER_PID=
SID=

cleanup() {
  local status=$?
  set +e
  if [ -n "$SID" ]; then
    pkill -KILL -s "$SID" 2>/dev/null
  fi
  [ -n "$SERVER_PID" ] && wait "$SERVER_PID" 2>/dev/null
  if [ "$status" -ne 0 ]; then
    for log in "$WORK"/*.log; do
      [ -f "$log" ] && { echo "---- last lines of $(basename "$log")"; tail -n 40 "$log"; }
    done
  fi
  "${B[@]}" rm --all >/dev/null 2>&1
  "${B[@]}" rmi --all --force >/dev/null 2>&1
  # Whatever is still mounted below WORK (an interrupted step), deepest first, before removing it.
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

START=$SECONDS
phase() { echo "[$((SECONDS - START)) s] $*"; }

phase "base: debootstrap --variant=minbase bookworm from $MIRROR"
container=$("${B[@]}" from scratch)
rootfs=$("${B[@]}" mount "$container")
case "$rootfs" in "$WORK"/storage/?*) ;; *) echo "unexpected mount point: '$rootfs'" >&2; exit 1 ;; esac
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1
# As in debian:bookworm-slim: updates and security fixes, no package caches, an empty /dev.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
rm -rf "${rootfs:?}"/var/cache/apt/*.bin "${rootfs:?}"/var/cache/apt/archives/*.deb \
  "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/dev/*
"${B[@]}" umount "$container" >/dev/null
"${B[@]}" commit --quiet --rm "$container" "$BASE" >/dev/null

mkdir "$WORK/wheels"
if [ "$TORCH_FROM" = host ]; then
  phase "torch: $TORCH through the host's pip"
  # For the base's Python (Debian 12: 3.11).
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --dest "$WORK/wheels" "$TORCH"
  torch_arg=/wheels/$(cd "$WORK/wheels" && ls torch-*.whl)
else
  torch_arg=$TORCH  # installed by the build from PyPI, as the production image is
fi

phase "build: docker/Dockerfile on $BASE with $torch_arg"
# --format docker keeps the HEALTHCHECK (an OCI image has none). The host's CA bundle and the wheel are
# mounted for the build's RUN steps only.
"${B[@]}" bud --isolation chroot --network host --format docker --pull=never \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH="$torch_arg" --build-arg CUDA_REQUIREMENT= \
  --build-arg PIP_CERT=/run/build-ca.crt \
  --volume "$CA_BUNDLE:/run/build-ca.crt:ro" --volume "$WORK/wheels:/wheels:ro" \
  --file docker/Dockerfile --tag "$IMAGE" . >"$WORK/build.log" 2>&1
size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE")
phase "built $IMAGE: $size (uncompressed)"
if [ "${BEYOND_IMAGE_COMPRESSED_SIZE:-0}" = 1 ]; then
  # What a registry stores and a host pulls: the layers gzipped, as `docker push` sends them.
  "${B[@]}" push --quiet "$IMAGE" "oci:$WORK/oci:latest"
  phase "compressed: $("$PYTHON" -c 'import json, sys; from pathlib import Path
blobs = Path(sys.argv[1]) / "blobs" / "sha256"
manifest = json.loads(Path(sys.argv[1], "index.json").read_text())["manifests"][0]["digest"].split(":")[1]
layers = json.loads((blobs / manifest).read_text())["layers"]
total = sum(layer["size"] for layer in layers)
print(f"{total / 1e9:.2f} GB in {len(layers)} gzipped layers")' "$WORK/oci")"
  rm -rf "$WORK/oci"
fi

user=$("${B[@]}" inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE")
healthcheck=$("${B[@]}" inspect --type image --format '{{index .Docker.Config.Healthcheck.Test 1}}' "$IMAGE")
read -r -a command <<<"$("${B[@]}" inspect --type image \
  --format '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}{{range .Docker.Config.Cmd}}{{.}} {{end}}' "$IMAGE")"
[ "$user" = beyond ] || { echo "the image runs as '$user', not beyond" >&2; exit 1; }
[ -n "$healthcheck" ] || { echo "the image has no HEALTHCHECK" >&2; exit 1; }

phase "run: ${command[*]} (the image's entrypoint and command) on a loopback port"
port=$("$PYTHON" -c 'from tests.helpers import free_port; print(free_port())')
# One engine thread, as in the test suite: on two busy cores torch's default (one per core) made the
# request 20 to 40 times slower here.
env=(-e BEYOND_HOST=127.0.0.1 -e BEYOND_PORT="$port" -e BEYOND_MODEL=random:tiny -e BEYOND_DEVICE=cpu
  -e BEYOND_CPU_THREADS=1)
container=$("${B[@]}" from --pull=never "$IMAGE")
# No PID namespace under chroot isolation: the container's processes are found by their session id.
setsid "${B[@]}" run --isolation chroot --network host "${env[@]}" "$container" -- "${command[@]}" \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
# Without job control the background process is no group leader, so setsid makes it the leader of a
# new session without forking: the session's id is its pid, once setsid has run.
for _ in $(seq 50); do
  [ "$(ps -o sid= -p "$SERVER_PID" | tr -d ' ')" = "$SERVER_PID" ] && SID=$SERVER_PID && break
  sleep 0.1
done
[ -n "$SID" ] || { echo "buildah run did not start a session of its own" >&2; exit 1; }
"$PYTHON" -m tests.image_check check --session "$SID" --url "http://127.0.0.1:$port"

"${B[@]}" run --isolation chroot --network host "${env[@]}" "$container" -- /bin/sh -c "$healthcheck"
phase "HEALTHCHECK: passes while it serves"

"$PYTHON" -m tests.image_check stop --session "$SID"
wait "$SERVER_PID" || true  # uvicorn ends by re-raising SIGTERM: not a zero status
SERVER_PID=
SID=
if refused=$("${B[@]}" run --isolation chroot --network host "${env[@]}" "$container" -- /bin/sh -c "$healthcheck" 2>&1); then
  echo "the HEALTHCHECK passed with no server" >&2
  exit 1
fi
grep -q "Connection refused" <<<"$refused" || { echo "the HEALTHCHECK failed otherwise: $refused" >&2; exit 1; }
phase "HEALTHCHECK: fails once it stopped"
phase "image test passed"
