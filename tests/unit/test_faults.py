"""The fault seam itself (tests/faults.py): which calls a rule hits, and the hang announcement
the crash tests wait for. A seam that matched the wrong call would make those tests prove
nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.faults import (
    FaultInjectingSyscalls,
    FaultRule,
    held_file,
    read_fault_rules,
    write_fault_rules,
)


@pytest.mark.parametrize(
    ("match", "where", "hit"),
    [
        ("crash", "ns-crash-pvc-1", True),
        ("crash", ".nfs-provisioner/owners/dns-crash-pvc-1", True),
        ("^ns-crash", "ns-crash-pvc-1", True),
        ("^ns-crash", ".nfs-provisioner/owners/dns-crash-pvc-1", False),
        ("crash/Provisioning$", "crash/Provisioning", True),
        ("crash/Provisioning$", "crash/ProvisioningSucceeded", False),
        ("^pvc-1$", "pvc-1", True),
        ("^pvc-1$", "pvc-12", False),
        ("", "anything", True),
    ],
)
def test_match_anchors(match: str, where: str, hit: bool) -> None:
    assert FaultRule(op="mkdir", match=match).applies("mkdir", where) is hit
    assert not FaultRule(op="rmdir", match=match).applies("mkdir", where)


def test_api_ops_are_valid_rules(tmp_path: Path) -> None:
    rules = tmp_path / "faults.json"
    write_fault_rules(rules, [FaultRule(op="create_volume", match="pvc-", effect="hang")])
    assert read_fault_rules(rules)[0].op == "create_volume"
    write_fault_rules(rules, [FaultRule(op="create_pod")])
    with pytest.raises(ValueError, match='op "create_pod" is not one of'):
        read_fault_rules(rules)


def test_a_hang_is_announced_and_ends_when_its_rule_goes(tmp_path: Path) -> None:
    rules = tmp_path / "faults.json"
    write_fault_rules(rules, [FaultRule(op="mkdir", match="^stuck", effect="hang")])
    calls = FaultInjectingSyscalls(rules, poll=0.005)
    errors: list[OSError] = []

    def make() -> None:
        try:
            calls.mkdir(-1, str(tmp_path / "stuck"), "stuck")  # absolute name: dir_fd ignored
        except OSError as error:  # pragma: no cover - reported below
            errors.append(error)

    worker = threading.Thread(target=make)
    worker.start()
    held = held_file(rules)
    for _ in range(2000):
        if held.exists() and held.read_text():
            break
        worker.join(0.005)
    assert held.read_text() == "mkdir stuck\n"
    assert worker.is_alive() and not (tmp_path / "stuck").exists()
    write_fault_rules(rules, [])
    worker.join(10)
    assert not worker.is_alive() and not errors
    assert (tmp_path / "stuck").is_dir()
