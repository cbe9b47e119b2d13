#!/bin/sh
# Every wheel the image's build needs, into DIR, for a build without any index:
#   deploy/wheels.sh DIR [PYTHON_VERSION]        # default 3.12, the pinned base's Python
#   docker build --build-context wheels=DIR -t bastion:cpu .
# Wheels for x86-64 Linux (manylinux); torch from the PyTorch CPU index (TORCH_INDEX_URL),
# everything else pinned by constraints.txt. Run from the repository root; needs pip.
set -eu
dir="${1:?usage: deploy/wheels.sh DIR [PYTHON_VERSION]}"
version="${2:-3.12}"
pip="${PIP:-python3 -m pip}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
set -- --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform linux_x86_64 -d "$dir"
mkdir -p "$dir"
$pip download "$@" --index-url "$torch_index" -c constraints.txt "$torch_spec"
# The project's own dependencies (bastion itself is built from source in the image), with
# torch held to the wheel just downloaded, and what building the project needs.
deps=$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
torch_version=$(ls "$dir" | sed -n 's/^torch-\([^-]*\)-.*/\1/p' | head -n 1)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
{ cat constraints.txt; echo "torch==$torch_version"; } > "$constraints"
# shellcheck disable=SC2086 # one requirement per word
$pip download "$@" --find-links "$dir" -c "$constraints" $deps "setuptools>=77" wheel
