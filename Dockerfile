# syntax=docker/dockerfile:1.7
# `bastion serve` in a container: CPU (the default target) and CUDA variants.
#
#   docker build -t bastion:cpu .                      # or: make image
#   docker build -t bastion:cuda --target cuda .       # or: make image-cuda
#   docker compose -f deploy/compose.yaml up           # keys as a secret, model read-only
#
# Podman: add `--format docker` (the OCI image format has no HEALTHCHECK). Offline, or where
# pip cannot reach the indexes: `--build-context wheels=DIR` with every wheel in DIR
# (`make image-wheels`), and the build uses no index at all. docs/serving.md, "Container".
#
# The base is the official Python image pinned by its multi-platform index digest (Python
# 3.12.14 on Debian bookworm, resolved 2026-09-14). Refresh it deliberately, never implicitly:
# deploy/base-digest.sh prints the current digest (skopeo or docker buildx imagetools).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254

# Wheels for an offline build: empty unless --build-context wheels=DIR replaces it.
FROM scratch AS wheels

# ---- build: a virtual environment in /opt/bastion ------------------------------------------
FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/bastion
WORKDIR /src
# Only what the wheel is built from: no tests, runs, keys or checkpoints (see .dockerignore).
COPY pyproject.toml constraints.txt README.md ./
COPY bastion ./bastion

FROM build-base AS build-cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, on its own, from the CPU index: a resolve without it would pull the CUDA build.
# Then the project with every dependency pinned by constraints.txt (the same pins `make
# install` uses). With a wheels context, pip uses no index at all.
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels)" ]; then set -- --no-index --find-links /wheels; \
    else set -- --index-url "$TORCH_INDEX_URL"; fi; \
    /opt/bastion/bin/pip install "$@" "$TORCH_SPEC"; \
    if [ -n "$(ls -A /wheels)" ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/bastion/bin/pip install "$@" -c constraints.txt . ; \
    /opt/bastion/bin/pip check

FROM build-base AS build-cuda
ARG TORCH_SPEC=torch==2.13.0
# PyTorch's CUDA wheels carry the CUDA runtime, cuDNN and NCCL as pip packages; the host's
# NVIDIA driver is all the container needs (NVIDIA Container Toolkit: --gpus / devices).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "$(ls -A /wheels)" ]; then set -- --no-index --find-links /wheels; \
    else set -- --index-url "$TORCH_INDEX_URL"; fi; \
    /opt/bastion/bin/pip install "$@" "$TORCH_SPEC"; \
    if [ -n "$(ls -A /wheels)" ]; then set -- --no-index --find-links /wheels; else set --; fi; \
    /opt/bastion/bin/pip install "$@" -c constraints.txt . ; \
    /opt/bastion/bin/pip check

# ---- runtime: no compiler, no pip cache, no source tree, not root -------------------------
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/sh", "-eu", "-c"]
# A fixed, unprivileged uid/gid that owns nothing in the image: the code is root-owned and
# read-only to it. Any other uid works too (`--user`, compose's `user:`), e.g. the owner of
# the mounted key file and checkpoint, which bastion writes readable by their owner only.
RUN groupadd --system --gid 10001 bastion \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin bastion
# Read-only root filesystem: everything that may be written goes to /tmp (a tmpfs:
# `--read-only --tmpfs /tmp`), never to the image. No secret is set here: keys come from
# the mounted secret (--key-file) or BASTION_API_KEYS at run time.
ENV PATH=/opt/bastion/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    BASTION_HEALTH_URL=http://127.0.0.1:8000/health
WORKDIR /tmp
EXPOSE 8000
# Liveness of the server itself (GET /health needs no key). The slim image has no curl:
# Python's urllib. With --port or TLS, set BASTION_HEALTH_URL (and SSL_CERT_FILE for a
# private CA) to match.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['BASTION_HEALTH_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["bastion", "serve"]

FROM runtime AS cuda
COPY --from=build-cuda /opt/bastion /opt/bastion
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
CMD ["--checkpoint", "/model", "--host", "0.0.0.0", "--port", "8000", "--key-file", "/run/secrets/bastion_keys", "--device", "cuda"]

# Last stage: the default target.
FROM runtime AS cpu
COPY --from=build-cpu /opt/bastion /opt/bastion
USER 10001:10001
CMD ["--checkpoint", "/model", "--host", "0.0.0.0", "--port", "8000", "--key-file", "/run/secrets/bastion_keys"]
