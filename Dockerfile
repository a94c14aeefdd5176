# The nfs-provisioner image: `DOCKER_BUILDKIT=1 docker build -t nfs-provisioner:0.1.0 .`
# (manifests/deployment.yaml uses that name as a placeholder). Two stages: the first builds
# wheels of the package and of every dependency; the second installs them from those wheels
# alone (no network, no compiler, no source tree in the final image) and runs `nfs-provisioner`
# (as root, like the image it replaces; see USER below).
#
# BuildKit is required (`RUN --mount`): it is the default from Docker 23; on Docker 20.10 set
# DOCKER_BUILDKIT=1. There is deliberately no `# syntax=docker/dockerfile:1` line: it makes
# BuildKit pull a frontend image from Docker Hub, which fails where no registry is reachable;
# the frontend built into Docker 20.10 and later understands everything used here.
#
# Base image: pinned to the Python minor version and Debian release the package is tested with.
# For reproducible builds pin it by digest too, e.g.
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # prints the current digest
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
# (The digest is not written here because it could not be looked up where this file was made.)
# Without a registry, `python -m controlplane.images build` makes an equivalent base with
# debootstrap (local/python:3.11-slim-bookworm, with the host's CA bundle and pip index in its
# environment) and passes it here as PYTHON_IMAGE. Any base works that has `pip` on PATH,
# lets root `pip install` (no PEP 668 marker) and can reach a package index for the first stage.
# Dependency versions are the exact ones the tests passed with (constraints.txt, see its header).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# .dockerignore lets only the package, its metadata and the docs into the context.
COPY . .
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt . \
    && ls /wheels

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="nfs-provisioner" \
      org.opencontainers.image.description="Dynamic NFS sub-directory provisioner for Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# pip compiles the bytecode at install time, so nothing is written at run time and the
# Deployment can use readOnlyRootFilesystem. The wheels are bind-mounted, never copied into a
# layer. `--version` proves the entry point imports.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels nfs-provisioner \
    && nfs-provisioner --version
# Root by default, as nfs-subdir's image: its own deploy/deployment.yaml sets no securityContext,
# and the export it mounts is usually root-owned 0755 with no_root_squash, where only root can
# create a directory. So our image works in that Deployment with only `image:` changed. The
# Deployment we ship (manifests/deployment.yaml) sets its own securityContext: root with only
# CHOWN, DAC_OVERRIDE and FOWNER, no privilege escalation, read-only root filesystem; its
# comments give the non-root variant (runAsUser: 65534) for clusters that forbid uid 0.
USER 0:0
EXPOSE 8080
ENTRYPOINT ["nfs-provisioner"]
CMD ["run"]
