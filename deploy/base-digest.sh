#!/bin/sh
# Print the current multi-platform index digest of the Dockerfile's base image, to refresh
# the pin in Dockerfile (ARG PYTHON_IMAGE) deliberately:
#   deploy/base-digest.sh                      # python:3.12-slim-bookworm
#   deploy/base-digest.sh python:3.13-slim-bookworm
# Uses skopeo, or docker buildx imagetools, whichever is installed; needs the registry.
set -eu
image="${1:-python:3.12-slim-bookworm}"
case "$image" in
  */*) ref="$image" ;;
  *) ref="docker.io/library/$image" ;;
esac
if command -v skopeo >/dev/null 2>&1; then
  digest=$(skopeo inspect --raw "docker://$ref" | sha256sum | cut -d' ' -f1)
  digest="sha256:$digest"
elif command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
  digest=$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}' | tr -d '"')
else
  echo "base-digest.sh: needs skopeo or docker buildx" >&2
  exit 2
fi
echo "$image@$digest"
