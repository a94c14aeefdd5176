# Developer entry points. `make demo` and `make test` are the two commands a new machine needs;
# both set up the virtualenv and build (or reuse) the control-plane binaries first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
N ?= 300

.PHONY: setup lock lint fmt test unit integration controlplane dev-cluster dev-cluster-down bench demo image image-local e2e-host e2e e2e-storage e2e-kind clean

setup: $(STAMP)

# Installs exactly the versions in constraints.txt (see its header); setup.cfg keeps the ranges.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Move every dependency to the newest version setup.cfg allows and record it in constraints.txt.
lock: setup
	$(PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -iv '^nfs.provisioner'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@echo "constraints.txt refreshed; run make lint test before committing it"

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

# tests/e2e needs root, Debian packages and a real node: `make e2e` runs it.
test: controlplane
	$(PY) -m pytest tests --ignore=tests/e2e

dev-cluster: controlplane
	$(PY) -m controlplane.runner up --state .dev

dev-cluster-down: setup
	$(PY) -m controlplane.runner down --state .dev

# One control plane: the API server's ceiling, then the provisioner at QPS 5/10, 1000/2000 and the
# defaults, then a bare provisioner as yardstick, N claims each (tests/bench/provision.py), with
# each process's CPU per claim. PROFILE=qps1000 adds py-spy's view of that run's provisioning.
# HOLD=20000: then memory and start-up with HOLD claim/PV pairs cached, measured at a quarter, half
# and all of it (tests/bench/memory.py, its own control plane; the population is created directly,
# not provisioned).
bench: controlplane
	@if [ -n "$(PROFILE)" ]; then $(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'; fi
	$(PY) -m tests.bench.provision --claims $(N) $(if $(PROFILE),--profile $(PROFILE))
	@if [ -n "$(HOLD)" ]; then \
		sizes="0,$$(( $(HOLD) / 4 )),$$(( $(HOLD) / 2 )),$(HOLD)"; \
		echo "$(PY) -m tests.bench.memory --sizes $$sizes"; \
		$(PY) -m tests.bench.memory --sizes "$$sizes"; \
	fi

demo: controlplane
	$(PY) -m controlplane.demo

# Needs BuildKit (default from Docker 23; DOCKER_BUILDKIT=1 on 20.10). No registry reachable:
# `make image-local` (root) builds the same Dockerfile on a debootstrapped base.
image:
	DOCKER_BUILDKIT=1 docker build -t nfs-provisioner:0.1.0 .

image-local: setup
	$(PY) -m controlplane.images build --state .image

# What make e2e needs from Debian (real-node.md): nfs-ganesha (user-space NFS server), libnfs and
# FUSE (the user-space NFS client the kubelet mounts with), docker.io (image builds only),
# containerd/runc/CNI plugins (the node), debootstrap and busybox-static (local base images).
E2E_PACKAGES := nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-dev libnfs-utils fuse3 libfuse3-dev \
	docker.io containerd runc containernetworking-plugins debootstrap busybox-static iptables

# Root only: the packages (only when one is missing) and the e2e extra, for e2e and e2e-storage.
e2e-host: controlplane
	@test "$$(id -u)" = 0 || { echo "make e2e: run as root (containerd, kubelet, mounts, NFS server)" >&2; exit 1; }
	test "$$(dpkg-query -W -f='$${db:Status-Abbrev}\n' $(E2E_PACKAGES) 2>/dev/null | grep -c '^ii')" = $(words $(E2E_PACKAGES)) || { \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(E2E_PACKAGES) || { \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(E2E_PACKAGES); }; }
	$(PY) -m pip install --quiet -c constraints.txt -e '.[e2e]'

# Builds kubelet, kube-scheduler, and Kubernetes' e2e.test and agnhost next to the cached control
# plane, then runs tests/e2e (five of Kubernetes' storage tests among them) on a one-node cluster
# that it starts and takes down again (the last check: the host is as it was).
e2e: e2e-host
	controlplane/build.sh kubelet kube-scheduler e2e.test agnhost
	$(PY) -m pytest tests/e2e -m 'not storage_suite'

# Every one of Kubernetes' External Storage tests that applies (e2e.test, built once from
# controlplane/e2e-suite into the same cache, with agnhost) against the shipped StorageClass on the
# same node, about twenty minutes; docs/e2e-storage.md.
e2e-storage: e2e-host
	controlplane/build.sh kubelet kube-scheduler e2e.test agnhost
	$(PY) -m pytest tests/e2e -m storage_suite -rP

e2e-kind:
	tests/e2e/kind.sh

clean: dev-cluster-down
	rm -rf $(VENV) build *.egg-info .image
