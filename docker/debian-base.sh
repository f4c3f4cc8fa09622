#!/usr/bin/env bash
# A Python 3.11 base image from Debian's packages, for machines that reach Debian's archive but
# no container registry. Prints the image's name; builds it only when missing.
#
#   base=$(bash docker/debian-base.sh) && docker build --build-arg PYTHON_IMAGE=$base ...
#
# The same Debian release (bookworm) and Python minor version as the pinned
# python:3.11.*-slim-bookworm, though with Debian's own patch release (3.11.2):
# `debootstrap --variant=minbase`, then python3.11, its venv module, its C headers and the
# public CA certificates (as the slim image has; torch.compile builds against the headers),
# `python` linked to python3.11, and the apt lists removed.
# Needs root and debootstrap (installed from Debian when missing).
set -euo pipefail
DOCKER=${DOCKER:-docker}
PACKAGES="python3.11 python3.11-venv libpython3.11-dev ca-certificates"
# The tag names the package list, so that an engine keeping an older stand-in (one without
# Python's headers, say) builds the new one instead of reusing it.
IMAGE=${FERSYNTH_DEBIAN_BASE:-fersynth-local/python:3.11-bookworm-$(printf %s "$PACKAGES" | sha256sum | cut -c1-8)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "debian-base: building $IMAGE needs root (debootstrap)" >&2; exit 1; }
log=build/image-check/debian-base.log
mkdir -p build/image-check
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq >"$log" 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >>"$log" 2>&1
fi
root=$(mktemp -d /tmp/fersynth-rootfs.XXXXXX)
chmod 755 "$root"  # apt in the chroot downloads as the _apt user
trap 'rm -rf "$root"' EXIT
echo "debian-base: debootstrap bookworm into $root (log: $log)" >&2
{
  debootstrap --variant=minbase bookworm "$root" "$MIRROR"
  chroot "$root" apt-get install -y -qq --no-install-recommends $PACKAGES
} >>"$log" 2>&1 || { echo "debian-base: debootstrap failed: $log" >&2; exit 1; }
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
# The build machine's resolver and name stay out (Docker mounts its own at run time).
rm -f "$root/etc/resolv.conf" "$root/etc/hostname"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | "$DOCKER" import -c 'CMD ["python3"]' - "$IMAGE" >/dev/null
echo "$IMAGE"
