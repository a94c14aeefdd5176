"""Whether a claim may have the directory its class renders: a pure decision, no I/O.

SPEC §4: reuse of a leftover directory never crosses a tenant boundary. The reconciler asks
storage to inspect the directory (which levels exist, and the owner records above, at and
inside it, see journal.py) and asks ``decide`` what to do:

- a new directory is created, unless one of its existing parents belongs to another namespace;
- an existing directory with our owner record is reused only by a claim of that namespace (and
  cluster), and only if nothing inside it belongs to another one;
- nothing is decided on a path where a release is under way (an archive or delete whose
  directory and records disagree until it finishes), nor reused when the scan of the records
  inside it stopped at its limit (it fails closed);
- an existing directory without a record (made by hand, or by nfs-subdir before the image was
  swapped) is reused only when the path is confined to the claim's namespace: its first
  component is the namespace, or it is the default ``<namespace>-<claim>-pvc-<uid>`` name,
  which only this claim renders. The record is then written (adopted).

Everything else is refused with a message that names the directory and the admin-only way to
hand it over (``nfs-provisioner handover``, run inside the provisioner's pod).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from provisioner.journal import Owner
from provisioner.paths import RelativeDir


@dataclass(frozen=True)
class Inspection:
    """What storage found on the export for one directory."""

    existing: int
    """How many leading components exist (all of them: the directory itself exists)."""
    depth: int
    leaf_owner: Owner | None = None
    owners_above: tuple[tuple[str, Owner], ...] = ()
    owners_below: tuple[tuple[str, Owner], ...] = ()
    below_complete: bool = True
    """False when the scan of the records inside stopped at its limit (``scan_limit``)."""
    scan_limit: int = 0
    operations: tuple[str, ...] = ()
    """Releases under way (journal.Operation) on this path, inside it or around it."""

    @property
    def exists(self) -> bool:
        return self.existing == self.depth

    def seen_by(self, canonical: Callable[[str], str]) -> Inspection:
        """The same findings, each record's cluster as ``canonical`` names it: the names this
        cluster wrote under before read as its own (identity.py)."""

        def own(owner: Owner) -> Owner:
            return replace(owner, cluster=canonical(owner.cluster))

        return replace(
            self,
            leaf_owner=None if self.leaf_owner is None else own(self.leaf_owner),
            owners_above=tuple((path, own(owner)) for path, owner in self.owners_above),
            owners_below=tuple((path, own(owner)) for path, owner in self.owners_below),
        )


class Plan(enum.Enum):
    CREATE = "create"
    REUSE = "reuse"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Decision:
    plan: Plan
    reason: str
    adopt: bool = False
    """REUSE of a directory without a record: write one for the claim's namespace."""


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def handover_hint(directory: str, namespace: str, provisioner_namespace: str) -> str:
    return (
        "If the data really is meant for this namespace, a cluster admin can hand the directory "
        f"over: kubectl -n {provisioner_namespace} exec deploy/nfs-provisioner -- "
        f"nfs-provisioner handover --directory {_quote(directory)} --namespace {_quote(namespace)}"
    )


def decide(
    inspection: Inspection,
    directory: RelativeDir,
    tenant: Owner,
    default_name: bool,
    provisioner_namespace: str,
) -> Decision:
    """Create, reuse or refuse ``directory`` for a claim of ``tenant``'s namespace.

    ``default_name``: the directory is the default name for this very claim (it contains the
    claim's uid, so no other claim renders it).
    """
    shown = _quote(str(directory))
    hint = handover_hint(str(directory), tenant.namespace, provisioner_namespace)
    refused = _around(inspection, shown, tenant, hint)
    if refused is not None:
        return refused
    if not inspection.exists:
        return Decision(Plan.CREATE, "the directory does not exist yet")
    return _existing(inspection, directory, tenant, default_name, shown, hint)


def _around(inspection: Inspection, shown: str, tenant: Owner, hint: str) -> Decision | None:
    """A release under way on these paths, or a parent that belongs to another namespace."""
    if inspection.operations:
        return Decision(
            Plan.REFUSE,
            f"directory {shown} overlaps a release that has not finished: "
            f"{inspection.operations[0]}; its records and its directory disagree until the "
            "release's retry completes it, so nothing else may use these paths meanwhile. The "
            "claim is tried again when that PersistentVolume is gone",
        )
    for path, above in inspection.owners_above:
        if not above.same_tenant(tenant):
            return Decision(
                Plan.REFUSE,
                f"directory {shown} would be inside {_quote(path)}, which belongs to "
                f"{above.describe()}; a claim never gets a directory inside another "
                f"namespace's. Change the pathPattern inputs (labels/annotations). {hint}",
            )
    return None


def _existing(
    inspection: Inspection,
    directory: RelativeDir,
    tenant: Owner,
    default_name: bool,
    shown: str,
    hint: str,
) -> Decision:
    """The directory exists: reuse it for its own namespace, adopt it, or refuse."""
    owner = inspection.leaf_owner
    if owner is not None and not owner.same_tenant(tenant):
        return Decision(
            Plan.REFUSE,
            f"directory {shown} already exists and belongs to {owner.describe()}; a leftover "
            f"directory is only reused by a claim of its own namespace. {hint}",
        )
    if not inspection.below_complete:
        return Decision(
            Plan.REFUSE,
            f"directory {shown} already exists and holds more than {inspection.scan_limit} "
            "recorded directories; the provisioner stops its scan of the owner records inside "
            "there, and never reuses a directory it could not inspect fully. Use a new "
            f"directory (change the pathPattern inputs). {hint}",
        )
    for path, inner in inspection.owners_below:
        if not inner.same_tenant(tenant):
            return Decision(
                Plan.REFUSE,
                f"directory {shown} already exists and holds {_quote(path)}, which belongs to "
                f"{inner.describe()}; it is not given to another namespace. {hint}",
            )
    if owner is not None and tenant.volume and owner.volume == tenant.volume:
        return Decision(
            Plan.REUSE, "it was made for this very claim by an earlier attempt that did not finish"
        )
    if owner is not None:
        return Decision(Plan.REUSE, f"left by a claim of namespace {_quote(tenant.namespace)}")
    if default_name or directory.parts[0] == tenant.namespace:
        return Decision(
            Plan.REUSE,
            "it has no owner record and its path is confined to the claim's namespace",
            adopt=True,
        )
    return Decision(
        Plan.REFUSE,
        f"directory {shown} already exists but has no owner record (made by hand or by "
        "another provisioner), and its path is not confined to the claim's namespace (the first "
        f"component is not {_quote(tenant.namespace)}), so it may hold another tenant's data. "
        f"{hint}",
    )
