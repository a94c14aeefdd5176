"""SPEC §11, provisioning rows: each bad input gets a clear answer and nothing is created.

Every case checks the message the user sees (the Event, the exit line or ``check``'s report).
The refused claims also check that the export is exactly as it was (a snapshot of every path in
it) and that no PersistentVolume was written; the filesystem failures check that the attempt
fails, names its cause, and that other claims still go through.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults import FaultRule, write_fault_rules
from tests.integration.conftest import Install, StorageClasses
from tests.integration.harness import (
    REPO,
    Kube,
    ProvisionerProcess,
    check_env,
    claim,
    entries,
    provision,
    run_cli,
    snapshot_for,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

RESYNC_PERIOD = 2
"""Seconds between the shared provisioner's resyncs: short, so "reported once" sees several."""
RESYNC_LINE = "resync: re-queueing"
"""Logged by every resync just before it re-queues every claim and volume."""


@dataclass
class Shared:
    process: ProvisionerProcess
    export: Path


@pytest.fixture(scope="module")
def shared(sa_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One provisioner for the refusal cases; each case has its own class and namespace."""
    root = tmp_path_factory.mktemp("bad-input")
    export = root / "export"
    (export / "outside-marker").mkdir(parents=True)
    (export / "outside-marker" / "keep.txt").write_text("untouched")
    process = ProvisionerProcess(
        kubeconfig=sa_kubeconfig,
        name=f"test.nfs.io/{unique('bad')}",
        export=export,
        log_path=root / "provisioner.log",
        extra_env={"RESYNC_PERIOD": str(RESYNC_PERIOD)},
    ).start()
    yield Shared(process, export)
    process.stop()
    print(f"--- provisioner log ---\n{process.logs()[-20000:]}")


REFUSALS = [
    pytest.param(
        {},
        {"selector": {"matchLabels": {"tier": "db"}}},
        "sets spec.selector, which dynamic provisioning does not support",
        id="selector",
    ),
    pytest.param({}, {"volumeMode": "Block"}, 'asks for volumeMode "Block"', id="block"),
    pytest.param(
        {},
        {"dataSource": {"kind": "PersistentVolumeClaim", "name": "source"}},
        "sets a data source (PersistentVolumeClaim/source); cloning and restoring are not",
        id="data-source",
    ),
    pytest.param(
        {"archiveOnDelte": "false"},
        {},
        'unknown parameter "archiveOnDelte"; accepted parameters are: pathPattern',
        id="unknown-parameter",
    ),
    pytest.param(
        {"onDelete": "shred"},
        {},
        'parameter onDelete="shred" is invalid: expected delete, retain or archive',
        id="malformed-parameter",
    ),
    pytest.param(
        {"pathPattern": "${.PVC.annotations.dir}"},
        {"annotations": {"dir": "../../etc"}},
        'rendered "../../etc", which is unsafe',
        id="pattern-dotdot",
    ),
    pytest.param(
        {"pathPattern": "/${.PVC.name}"},
        {},
        "which is unsafe",
        id="pattern-absolute",
    ),
    pytest.param(
        {"pathPattern": "${.PVC.labels.missing}"},
        {},
        'rendered "", which is unsafe',
        id="pattern-empty",
    ),
    pytest.param(
        {"pathPattern": "${.PVC.annotations.dir}"},
        {"annotations": {"dir": "."}},
        'rendered ".", which is unsafe',
        id="pattern-dot",
    ),
    pytest.param(
        {"pathPattern": "${.PVC.annotations.dir}"},
        {"annotations": {"dir": "x" * 300}},
        "which is unsafe",
        id="pattern-too-long",
    ),
]


@pytest.mark.parametrize(("parameters", "claim_changes", "message"), REFUSALS)
def test_refused_claim_gets_an_event_and_nothing_is_created(
    admin: Kube,
    shared: Shared,
    namespace: str,
    parameters: dict[str, str],
    claim_changes: dict[str, Any],
    message: str,
    storage_classes: StorageClasses,
) -> None:
    before = snapshot_for(shared.export, namespace)
    class_name = storage_classes(shared.process.name, parameters, prefix="refuse")
    annotations = claim_changes.pop("annotations", None)
    admin.apply(
        claim("bad", namespace, class_name, annotations=annotations, extra_spec=claim_changes)
    )
    event = admin.wait_event(namespace, "bad", "ProvisioningFailed")
    assert message in event
    assert f"{namespace}/bad" in event or class_name in event  # names the object
    pvc = admin.get("pvc", "bad", namespace)
    assert pvc is not None
    assert pvc["status"]["phase"] == "Pending"
    assert admin.get("pv", f"pvc-{pvc['metadata']['uid']}") is None
    assert snapshot_for(shared.export, namespace) == before
    # Every resync re-queues the refused claim and decides again; the Warning must not repeat.
    # Three resyncs after the Event: the reconciles queued by the first two have finished.
    seen = shared.process.logs().count(RESYNC_LINE)
    wait_for(
        "three resyncs after the refusal",
        lambda: shared.process.logs().count(RESYNC_LINE) >= seen + 3,
        timeout=30 * RESYNC_PERIOD,
    )
    failures = [e for e in admin.events(namespace, "bad") if e["reason"] == "ProvisioningFailed"]
    assert len(failures) == 1, "a refusal is reported once, not on every resync"
    assert failures[0].get("count", 1) == 1, "a refusal is reported once, not counted up"
    assert snapshot_for(shared.export, namespace) == before


TAKEN = [
    pytest.param("${.PVC.namespace}/shared", None, None, "{ns}/shared", id="same-directory"),
    # A crafted annotation must not hand one tenant a directory inside another's volume.
    pytest.param(
        "${.PVC.annotations.dir}", "{ns}-v", "{ns}-v/data", "{ns}-v/data", id="inside-another"
    ),
]


@pytest.mark.parametrize(("pattern", "first_dir", "second_dir", "taken"), TAKEN)
def test_claim_rendering_a_directory_another_volume_uses_is_refused(
    admin: Kube,
    shared: Shared,
    namespace: str,
    storage_classes: StorageClasses,
    pattern: str,
    first_dir: str | None,
    second_dir: str | None,
    taken: str,
) -> None:
    """The second claim renders the first one's directory, or one inside it (``dir`` is the
    claims' annotation, where the pattern reads it)."""

    def annotations(directory: str | None) -> dict[str, str] | None:
        return None if directory is None else {"dir": directory.format(ns=namespace)}

    class_name = storage_classes(shared.process.name, {"pathPattern": pattern}, prefix="taken")
    first = provision(
        admin, namespace, class_name, shared.export, "first", annotations=annotations(first_dir)
    )
    (first.directory / "data.txt").write_text("first's data")
    before = snapshot_for(shared.export, namespace)
    admin.apply(claim("second", namespace, class_name, annotations=annotations(second_dir)))
    event = admin.wait_event(namespace, "second", "ProvisioningFailed")
    assert f'directory "{taken.format(ns=namespace)}" is already used by PersistentVolume' in event
    assert first.volume in event
    assert admin.phase("pvc", "second", namespace) == "Pending"
    assert snapshot_for(shared.export, namespace) == before


def test_hung_filesystem_call_fails_the_attempt_and_others_continue(
    admin: Kube, install: Install, namespace: str
) -> None:
    """A call hung on one claim's directory must not hold up the others.

    FS_TIMEOUT is long, so only a provisioner that keeps working beside the hung call can bind
    "fine" while "stuck" has not failed yet; one that waits for the hung call (a serialised
    queue or filesystem pool) binds "fine" only after the timeout's ProvisioningFailed.
    """
    _, class_name = install(
        prefix="hang",
        faults=[FaultRule(op="mkdir", match="-stuck-", effect="hang")],
        FS_TIMEOUT="60",
    )
    admin.apply(claim("stuck", namespace, class_name))
    admin.wait_event(namespace, "stuck", "Provisioning")  # posted just before the mkdir
    admin.apply(claim("fine", namespace, class_name))
    admin.wait_phase("pvc", "fine", "Bound", namespace, timeout=45)
    stuck = [e["reason"] for e in admin.events(namespace, "stuck")]
    assert "ProvisioningFailed" not in stuck, "the hung call failed before the other claim bound"
    assert admin.phase("pvc", "stuck", namespace) == "Pending"
    # The mount recovers: the hung call returns and the claim is provisioned.
    write_fault_rules(install.faults_file, [])
    admin.wait_phase("pvc", "stuck", "Bound", namespace, timeout=120)


def test_failing_filesystem_call_names_the_cause_and_a_hint(
    admin: Kube, install: Install, namespace: str
) -> None:
    _, class_name = install(
        prefix="eacces", faults=[FaultRule(op="mkdir", match="-denied-", errno="EACCES")]
    )
    admin.apply(claim("denied", namespace, class_name))
    event = admin.wait_event(namespace, "denied", "ProvisioningFailed")
    assert "Permission denied" in event or "permission denied" in event
    assert "root_squash" in event
    assert not any(entries(install.export))


# --- process configuration and preflight ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "line"),
    [
        pytest.param(
            {"PROVISIONER_NAME": "a.io/b", "NFS_SERVER": "nas"},
            "nfs-provisioner: NFS_PATH is not set; set it to the exported directory, e.g. /exports",
            id="missing",
        ),
        pytest.param(
            {
                "PROVISIONER_NAME": "a.io/b",
                "NFS_SERVER": "nas",
                "NFS_PATH": "/x",
                "WORKERS": "many",
            },
            'nfs-provisioner: WORKERS="many" is invalid; expected a positive whole number',
            id="invalid",
        ),
    ],
)
def test_bad_environment_exits_1_with_one_line(env: dict[str, str], line: str) -> None:
    result = run_cli(env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == line


def test_check_reports_a_missing_mount(sa_kubeconfig: Path, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    result = run_cli(
        "check",
        env=check_env(sa_kubeconfig, missing),
    )
    assert result.returncode == 1
    assert f"export mount {missing}" in result.stdout
    assert "FAILED" in result.stdout
    assert not missing.exists()


def test_check_reports_an_unwritable_mount(sa_kubeconfig: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    faults = tmp_path / "faults.json"
    write_fault_rules(
        faults, [FaultRule(op="open", match=".nfs-provisioner-probe-", errno="EACCES")]
    )
    result = run_cli(
        "check",
        env=check_env(sa_kubeconfig, export, NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults)),
    )
    assert result.returncode == 1
    assert f"export mount {export}" in result.stdout
    assert "root_squash" in result.stdout
    assert list(entries(export)) == []


def test_check_lists_a_missing_rbac_rule_ready_to_paste(
    admin: Kube, control_plane: Any, tmp_path: Path
) -> None:
    """A ServiceAccount whose ClusterRole lacks `persistentvolumes create`: exactly that rule."""
    name = unique("partial")
    rules = (REPO / "rbac" / "clusterrole.yaml").read_text()
    assert '"create", "delete", "patch"]' in rules
    partial = rules.replace('"create", "delete", "patch"]', '"delete", "patch"]')
    partial = partial.replace("nfs-provisioner-runner", name).replace("run-nfs-provisioner", name)
    partial = partial.replace("name: nfs-provisioner\n", f"name: {name}\n")
    admin.run("create", "serviceaccount", name, "-n", "nfs-provisioner")
    admin.apply(partial)
    try:
        kubeconfig = control_plane.service_account_kubeconfig(
            "nfs-provisioner", name, tmp_path / "kubeconfig"
        )
        export = tmp_path / "export"
        export.mkdir()
        result = run_cli(
            "check",
            env=check_env(kubeconfig, export, ENABLE_LEADER_ELECTION="false"),
        )
        assert result.returncode == 1, result.stdout
        expected = (
            "preflight: FAILED: missing RBAC permissions; add these rules to the provisioner's "
            "role:\n"
            "  # ClusterRole\n"
            '  - apiGroups: [""]\n'
            '    resources: ["persistentvolumes"]\n'
            '    verbs: ["create"]'
        )
        assert expected in result.stdout
        assert result.stdout.count("apiGroups") == 1
    finally:
        admin.run("delete", "clusterrole,clusterrolebinding", name, check=False)
        admin.run("delete", "serviceaccount", name, "-n", "nfs-provisioner", check=False)


def test_check_passes_with_the_shipped_rbac(sa_kubeconfig: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    result = run_cli(
        "check",
        env=check_env(sa_kubeconfig, export),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every RBAC permission the provisioner needs is granted" in result.stdout
    wait_for("probe file removed", lambda: list(entries(export)) == [], timeout=5)
