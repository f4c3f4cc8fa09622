#!/usr/bin/env bash
# Build the CPU and CUDA images and prove them on this machine: `make image-check`.
#
#   docker/image-check.sh               build both targets, then run tests/test_images.py on them
#   docker/image-check.sh --build-only  build both targets (`make image`)
#
# 1. A Docker engine: when none answers, Debian's docker.io is installed (as root) and dockerd
#    is started with no bridge network (containers here use the host's network or none), and
#    stopped again at the end.
# 2. A BuildKit client (`RUN --mount` in docker/Dockerfile): docker with buildx, or Debian's
#    docker.io client (/usr/bin/docker), whose BuildKit is built in.
# 3. The Python base image pinned in docker/Dockerfile; where it cannot be pulled (no registry
#    access), docker/debian-base.sh makes an equivalent one from Debian's packages.
# 4. Both targets, tagged with the git commit, on the host's network; CA_BUNDLE (a file) reaches
#    pip as a build secret (default: the bundle this machine's pip uses, PIP_CERT).
# 5. tests/test_images.py (pytest marker `image`): the CPU image's stages offline as uid 10001,
#    no CA certificate of this machine in either image, the pipeline under kfp.local's
#    DockerRunner. Sizes, build times and the outcome go to benchmarks/results/images.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=build/image-check
mkdir -p "$OUT"
build_only=false
[ "${1:-}" = "--build-only" ] && build_only=true

say() { echo "image-check: $*" >&2; }
die() { echo "image-check: $*" >&2; exit 1; }

# --- 1. the engine ---------------------------------------------------------------------------
started_dockerd=""
stop_dockerd() {
  if [ -n "$started_dockerd" ]; then
    say "stopping the dockerd it started (pid $started_dockerd)"
    kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT

engine_up() { "${DOCKER:-docker}" info >/dev/null 2>&1 || /usr/bin/docker info >/dev/null 2>&1; }
if ! engine_up; then
  if ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] || die "no Docker engine and not root: install Docker (or run as root to install Debian's docker.io)"
    say "installing Debian's docker.io"
    apt-get update -qq >"$OUT/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >>"$OUT/apt.log" 2>&1 \
      || die "apt-get install docker.io failed: $OUT/apt.log"
  fi
  [ "$(id -u)" = 0 ] || die "dockerd is installed but not running, and starting it needs root"
  say "starting dockerd (no bridge network; log: $OUT/dockerd.log)"
  dockerd --bridge=none --iptables=false --ip6tables=false >"$OUT/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do engine_up && break; sleep 1; done
  engine_up || die "dockerd did not answer within 60 s: $OUT/dockerd.log"
fi

# --- 2. a client that builds with BuildKit ---------------------------------------------------
if [ -z "${DOCKER:-}" ]; then
  for candidate in docker /usr/bin/docker; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" buildx version >/dev/null 2>&1 \
      || "$candidate" version --format '{{.Client.Version}}' 2>/dev/null | grep -qE '^20\.'; then
      DOCKER=$candidate; break
    fi
  done
fi
[ -n "${DOCKER:-}" ] || die "no docker client that builds with BuildKit: install buildx (or Debian's docker.io)"
export DOCKER DOCKER_BUILDKIT=1

# --- 3. the base image -----------------------------------------------------------------------
PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' docker/Dockerfile)
if "$DOCKER" image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  base=$PYTHON_IMAGE
elif timeout 120 "$DOCKER" pull -q "$PYTHON_IMAGE" >"$OUT/pull.log" 2>&1; then
  base=$PYTHON_IMAGE
else
  say "$PYTHON_IMAGE cannot be pulled ($(tail -1 "$OUT/pull.log")): a base image from Debian's packages"
  base=$(bash docker/debian-base.sh)
fi

# --- 4. the images ---------------------------------------------------------------------------
TAG=$(git rev-parse --short=12 HEAD)
CPU_IMAGE="$($BIN/fersynth params kfp.image):$TAG"
GPU_IMAGE="$($BIN/fersynth params kfp.gpu_image):$TAG"
CA_BUNDLE=${CA_BUNDLE-${PIP_CERT:-}}
secret=()
if [ -n "$CA_BUNDLE" ]; then
  [ -s "$CA_BUNDLE" ] || die "CA_BUNDLE=$CA_BUNDLE: no such file"
  secret=(--secret "id=ca_bundle,src=$CA_BUNDLE")
fi
build() {  # build TARGET IMAGE: seconds taken on stdout
  local start=$SECONDS
  say "building $1 -> $2 (log: $OUT/build-$1.log)"
  "$DOCKER" build --progress plain --network host "${secret[@]}" \
    --build-arg "PYTHON_IMAGE=$base" --build-arg "GIT_COMMIT=$TAG" \
    -f docker/Dockerfile --target "$1" -t "$2" . >"$OUT/build-$1.log" 2>&1 \
    || die "building $1 failed: the end of $OUT/build-$1.log: $(tail -5 "$OUT/build-$1.log")"
  echo $((SECONDS - start))
}
cpu_seconds=$(build cpu "$CPU_IMAGE")
gpu_seconds=$(build cuda "$GPU_IMAGE")
size() { "$DOCKER" image inspect --format '{{.Size}}' "$1"; }
say "cpu  $CPU_IMAGE: $(($(size "$CPU_IMAGE") / 1000000)) MB, built in ${cpu_seconds} s"
say "cuda $GPU_IMAGE: $(($(size "$GPU_IMAGE") / 1000000)) MB, built in ${gpu_seconds} s"
$build_only && exit 0

# --- 5. the proof ----------------------------------------------------------------------------
start=$SECONDS
set +e
FERSYNTH_IMAGE=$CPU_IMAGE FERSYNTH_GPU_IMAGE=$GPU_IMAGE FERSYNTH_BASE_IMAGE=$base FERSYNTH_CA_BUNDLE=$CA_BUNDLE \
  "$BIN/python" -m pytest -m image -p no:cacheprovider tests/test_images.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e
test_seconds=$((SECONDS - start))
"$BIN/python" - "$OUT/pytest.log" <<EOF
import json, re, subprocess, sys
from pathlib import Path

docker, images = "$DOCKER", {"cpu": "$CPU_IMAGE", "cuda": "$GPU_IMAGE"}
site = "/opt/venv/lib/python3.11/site-packages"

def largest(image):  # what takes the space: the venv's ten largest packages, MB
    out = subprocess.run([docker, "run", "--rm", "--network", "none", image, "sh", "-c", f"du -sm {site}/* | sort -rn | head -10"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[1].rsplit("/", 1)[1]: int(line.split()[0]) for line in out.splitlines()}

def size(image):
    return int(subprocess.run([docker, "image", "inspect", "--format", "{{.Size}}", image],
                              capture_output=True, text=True, check=True).stdout) // 10**6

summary = [l for l in Path(sys.argv[1]).read_text().splitlines() if re.search(r"\d+ (passed|failed)", l)]
result = {
    "command": "make image-check",
    "git_commit": "$TAG",
    "base_image": "$base",
    "ca_bundle_given": bool("$CA_BUNDLE"),
    "images": {k: {"ref": v, "size_mb": size(v), "largest_packages_mb": largest(v)} for k, v in images.items()},
    "build_seconds": {"cpu": $cpu_seconds, "cuda": $gpu_seconds},
    "test_seconds": $test_seconds,
    "total_seconds": $SECONDS,  # engine, base image, builds and tests
    "tests": summary[-1].strip("= ") if summary else "no summary",
}
Path("benchmarks/results/images.json").write_text(json.dumps(result, indent=2) + "\n")
print("image-check: benchmarks/results/images.json:", result["tests"])
EOF
exit "$status"
