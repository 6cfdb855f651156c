# Everything a fresh machine needs, from this repo's own files.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 first and by exact version: here that is the CPU wheel on disk; a looser spec
# would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint format scan clean image test-image

$(BIN)/ctrlnet: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,k8s,dev]"
	touch $@

venv: $(BIN)/ctrlnet

## Train the embedded default (tiny random base, synthetic fill50k) on this machine.
demo: venv
	$(BIN)/ctrlnet train --output runs/demo-$$(date +%Y%m%d-%H%M%S)

## Format check and lint (ruff; settings in pyproject.toml), and the Dockerfile (hadolint: each
## exception is justified where it is made). `make format` rewrites.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/hadolint docker/Dockerfile

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Pod hardening, measured by checkov (docs/kubernetes.md#hardening). checkov pins old boto3/botocore,
## packaging and networkx, which s3fs and torch cannot share: it gets its own venv, .venv-checkov.
CHECKOV ?= checkov==3.3.30
scan: venv
	test -x .venv-checkov/bin/checkov || ($(PY) -m venv .venv-checkov && .venv-checkov/bin/pip install -q "$(CHECKOV)")
	$(BIN)/python tools/checkov_pods.py --checkov .venv-checkov/bin/checkov

## The test suite (CPU, no network). The container tests (tests/image) skip here: make test-image.
test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The trainer image (docker/Dockerfile): docker where an engine answers, else podman, on the
## CUDA base, or a local Debian base where no registry can be reached (docker/build.sh).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= localhost/ctrlnet-trainer:$(VERSION)
image:
	IMAGE=$(IMAGE) docker/build.sh

## Container tests: the built image run as the rendered pod specs say (root: namespaces, mounts).
test-image: venv
	CTRLNET_TEST_IMAGE=$(IMAGE) $(BIN)/python -m pytest -q tests/image $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-checkov runs .pytest_cache
