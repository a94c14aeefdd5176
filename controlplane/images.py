"""Build the project's container image on a machine with Docker but no container registry.

What: takes the debootstrapped stand-in for ``python:3.11-slim-bookworm``
(``controlplane.baseimage``, cached under ``~/.cache/nfs-provisioner/images/``), starts a
private ``dockerd`` under a state directory (``controlplane.dockerd``), imports that base,
builds the repository's ``Dockerfile`` with BuildKit, checks the image (``--version``, default
user), ``docker save``\\ s it into the state directory and stops the daemon again.

Why: the end-to-end tests need the image users build, built from the same Dockerfile, but this
machine reaches PyPI and the Debian mirror only (through a TLS-intercepting proxy signed by a
local CA), never a registry: ``python:3.11-slim-bookworm`` cannot be pulled, and neither can the
``docker/dockerfile`` frontend.

Who calls it: ``tests/e2e`` (through :func:`build_project_image`) and people, through
``python -m controlplane.images base|build --state DIR`` (prints the tarball's path).

What it must not do: change the host beyond the run; how the daemon keeps to that is
``controlplane.dockerd``'s docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controlplane.baseimage import BaseRecipe, ensure_base_tarball
from controlplane.dockerd import PrivateDockerd
from controlplane.imagehost import log, remove_tree

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BASE_TAG = "local/python:3.11-slim-bookworm"
PROJECT_TAG = "nfs-provisioner:e2e"
EXPECTED_USER = "0:0"  # the Dockerfile's USER


def build_argv(tag: str, base_tag: str, dockerfile: Path, context: Path) -> list[str]:
    return [
        "build",
        "--network=host",  # RUN pip wheel reaches PyPI; the build has no bridge to use
        f"--build-arg=PYTHON_IMAGE={base_tag}",
        f"--file={dockerfile}",
        f"--tag={tag}",
        str(context),
    ]


@dataclass(frozen=True)
class BuildResult:
    """What the e2e harness needs from a build: the saved image and what was checked."""

    tarball: Path
    tag: str
    version_output: str
    user: str
    timings: dict[str, float]


def import_base(docker: PrivateDockerd, tarball: Path, recipe: BaseRecipe) -> None:
    changes = [f"--change={change}" for change in recipe.import_changes()]
    with tarball.open("rb") as data:
        docker.run(["import", *changes, "-", BASE_TAG], stdin=data.fileno())


def image_user(docker: PrivateDockerd, tag: str) -> str:
    return docker.run(["image", "inspect", "--format", "{{.Config.User}}", tag]).stdout.strip()


def image_version(docker: PrivateDockerd, tag: str) -> str:
    """``nfs-provisioner --version`` run in a container with no network at all."""
    return docker.run(["run", "--rm", "--network=none", tag, "--version"]).stdout.strip()


def build_project_image(
    state: Path,
    *,
    tag: str = PROJECT_TAG,
    repo: Path = REPO,
    cache: Path | None = None,
    keep_data_root: bool = False,
) -> BuildResult:
    """Build ``repo``'s Dockerfile on the local base, check it, save it to ``state``.

    Returns the ``docker save`` tarball (for ``ctr images import``) and the checks' results.
    The daemon is stopped before returning; its data root is removed unless ``keep_data_root``.
    """
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        timings[name] = round(now - mark, 1)
        log(f"{name}: {timings[name]} s")
        mark = now

    base, recipe = ensure_base_tarball(state, cache)
    lap("base tarball")
    target = state / f"{tag.replace(':', '_').replace('/', '_')}.tar"
    docker = PrivateDockerd(state)
    try:
        with docker:
            lap("dockerd start")
            import_base(docker, base, recipe)
            lap("base import")
            docker.run_logged(
                build_argv(tag, BASE_TAG, repo / "Dockerfile", repo), state / "build.log"
            )
            lap("image build")
            version, user = image_version(docker, tag), image_user(docker, tag)
            lap("image checks")
            docker.run(["save", f"--output={target}", tag])
            lap("image save")
        lap("dockerd stop")
    finally:
        if not keep_data_root:
            remove_tree(docker.paths.data_root)
    return BuildResult(target, tag, version, user, timings)


# --- Command line ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.images", description=__doc__)
    parser.add_argument("command", choices=("base", "build"), help="base: only the base tarball")
    parser.add_argument("--state", type=Path, required=True, help="run directory (logs, image)")
    parser.add_argument("--tag", default=PROJECT_TAG)
    parser.add_argument("--keep-data-root", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("must run as root (debootstrap and dockerd)")
    # SIGTERM as SystemExit, so the daemon (in a session of its own) is still stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.command == "base":
            tarball, _ = ensure_base_tarball(args.state.resolve())
            print(tarball)
        else:
            result = build_project_image(
                args.state, tag=args.tag, keep_data_root=args.keep_data_root
            )
            log(f"{result.tag}: {result.version_output!r}, user {result.user!r}")
            log(f"timings (s): {json.dumps(result.timings)}")
            print(result.tarball)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
