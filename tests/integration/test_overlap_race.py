"""A claim racing a release for the release's archive name, through the real control plane
(issue 25; SPEC §4: a release holds its source and its archive target from its first inspection
until its records and its directory agree).

Tenant A's claim renders ``x/app`` and is released with ``onDelete: archive``, so its data is
going to ``x/archived-app``. The provisioner is held (``tests/faults.py``) at the archive's
directory rename: the operation record is written, the rename not done yet. Meanwhile tenant B,
in another namespace, asks for exactly ``x/archived-app``.

Since 7a4ef29 the claim meets the release's reservation of its target: ``Busy``, retried with
backoff, no Event. When the hang ends the archive lands at ``x/archived-app`` with A's data and
A's owner record, PV A goes, and B's retry finds a directory of namespace A: refused with a
ProvisioningFailed Event, never bound.

Before (18a0d46) the archive moved A's owner records to ``x/archived-app`` first and renamed the
directory second, with nothing reserved: B's claim found A's records without a directory, took
them for a crash's stale leftovers, replaced them with its own and was bound to a new, empty
``x/archived-app`` while A's release was held; A's data then went to ``x/archived-app-2``,
carrying B's owner record with it. This test fails there at the first check after B's attempt:
B was provisioned instead of being deferred.

The release must keep its reservation for the whole hold, so the filesystem timeout is raised
above the hold: with the harness's 5 s the held attempt would time out, give its reservation
back and leave its operation record, and B would meet that record instead (the "release that
has not finished" refusal), which is the other branch, not this race.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.paths import JOURNAL_DIR
from tests.faults import FaultRule, held_file, write_fault_rules
from tests.integration.conftest import MakeNamespace, StartProvisioner, StorageClasses
from tests.integration.harness import (
    Kube,
    ProvisionerProcess,
    claim,
    delete_claim,
    unique,
    wait_for,
)
from tests.integration.test_crash_points import owner_records
from tests.integration.test_observability import scrape
from tests.integration.test_tenants import (
    ANY_PATH,
    STORAGE_PATH,
    Site,
    assert_refused,
    bound_volume,
    wait_message,
)

pytestmark = pytest.mark.integration

SOURCE = "x/app"
ARCHIVE = "x/archived-app"
BUSY = "working on right now"
"""What ``reservations.Busy`` says: the attempt was deferred, not decided."""
CLAIM_RETRIES = 'nfs_provisioner_retries_total{kind="claim"}'
ATTEMPTED = (BUSY, ": provisioned volume ", ": refused: ")
"""Log lines of a claim's attempt that got somewhere: deferred, provisioned or refused."""


def attempts_at(process: ProvisionerProcess, key: str) -> list[str]:
    """The provisioner's log lines about attempts at the claim ``<namespace>/<name>``."""
    return [
        line
        for line in process.logs().splitlines()
        if f"claim {key}: " in line and any(outcome in line for outcome in ATTEMPTED)
    ]


def test_claim_for_the_archive_name_of_a_release_in_progress_is_deferred_then_refused(
    admin: Kube,
    provisioner: StartProvisioner,
    new_namespace: MakeNamespace,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    faults = tmp_path / "faults.json"
    write_fault_rules(faults, [])
    process = provisioner(NFS_PROVISIONER_UNSAFE_FAULTS_FILE=str(faults), FS_TIMEOUT="300")
    outside = tmp_path / "outside"  # bound_volume's Site wants one; nothing here uses it
    outside.mkdir()
    site = Site(process, process.export, outside, storage_classes)
    export = site.export
    class_name = site.storage_class({"pathPattern": ANY_PATH, "onDelete": "archive"}, "race")
    team_a, team_b = new_namespace(unique("team-a")), new_namespace(unique("team-b"))

    # 1-2. A's volume at x/app, with data.
    a = bound_volume(admin, site, team_a, "claim-a", class_name, SOURCE)
    assert a.recorded == SOURCE
    (a.directory / "data.txt").write_text("team-a's data")

    try:
        # 3. A's release held at its directory rename, after the operation record.
        write_fault_rules(faults, [FaultRule(op="rename", match=f"^{SOURCE}$", effect="hang")])
        delete_claim(admin, a)
        held = held_file(faults)
        wait_for(
            f"the release to be held at its rename of {SOURCE}",
            lambda: f"rename {SOURCE}" in (held.read_text() if held.exists() else "").splitlines(),
            timeout=60,
        )
        assert not (export / ARCHIVE).exists()

        # 4. B asks for the archive's name while the release holds it.
        admin.apply(claim("claim-b", team_b, class_name, annotations={STORAGE_PATH: ARCHIVE}))
        pvc_b = admin.get("pvc", "claim-b", team_b)
        assert pvc_b is not None
        volume_b = f"pvc-{pvc_b['metadata']['uid']}"
        key_b = f"{team_b}/claim-b"
        tried = wait_for(
            f"the provisioner to attempt claim {key_b}", lambda: attempts_at(process, key_b)
        )
        shown = "\n".join(tried)
        assert all(BUSY in line for line in tried), f"not deferred by the release:\n{shown}"
        assert f'directory "{ARCHIVE}" overlaps the same directory' in tried[0], shown
        assert f"the release of PersistentVolume {a.volume}" in tried[0], shown
        assert scrape(process).get(CLAIM_RETRIES, 0) >= 1
        assert admin.get("pv", volume_b) is None
        assert admin.phase("pvc", "claim-b", team_b) == "Pending"
        assert "ProvisioningFailed" not in {
            e.get("reason") for e in admin.events(team_b, "claim-b")
        }
        assert not (export / ARCHIVE).exists()
        assert (export / SOURCE / "data.txt").read_text() == "team-a's data"
        # Held after its first change: the operation record that keeps both paths taken.
        operations = export / JOURNAL_DIR / "operations"
        assert [p.name for p in operations.iterdir()] == [f"{a.volume}.json"]

        # 5. The hang ends: the archive finishes, then B's retry meets A's archive.
        write_fault_rules(faults, [])
        admin.wait_gone("pv", a.volume, timeout=60)
    finally:
        write_fault_rules(faults, [])  # never leave a thread of the provisioner held

    refusal = wait_message(
        admin, team_b, "claim-b", "ProvisioningFailed", f'belongs to namespace "{team_a}"'
    )
    assert f'directory "{ARCHIVE}" already exists' in refusal
    assert_refused(admin, team_b, "claim-b")  # its only outcome; Pending, no PV

    # 6. A's archive holds A's data and records; nothing of B's is in or at it.
    assert not (export / SOURCE).exists()
    assert sorted(p.name for p in (export / ARCHIVE).iterdir()) == ["data.txt"]
    assert (export / ARCHIVE / "data.txt").read_text() == "team-a's data"
    assert owner_records(export) == {ARCHIVE: team_a}
    assert not operations.exists() or list(operations.iterdir()) == []
    assert not [
        pv["metadata"]["name"]
        for pv in admin.items("pv")
        if pv["spec"].get("claimRef", {}).get("uid") == pvc_b["metadata"]["uid"]
    ]
