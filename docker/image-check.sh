#!/usr/bin/env bash
# Build the CPU and CUDA images and prove them on this machine: `make image-check`
# (`make image` is its first four steps). What each step does and why: docs/deployment.md#images.
#
#   bash docker/image-check.sh               build both targets, then run tests/image/test_images.py
#   bash docker/image-check.sh --build-only  build both targets
#
# 1. A Docker engine; where none runs: Debian's docker.io installed and dockerd started with no
#    bridge network, then stopped at the end (both need root).
# 2. A client that builds with BuildKit.
# 3. The pinned Python base image, or docker/debian-base.sh's where it cannot be pulled.
# 4. Both targets, tagged with the git commit (`-dirty` for a tree with uncommitted changes),
#    on the host's network, with the CA bundle (CA_BUNDLE, default the one this machine's pip
#    or OpenSSL uses) as a build secret.
# 5. tests/image/test_images.py; sizes, build times and the outcome go to benchmarks/results/images.json.
#    The check adds a throwaway canary CA to the bundle it passes, so that the test that looks
#    for the bundle in the images always has a certificate no image may hold.
set -euo pipefail
# CA_BUNDLE may be relative to where make was called.
if [ -n "${CA_BUNDLE:-}" ]; then CA_BUNDLE=$(realpath -m -- "$CA_BUNDLE"); fi
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
  if [ -S /var/run/docker.sock ] && [ ! -w /var/run/docker.sock ]; then
    die "no permission on /var/run/docker.sock: run as root, or join the docker group"
  fi
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and installing or starting one needs root"
  if ! command -v dockerd >/dev/null; then
    say "installing Debian's docker.io (log: $OUT/apt.log)"
    apt-get update -qq >"$OUT/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >>"$OUT/apt.log" 2>&1 \
      || die "apt-get install docker.io failed: $OUT/apt.log"
  fi
  say "starting dockerd (no bridge network; log: $OUT/dockerd.log)"
  dockerd --bridge=none --iptables=false --ip6tables=false >"$OUT/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do engine_up && break; sleep 1; done
  engine_up || die "dockerd did not answer within 60 s: $OUT/dockerd.log"
fi

# --- 2. a client that builds with BuildKit (`RUN --mount` in docker/Dockerfile) --------------
# docker with the buildx plugin; or Debian bookworm's docker.io client (20.10), whose BuildKit
# is built in; newer distributions' docker.io wants the docker-buildx package.
buildkit_client() {
  local candidate
  for candidate in docker /usr/bin/docker; do
    command -v "$candidate" >/dev/null || continue
    if "$candidate" buildx version >/dev/null 2>&1 \
      || "$candidate" version --format '{{.Client.Version}}' 2>/dev/null | grep -qE '^20\.'; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
if [ -z "${DOCKER:-}" ]; then
  if ! DOCKER=$(buildkit_client) && [ "$(id -u)" = 0 ]; then
    say "installing docker-buildx"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-buildx >>"$OUT/apt.log" 2>&1 || true
    DOCKER=$(buildkit_client) || true
  fi
fi
[ -n "${DOCKER:-}" ] || die "no docker client that builds with BuildKit: install buildx (docker-buildx)"
export DOCKER DOCKER_BUILDKIT=1

# The images' names: the git commit (`-dirty` for a tree with uncommitted changes).
TAG=$(git rev-parse --short=12 HEAD)
[ -z "$(git status --porcelain)" ] || TAG="$TAG-dirty"
CPU_IMAGE="$($BIN/fersynth params kfp.image):$TAG"
GPU_IMAGE="$($BIN/fersynth params kfp.gpu_image):$TAG"

# --- disk: fail now, with the numbers, rather than in the middle of a 10-minute build ---------
# Measured from a fresh engine (docs/deployment.md): the build peaks about 7.5 GB above where it
# started (both images share their environment layer), the image tests about 2 GB more (the
# pipeline's outputs and containers); 11 GB leaves a margin. Images already built (same tag)
# need only the tests' share. IMAGE_CHECK_MIN_FREE_GB=0 turns the check off.
docker_root=$("$DOCKER" info --format '{{.DockerRootDir}}' 2>/dev/null || true)
if [ -d "${docker_root:-/nonexistent}" ]; then
  free_gb=$(df --output=avail -BG "$docker_root" | tail -1 | tr -dc 0-9)
  need_gb=${IMAGE_CHECK_MIN_FREE_GB:-11}
  if [ "$free_gb" -lt "$need_gb" ] && ! "$DOCKER" image inspect "$CPU_IMAGE" "$GPU_IMAGE" >/dev/null 2>&1; then
    die "only ${free_gb} GB free under $docker_root, and building and testing both images needs about ${need_gb} GB: free some (docker system prune), or set IMAGE_CHECK_MIN_FREE_GB"
  fi
fi

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
if [ -z "${CA_BUNDLE+set}" ]; then
  for candidate in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$candidate" ] && [ -s "$candidate" ]; then CA_BUNDLE=$candidate; break; fi
  done
fi
CA_BUNDLE=${CA_BUNDLE:-}
secret_file=""
if [ -n "$CA_BUNDLE" ]; then
  [ -s "$CA_BUNDLE" ] || die "CA_BUNDLE=$CA_BUNDLE: no such file, or empty"
  secret_file=$CA_BUNDLE
fi
if ! $build_only; then
  # The canary: a CA made here, now, that no image may hold (tests/image/test_images.py looks for it).
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=fersynth image-check canary CA" \
    -keyout /dev/null -out "$OUT/canary-ca.pem" 2>/dev/null || die "openssl could not make the canary CA"
  cat ${CA_BUNDLE:+"$CA_BUNDLE"} "$OUT/canary-ca.pem" >"$OUT/build-ca-bundle.pem"
  secret_file="$PWD/$OUT/build-ca-bundle.pem"
fi
secret=()
if [ -n "$secret_file" ]; then
  case "$secret_file" in *,*) die "CA bundle path $secret_file: a comma cannot be passed to --secret";; esac
  secret=(--secret "id=ca_bundle,src=$secret_file")
fi
build() {  # build TARGET IMAGE: the seconds taken, on stdout
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
FERSYNTH_IMAGE=$CPU_IMAGE FERSYNTH_GPU_IMAGE=$GPU_IMAGE FERSYNTH_BASE_IMAGE=$base FERSYNTH_CA_BUNDLE=$secret_file \
  "$BIN/python" -m pytest -m image -p no:cacheprovider tests/image/test_images.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e
FERSYNTH_IMAGE=$CPU_IMAGE FERSYNTH_GPU_IMAGE=$GPU_IMAGE FERSYNTH_BASE_IMAGE=$base \
  "$BIN/python" docker/image_report.py --out "$OUT" --tag "$TAG" --ca-bundle-given "$([ -n "$CA_BUNDLE" ] && echo yes || echo no)" \
  --build-seconds "$cpu_seconds" "$gpu_seconds" --test-seconds $((SECONDS - start)) --total-seconds "$SECONDS" \
  || say "could not write benchmarks/results/images.json"
exit "$status"
