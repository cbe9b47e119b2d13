# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# CUDA users: make demo TORCH_SPEC='torch==2.13.0' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu128'
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.bastion-installed

.PHONY: install browser demo test test-all bench gpu-wheels audit image image-cuda image-wheels image-digest image-test clean

# torch goes in first, on its own: a resolve without it would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt setup.py bastion/checkpoint/_planes.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The chat page's browser test (tests/serve/test_chat_browser.py): the pinned Playwright and
# the system's Chromium. Playwright's own browser download is not used (it fetches from a
# CDN at set-up; apt's chromium is signed and kept patched by the distribution). Installs
# Chromium with apt-get when run as root (without its recommended desktop packages, but with a
# font, so that the page lays out text); otherwise says how, and the test skips.
# Measured on a 2-core machine shared with other jobs: apt 55 s (with recommends: 115 packages, 113 MB),
# pip 7 s, the test 30-55 s (about 20 s of it starting the server and the browser).
BROWSER_STAMP := $(VENV)/.bastion-browser
$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[browser]'
	touch $(BROWSER_STAMP)

browser: $(BROWSER_STAMP)
	@if [ -n "$$BASTION_CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: installing Chromium with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; \
	else \
	  echo "make browser: Chromium is missing and cannot be installed here (needs root and apt-get)."; \
	  echo "  Install it (Debian: sudo apt-get install chromium) or set BASTION_CHROMIUM=/path/to/chromium;"; \
	  echo "  until then the browser test is skipped."; \
	fi

demo: install
	$(BIN)/bastion demo

# `browser` first: the suite includes the chat page's test in a real Chromium.
test: install browser
	$(BIN)/python -m pytest -q

test-all: install browser
	$(BIN)/python -m pytest -q -m ''

bench: install
	$(BIN)/python bench/train_throughput.py

# Wheels (Python 3.12, x86-64) of the pinned packages a stock CUDA/PyTorch image tends to
# lack, for machines without a registry: bench/gpu_check.sh installs .whl/ when present.
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions datasketch dill torchao
gpu-wheels: install
	rm -rf .whl
	for name in $(GPU_WHEELS); do \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl -c constraints.txt $$name || exit 1; done

# Known-vulnerability audit of every pinned dependency (torch included). Where the
# vulnerability service cannot be reached, pip-audit lists the packages it skipped.
audit: install
	$(BIN)/python -m pip install -q pip-audit
	{ cat constraints.txt; echo "$(TORCH_SPEC)"; } > $(VENV)/audit-requirements.txt
	$(BIN)/pip-audit --progress-spinner off --disable-pip --no-deps -r $(VENV)/audit-requirements.txt

# Container images of `bastion serve` (Dockerfile; docs/serving.md, "Container"). ENGINE=podman
# works too (add --format docker: the OCI format drops HEALTHCHECK). IMAGE_WHEELS=DIR builds
# offline from `make image-wheels`.
ENGINE       ?= docker
IMAGE_NAME   ?= bastion
IMAGE_WHEELS ?=
IMAGE_FLAGS  := $(if $(filter podman,$(notdir $(ENGINE))),--format docker) $(if $(IMAGE_WHEELS),--build-context wheels=$(IMAGE_WHEELS))

image:
	$(ENGINE) build $(IMAGE_FLAGS) --target cpu -t $(IMAGE_NAME):cpu .

image-cuda:
	$(ENGINE) build $(IMAGE_FLAGS) --target cuda -t $(IMAGE_NAME):cuda .

image-wheels:
	PIP="$(PYTHON) -m pip" deploy/wheels.sh .whl-image

# The current digest of the base image, to refresh the pin in the Dockerfile deliberately.
image-digest:
	deploy/base-digest.sh

# Build and run the image for real (tests/deploy/test_container.py; skipped where no engine runs).
image-test: install
	$(BIN)/python -m pytest -q -m slow tests/deploy

clean:
	rm -rf $(VENV) runs .pytest_cache
