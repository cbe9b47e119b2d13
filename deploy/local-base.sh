#!/bin/sh
# A stand-in for the Dockerfile's base image, built from the Debian mirror, for machines
# that reach a Debian mirror but no container registry (tests/deploy/test_container.py):
#   deploy/local-base.sh [TAG]          # default localhost/bastion-base:bookworm
#   BASTION_TEST_BASE_IMAGE=localhost/bastion-base:bookworm pytest -m slow tests/deploy
# Debian bookworm (minbase) with its python3 (3.11) and venv: the Dockerfile needs `python3`,
# `python3 -m venv`, groupadd/useradd and sh, nothing else. Needs root (or mmdebstrap's
# unshare mode) and the mmdebstrap package. Not for production: use the pinned official image.
set -eu
tag="${1:-localhost/bastion-base:bookworm}"
engine="${ENGINE:-podman}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rootfs=$(mktemp --suffix=.tar)
trap 'rm -f "$rootfs"' EXIT
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
$engine import --change 'CMD ["python3"]' "$rootfs" "$tag"
