"""rbac/ is what the code calls: no more, no less; and `check` names any verb that is missing.

``test_rbac_grants_exactly_what_the_provisioner_calls`` records, through kube-apiserver's audit
log on a control plane of its own, every request the provisioner's ServiceAccount makes during a
representative lifecycle (leader election on both lock kinds, provision, a retried failure,
release, SIGTERM) and compares the (verb, resource, scope) set with the rules in rbac/: nothing
called may be forbidden, and every verb granted must have been called (or be on a short list of
rare paths, each with the code that needs it).

``test_each_rule_is_needed_and_check_names_it`` applies a copy of rbac/ under fresh names with
one verb taken out, mints a token for that ServiceAccount and runs `check` (with the
`endpointsleases` lock, so both lock rules are needed): `check` names exactly that rule, as a
failure, or for the two wanted permissions (permissions.WANTED) as a degraded feature, exit 0.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.binaries import resolve_binaries
from controlplane.runner import ControlPlane
from provisioner.permissions import WANTED
from tests.faults import FAULTS_ENV, FaultRule, write_fault_rules
from tests.integration.harness import (
    REPO,
    Kube,
    ProvisionerProcess,
    check_env,
    claim,
    run_cli,
    storage_class,
    unique,
    wait_for,
)

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
        result = run_cli(
            "check",
            env=check_env(
                kubeconfig,
                export,
                PROVISIONER_NAME="rbac.test/nfs",
                LEADER_ELECTION_LOCK="endpointsleases",
            ),
        )
        wanted = [
            grant
            for grant in WANTED
            if (grant.permission.resource, grant.permission.verb) == (rule["resources"][0], verb)
        ]
        if wanted:
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"preflight: degraded: without {wanted[0].feature}:" in result.stdout
            assert "FAILED" not in result.stdout, result.stdout
        else:
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


# --- what the code calls, recorded by the API server -----------------------------------------

SA_USER = f"system:serviceaccount:{NAMESPACE}:nfs-provisioner"
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{SA_USER}"]
  - level: None
"""


@dataclass(frozen=True, order=True)
class Access:
    """One kind of request: API group, resource, verb and namespace (None: cluster-wide)."""

    group: str
    resource: str
    verb: str
    namespace: str | None

    def __str__(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{self.verb} {self.group or 'core'}/{self.resource} {where}"


RARE_PATHS = {
    Access("", "persistentvolumes", "get", None): (
        "reconciler re-reads a PV after a 409 Conflict: create_volume (a PV saved by an earlier "
        "attempt), the finalizer patch and the legacy-policy patch; a clean run has no conflict"
    ),
}
"""Grants a representative run may not exercise, each with the code path that needs it."""


@dataclass(frozen=True)
class Grant:
    access: Access
    names: frozenset[str]
    """resourceNames of the rule; empty: any name."""

    def allows(self, call: Access, name: str | None) -> bool:
        mine = self.access
        return (
            (mine.group, mine.resource, mine.verb) == (call.group, call.resource, call.verb)
            and mine.namespace in (None, call.namespace)
            and (not self.names or name in self.names)
        )


def shipped_grants() -> list[Grant]:
    """Every (verb, resource) the shipped ClusterRole grants cluster-wide and the Role grants
    in the provisioner's namespace."""
    grants = []
    for doc in shipped_documents():
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        namespace = doc["metadata"].get("namespace") if doc["kind"] == "Role" else None
        for rule in doc["rules"]:
            names = frozenset(rule.get("resourceNames", ()))
            grants += [
                Grant(Access(group, resource, verb, namespace), names)
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            ]
    return grants


@dataclass(frozen=True)
class Call:
    access: Access
    name: str | None
    allowed: bool
    reason: str


def recorded_calls(audit_log: Path) -> list[Call]:
    """The ServiceAccount's resource requests in the audit log (discovery and other
    non-resource URLs aside: every authenticated user may make those)."""
    calls = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef")
        if event.get("user", {}).get("username") != SA_USER or not ref:
            continue
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        annotations = event.get("annotations", {})
        calls.append(
            Call(
                Access(ref.get("apiGroup", ""), resource, event["verb"], ref.get("namespace")),
                ref.get("name"),
                annotations.get("authorization.k8s.io/decision") == "allow",
                annotations.get("authorization.k8s.io/reason", ""),
            )
        )
    return calls


@dataclass
class Audited:
    plane: ControlPlane
    admin: Kube
    sa_kubeconfig: Path


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    """A control plane of its own whose kube-apiserver logs every request of the shipped
    ServiceAccount; rbac/ applied as a user would."""
    root = tmp_path_factory.mktemp("audited")
    policy = root / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    plane = ControlPlane(root / "controlplane", resolve_binaries(build=False), audit_policy=policy)
    try:
        plane.start()
    except RuntimeError as error:
        pytest.fail(f"the audited control plane did not start: {error}", pytrace=False)
    try:
        admin = Kube(plane.admin_kubeconfig)
        admin.run("apply", "-k", str(REPO / "rbac"))
        kubeconfig = plane.service_account_kubeconfig(
            NAMESPACE, "nfs-provisioner", root / "sa-kubeconfig"
        )
        yield Audited(plane, admin, kubeconfig)
    finally:
        plane.stop()


def run_lifecycle(audited: Audited, tmp_path: Path) -> None:
    """What a provisioner does in a cluster: lead (both lock kinds), provision, fail and retry,
    release, and hand the lock over on SIGTERM."""
    admin = audited.admin
    faults = tmp_path / "faults.json"
    write_fault_rules(faults, [FaultRule(op="mkdir", match="-denied-", errno="EACCES")])
    process = ProvisionerProcess(
        kubeconfig=audited.sa_kubeconfig,
        name=f"rbac.test/{unique('audit')}",
        export=tmp_path / "export",
        log_path=tmp_path / "provisioner.log",
        extra_env={
            "ENABLE_LEADER_ELECTION": "true",
            "LEADER_ELECTION_LOCK": "endpointsleases",
            "RESYNC_PERIOD": "3",
            FAULTS_ENV: str(faults),
        },
    )
    namespace = unique("audit")
    class_name = unique("audit")
    try:
        process.start()
        admin.run("create", "namespace", namespace)
        admin.apply(storage_class(class_name, process.name))
        admin.apply(claim("data", namespace, class_name))
        admin.apply(claim("denied", namespace, class_name))
        volume = admin.wait_phase("pvc", "data", "Bound", namespace)["spec"]["volumeName"]
        denied = admin.get("pvc", "denied", namespace)
        assert denied is not None
        retried = f"claim:{denied['metadata']['uid']}: attempt 2 failed"
        wait_for("a retried failure", lambda: retried in process.logs(), timeout=60)
        write_fault_rules(faults, [])
        admin.wait_phase("pvc", "denied", "Bound", namespace)
        admin.run("delete", "pvc", "data", "-n", namespace)
        admin.wait_gone("pv", volume)
        wait_for("a resync", lambda: "resync: re-queueing" in process.logs(), timeout=60)
    finally:
        process.stop()
        print(f"--- provisioner log ---\n{process.logs()[-20000:]}")


def test_rbac_grants_exactly_what_the_provisioner_calls(audited: Audited, tmp_path: Path) -> None:
    run_lifecycle(audited, tmp_path)
    assert audited.plane.audit_log is not None
    calls = recorded_calls(audited.plane.audit_log)
    assert calls, "the audit log recorded no request of the provisioner"
    forbidden = sorted({f"{c.access} ({c.name})" for c in calls if not c.allowed})
    assert not forbidden, f"the provisioner called what rbac/ does not grant: {forbidden}"
    grants = shipped_grants()
    # Allowed by a binding of rbac/, or by a role every cluster gives every user
    # (system:basic-user: SelfSubjectAccessReviews): only the former must be in rbac/.
    # kube-apiserver names a RoleBinding "<name>/<namespace>", a ClusterRoleBinding "<name>".
    bindings = [
        f'{doc["kind"]} "{doc["metadata"]["name"]}'
        for doc in shipped_documents()
        if doc["kind"] in ("ClusterRoleBinding", "RoleBinding")
    ]
    ours = [c for c in calls if any(binding in c.reason for binding in bindings)]
    outside = sorted(
        {str(c.access) for c in ours if not any(g.allows(c.access, c.name) for g in grants)}
    )
    assert not outside, f"allowed by rbac/ but matching none of its rules: {outside}"
    unused = sorted(
        str(g.access)
        for g in grants
        if g.access not in RARE_PATHS and not any(g.allows(c.access, c.name) for c in ours)
    )
    called = sorted({str(c.access) for c in ours})
    assert not unused, f"rbac/ grants what the provisioner never called: {unused}; {called=}"
    granted = {g.access for g in grants}
    stale = sorted(str(access) for access in RARE_PATHS if access not in granted)
    assert not stale, f"RARE_PATHS names grants rbac/ no longer has: {stale}"
