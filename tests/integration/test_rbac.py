"""rbac/ is minimal and complete: remove any one verb and `nfs-provisioner check` names it.

Each case applies a copy of rbac/ under fresh names with one verb taken out, mints a token for
that ServiceAccount and runs `check` (with the `endpointsleases` lock, so both lock rules are
needed). The full lifecycle with the set as shipped is what every other integration test runs.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.runner import ControlPlane
from tests.integration.harness import REPO, Kube, unique

pytestmark = pytest.mark.integration

NAMESPACE = "nfs-provisioner"


def shipped_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in ("clusterrole.yaml", "leader-election.yaml"):
        docs += [d for d in yaml.safe_load_all((REPO / "rbac" / name).read_text()) if d]
    return docs


def every_verb() -> list[tuple[str, int, str]]:
    """(kind of role, rule index, verb) for every verb the shipped roles grant."""
    cases = []
    for doc in shipped_documents():
        if doc["kind"] in ("ClusterRole", "Role"):
            for index, rule in enumerate(doc["rules"]):
                cases += [(doc["kind"], index, verb) for verb in rule["verbs"]]
    return cases


def without(kind: str, index: int, verb: str, name: str) -> list[dict[str, Any]]:
    """The shipped RBAC renamed to ``name``, with one verb removed from one rule."""
    docs = copy.deepcopy(shipped_documents())
    for doc in docs:
        doc["metadata"]["name"] = name
        if doc["kind"] == kind:
            rule = doc["rules"][index]
            rule["verbs"] = [v for v in rule["verbs"] if v != verb]
            if not rule["verbs"]:
                del doc["rules"][index]
        if "roleRef" in doc:
            doc["roleRef"]["name"] = name
            doc["subjects"] = [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    return docs


@pytest.mark.parametrize(
    ("kind", "index", "verb"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}") for case in every_verb()],
)
def test_each_rule_is_needed_and_check_names_it(
    admin: Kube,
    control_plane: ControlPlane,
    sa_kubeconfig: Path,
    tmp_path: Path,
    kind: str,
    index: int,
    verb: str,
) -> None:
    del sa_kubeconfig  # rbac/ (and its namespace) applied
    name = unique("rbac")
    docs = without(kind, index, verb, name)
    rule = next(d for d in shipped_documents() if d["kind"] == kind)["rules"][index]
    admin.run("create", "serviceaccount", name, "-n", NAMESPACE)
    admin.apply(yaml.safe_dump_all(docs))
    try:
        kubeconfig = control_plane.service_account_kubeconfig(
            NAMESPACE, name, tmp_path / "kubeconfig"
        )
        export = tmp_path / "export"
        export.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NFS_", "PROVISIONER"))}
        env.update(
            {
                "KUBECONFIG": str(kubeconfig),
                "PROVISIONER_NAME": "rbac.test/nfs",
                "NFS_SERVER": "nas",
                "NFS_PATH": "/exports",
                "NFS_MOUNT_PATH": str(export),
                "POD_NAMESPACE": NAMESPACE,
                "LEADER_ELECTION_LOCK": "endpointsleases",
            }
        )
        result = subprocess.run(
            [sys.executable, "-m", "provisioner", "check"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        where = "ClusterRole" if kind == "ClusterRole" else "Role in the provisioner's namespace"
        expected = (
            f"  # {where}\n"
            f'  - apiGroups: ["{rule["apiGroups"][0]}"]\n'
            f'    resources: ["{rule["resources"][0]}"]\n'
            + "".join(f'    resourceNames: ["{name}"]\n' for name in rule.get("resourceNames", []))
            + f'    verbs: ["{verb}"]'
        )
        assert expected in result.stdout
        assert result.stdout.count("apiGroups") == 1, result.stdout
    finally:
        admin.run("delete", "clusterrole,clusterrolebinding", name, check=False)
        admin.run("delete", "role,rolebinding,serviceaccount", name, "-n", NAMESPACE, check=False)
