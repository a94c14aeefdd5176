"""The base image: a local stand-in for ``python:3.11-slim-bookworm``, made with debootstrap.

What: decides the base's recipe from the host (the Debian mirror the host's apt uses, the
host's CA bundle, its pip index settings: :class:`BaseRecipe`, whose hash names the tarball),
debootstraps Debian's Python 3.11 from that mirror in a mount namespace of its own, makes the
rootfs behave like the python image (``pip`` usable as root, ``python`` on ``PATH``, the host's
CA bundle baked in, apt caches gone) and tars it to ``~/.cache/nfs-provisioner/images/``
(:func:`ensure_base_tarball`, built only when missing). ``docker import`` of that tarball with
:meth:`BaseRecipe.import_changes` gives the image the Dockerfile's ``PYTHON_IMAGE`` names.

Why: this machine reaches the Debian mirror and PyPI (through a TLS-intercepting proxy signed
by a local CA) but no registry, so ``python:3.11-slim-bookworm`` cannot be pulled.

Who calls it: ``controlplane.images`` (the build, and ``python -m controlplane.images base``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from controlplane.imagehost import log, remove_tree, run_logged, unmount_all_under

DEBOOTSTRAP = "debootstrap"

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# Not /etc/ssl/certs/ca-certificates.crt: that is the ca-certificates package's file, which its
# postinst (or an `apt-get install` in a derived image) rewrites without the host's local CA.
IMAGE_CA = "/etc/ssl/host-ca-bundle.pem"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bump when the way the base is made changes, so the cached tarball is rebuilt.
RECIPE_VERSION = 1

# pip settings copied from the host so that pip in the image uses the index the host uses.
# The certificate is not among them: the image gets its own copy of the host's CA (IMAGE_CA).
PIP_KEYS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "trusted-host": "PIP_TRUSTED_HOST",
    "default-timeout": "PIP_DEFAULT_TIMEOUT",
}
# Later sections win: `pip config list` shows the merged files as `global.`/`install.`/...,
# and environment variables as `:env:.`, which override every file.
PIP_SECTION_PRIORITY = ("global", "wheel", "install", ":env:")


# --- Pure decisions -------------------------------------------------------------------------


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where base-image tarballs are kept (same variables as the control-plane binary cache)."""
    env = os.environ if environ is None else environ
    root = env.get("NFS_PROVISIONER_CACHE")
    if not root:
        cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        root = str(Path(cache) / "nfs-provisioner")
    return Path(root) / "images"


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if stanza:
                yield stanza
            stanza = {}
        elif not line.startswith("#") and ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            stanza[key.strip().lower()] = value.strip()


def _one_line_entries(text: str) -> Iterator[tuple[str, str, str]]:
    """(type, uri, suite) of each ``deb [options] URI SUITE COMPONENTS`` line."""
    for raw in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3:
            yield line[0], line[1], line[2]


def apt_mirror(sources: Iterable[tuple[str, str]], suite: str = SUITE) -> str:
    """The URI of the first ``deb`` source for ``suite`` among (file name, text) pairs.

    Understands both ``*.sources`` (deb822) and ``*.list`` (one-line) files; falls back to
    deb.debian.org when no source names the suite itself (``-security``/``-updates`` do not
    count: debootstrap needs the main archive).
    """
    for name, text in sources:
        if name.endswith(".sources"):
            for stanza in _deb822_stanzas(text):
                if (
                    "deb" in stanza.get("types", "").split()
                    and suite in stanza.get("suites", "").split()
                ):
                    return stanza.get("uris", "").split()[0]
        else:
            for kind, uri, entry_suite in _one_line_entries(text):
                if kind == "deb" and entry_suite == suite:
                    return uri
    return DEFAULT_MIRROR


def pip_index_env(config_list: str) -> dict[str, str]:
    """The ``PIP_*`` variables that reproduce the host's index settings, from ``pip config list``.

    Each output line reads ``section.key='value'``. Only index-related keys are kept (see
    :data:`PIP_KEYS`); the certificate and host-local paths such as ``find-links`` are not.
    """
    found: dict[str, tuple[int, str]] = {}
    for line in config_list.splitlines():
        match = re.fullmatch(r"(.+?)\.([a-z-]+)='(.*)'", line.strip())
        if not match or match[2] not in PIP_KEYS or match[1] not in PIP_SECTION_PRIORITY:
            continue
        rank = PIP_SECTION_PRIORITY.index(match[1])
        if match[2] not in found or rank >= found[match[2]][0]:
            found[match[2]] = (rank, match[3])
    return {PIP_KEYS[key]: value for key, (_, value) in sorted(found.items())}


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base image's content; its hash names the cached tarball."""

    mirror: str
    ca_sha256: str
    pip_env: tuple[tuple[str, str], ...]
    suite: str = SUITE
    packages: tuple[str, ...] = BASE_PACKAGES
    version: int = RECIPE_VERSION

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def tarball_name(self) -> str:
        return f"python-3.11-slim-{self.suite}-{self.key()}.tar"

    def image_env(self) -> dict[str, str]:
        """The ENV the image gets at import (a rootfs tarball carries no image config)."""
        return {
            "PATH": IMAGE_PATH,
            "LANG": "C.UTF-8",
            "PIP_CERT": IMAGE_CA,
            "SSL_CERT_FILE": IMAGE_CA,
            **dict(self.pip_env),
        }

    def import_changes(self) -> list[str]:
        """``docker import --change`` instructions: ENV as above, and python3 as the command."""
        # Quoted as in a Dockerfile, so that values with spaces (pip host lists) stay whole.
        changes = [f"ENV {name}={json.dumps(value)}" for name, value in self.image_env().items()]
        return [*changes, 'CMD ["python3"]']


def debootstrap_argv(recipe: BaseRecipe, rootfs: Path) -> list[str]:
    """debootstrap in a mount namespace of its own: its /proc, /sys (and, in a container, /dev
    binds) in the target can never outlive it on the host, even if it is killed."""
    return [
        "unshare",
        "--mount",
        "--propagation=private",
        "--",
        DEBOOTSTRAP,
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        recipe.suite,
        str(rootfs),
        recipe.mirror,
    ]


# --- Host I/O -------------------------------------------------------------------------------


def read_apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[tuple[str, str]]:
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    return [(f.name, f.read_text()) for f in files if f.is_file()]


def host_pip_config_list() -> str:
    """``pip config list`` as the host's pip (this interpreter's) sees it, env vars included."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def host_recipe(ca_bundle: Path = HOST_CA) -> BaseRecipe:
    return BaseRecipe(
        mirror=apt_mirror(read_apt_sources()),
        ca_sha256=hashlib.sha256(ca_bundle.read_bytes()).hexdigest(),
        pip_env=tuple(sorted(pip_index_env(host_pip_config_list()).items())),
    )


def customize_rootfs(rootfs: Path, ca_bundle: Path) -> None:
    """Make a Debian rootfs behave like the python image for the Dockerfile, and shrink it."""
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()  # PEP 668: let `pip install` as root write /usr/local like python:3.11
    python = rootfs / "usr/local/bin/python"
    python.unlink(missing_ok=True)
    python.symlink_to("/usr/bin/python3")
    image_ca = rootfs / IMAGE_CA.lstrip("/")
    image_ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_bundle, image_ca)
    (rootfs / "etc/hostname").write_text("localhost\n")  # not the build host's name
    for leftover in [
        *rootfs.glob("var/cache/apt/archives/*.deb"),
        *rootfs.glob("var/cache/apt/*.bin"),
        *(p for p in rootfs.glob("var/lib/apt/lists/*") if p.is_file()),
    ]:
        leftover.unlink()


def build_base_tarball(recipe: BaseRecipe, work: Path, target: Path, ca_bundle: Path) -> None:
    """debootstrap into ``work/rootfs``, customize, and tar it to ``target`` (atomically)."""
    rootfs = work / "base-rootfs"
    remove_tree(rootfs)
    try:
        run_logged(debootstrap_argv(recipe, rootfs), work / "debootstrap.log")
    finally:
        unmount_all_under(rootfs)  # nothing by now (see debootstrap_argv); rmtree must be sure
    customize_rootfs(rootfs, ca_bundle)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        run_logged(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            work / "debootstrap.log",
        )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        remove_tree(rootfs)


def ensure_base_tarball(
    state: Path, cache: Path | None = None, ca_bundle: Path = HOST_CA
) -> tuple[Path, BaseRecipe]:
    """The cached base rootfs tarball for the host's current recipe, built if missing."""
    recipe = host_recipe(ca_bundle)
    target = (cache or cache_dir()) / recipe.tarball_name()
    if target.is_file():
        log(f"base image cached: {target}")
    else:
        log(f"building base image {target.name} with debootstrap from {recipe.mirror}")
        started = time.monotonic()
        build_base_tarball(recipe, state, target, ca_bundle)
        log(f"base image built in {time.monotonic() - started:.1f} s")
    return target, recipe
