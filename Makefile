# Developer entry points. `make demo` and `make test` are the two commands a new machine needs;
# both set up the virtualenv and build (or reuse) the control-plane binaries first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
N ?= 500

.PHONY: setup lint fmt test unit integration controlplane dev-cluster dev-cluster-down bench demo image e2e-kind clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy provisioner controlplane tests
	$(VENV)/bin/lint-imports

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Builds kube-apiserver, kube-controller-manager and etcd from controlplane/go.mod into
# ~/.cache/nfs-provisioner (or reuses them, or the KUBEBUILDER_ASSETS / TEST_ASSET_* binaries).
controlplane: setup
	$(PY) -m controlplane.runner binaries

unit: setup
	$(PY) -m pytest tests/unit -q

integration: controlplane
	$(PY) -m pytest tests/integration

test: controlplane
	$(PY) -m pytest tests

dev-cluster: controlplane
	$(PY) -m controlplane.runner up --state .dev

dev-cluster-down: setup
	$(PY) -m controlplane.runner down --state .dev

bench: controlplane
	$(PY) -m tests.bench.provision --claims $(N)

demo: controlplane
	$(PY) -m controlplane.demo

image:
	docker build -t nfs-provisioner:0.1.0 .

e2e-kind:
	tests/e2e/kind.sh

clean: dev-cluster-down
	rm -rf $(VENV) build *.egg-info
