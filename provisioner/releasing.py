"""What to do with a PersistentVolume: one pure decision, with the rules chosen once per PV.

The reconciler gathers what it knows about a PV into ``VolumeFacts`` and asks ``plan_release``; it
executes the step it gets and asks again after a step that changes the PV (adoption, recording
a policy), at most a few times per reconcile. The order:

1. ``adoption.standing``: a PV of the previous provisioner is adopted first (``ADOPT``: its
   directory recorded, an owner record written) or refused once (``REFUSE_ADOPTION``); one
   refused earlier is left alone.
2. ``core.decide_volume`` (SPEC §6): only a Released PV under reclaim policy Delete is cleaned;
   under Retain our finalizer is dropped and nothing is touched.
3. The directory the PV recorded (``core.recorded_directory``), never re-derived.
4. The ``Rules`` for this PV, chosen by ``rules_for``: ``OWN`` for what we provisioned (the
   on-delete policy recorded at provisioning), ``LEGACY`` for an adopted PV (the old
   provisioner's rules, read from its class at the first release attempt and recorded, so
   retries agree; nested directories wait; the Event says what was applied and why).
5. ``RETAIN``, ``DELETE`` or ``ARCHIVE``, or ``REFUSE`` (a VolumeFailedDelete, retried) when
   what the PV recorded cannot be acted on safely.

``retained``, ``deleted`` and ``archived`` word the Event of each outcome.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Protocol

from provisioner import adoption, core
from provisioner.config import OnDelete
from provisioner.paths import RelativeDir


class Step(enum.Enum):
    IGNORE = "ignore"
    ADOPT = "adopt"  # the previous provisioner's PV: record it as ours, then decide again
    REFUSE_ADOPTION = "refuse-adoption"  # ... that cannot be adopted: say so once
    RECORD_POLICY = "record-policy"  # adopted: record the class's rule now, then decide again
    DROP_FINALIZER = "drop-finalizer"  # reclaim policy Retain: touch nothing
    REFUSE = "refuse"  # what the PV recorded cannot be acted on safely
    RETAIN = "retain"
    DELETE = "delete"
    ARCHIVE = "archive"


@dataclass(frozen=True)
class ReleasePlan:
    step: Step
    reason: str
    directory: RelativeDir | None = None
    located: adoption.Located | None = None
    """ADOPT: where the old provisioner's directory is."""
    refusal: adoption.Refusal | None = None
    """REFUSE_ADOPTION: why it cannot be adopted."""
    policy: adoption.LegacyPolicy | None = None
    """RECORD_POLICY: what the old provisioner would do, given the class as it is now."""
    note: str = ""
    """The tail of the release Event's message (why this policy, for an adopted PV)."""
    event_type: str = "Normal"


@dataclass(frozen=True)
class VolumeFacts:
    """Everything known about a PV when it is decided."""

    volume: core.Volume
    provisioner_name: str
    export: core.Export
    storage_class: core.StorageClass | None = None
    """The PV's StorageClass as it is now (the old provisioner's rules read it)."""
    overlapping: Callable[[str], Set[str]] = core.nothing_overlaps
    """The PVs whose recorded directory is a directory, inside it or around it (the cache)."""


class Rules(Protocol):
    """How one PV is released, chosen once per PV (``rules_for``)."""

    def pending(self, facts: VolumeFacts) -> ReleasePlan | None:
        """A step to take before the release, or None."""
        ...

    def note(self, volume: core.Volume) -> tuple[str, str]:
        """The release Event's message tail and type."""
        ...

    def refusal(self, facts: VolumeFacts, directory: RelativeDir) -> str | None:
        """Why the directory may not be deleted or archived now, or None."""
        ...


class OwnRules:
    """A PV we provisioned: the on-delete policy recorded on it at provisioning, as it is."""

    def pending(self, facts: VolumeFacts) -> ReleasePlan | None:
        return None

    def note(self, volume: core.Volume) -> tuple[str, str]:
        return "", "Normal"

    def refusal(self, facts: VolumeFacts, directory: RelativeDir) -> str | None:
        return None


class LegacyRules:
    """A PV adopted from nfs-subdir or nfs-client: their rules (adoption.py), ours for safety."""

    def pending(self, facts: VolumeFacts) -> ReleasePlan | None:
        volume = facts.volume
        if volume.on_delete is not None:
            return None
        policy = adoption.legacy_policy(volume.storage_class, facts.storage_class)
        return ReleasePlan(Step.RECORD_POLICY, policy.basis, policy=policy)

    def note(self, volume: core.Volume) -> tuple[str, str]:
        return adoption.release_note(volume.on_delete_basis)

    def refusal(self, facts: VolumeFacts, directory: RelativeDir) -> str | None:
        others = facts.overlapping(str(directory))
        return adoption.overlap_refusal(facts.volume, directory, others)


OWN: Rules = OwnRules()
LEGACY: Rules = LegacyRules()


def rules_for(volume: core.Volume) -> Rules:
    return LEGACY if volume.adopted is not None else OWN


def plan_release(facts: VolumeFacts) -> ReleasePlan:
    """The next step for this PV: see the module docstring for the order."""
    volume = facts.volume
    standing = adoption.standing(volume, facts.provisioner_name)
    if standing is adoption.Standing.NOT_ADOPTED:
        return ReleasePlan(Step.IGNORE, f"not adopted: {volume.not_adopted}")
    if standing is adoption.Standing.ADOPT:
        located = adoption.locate(volume, facts.export)
        if isinstance(located, adoption.Refusal):
            return ReleasePlan(Step.REFUSE_ADOPTION, located.reason, refusal=located)
        return ReleasePlan(Step.ADOPT, "the previous provisioner's", located.directory, located)
    decision = core.decide_volume(volume, facts.provisioner_name)
    if decision.action is core.VolumeAction.IGNORE:
        return ReleasePlan(Step.IGNORE, decision.reason)
    if decision.action is core.VolumeAction.RELEASE_FINALIZER:
        return ReleasePlan(Step.DROP_FINALIZER, decision.reason)
    rules = rules_for(volume)
    try:
        directory = core.recorded_directory(volume, facts.export.path)
        pending = rules.pending(facts)
        if pending is not None:
            return pending
        policy = core.recorded_on_delete(volume)
    except core.ReleaseRefused as error:
        return ReleasePlan(Step.REFUSE, str(error))
    note, event_type = rules.note(volume)
    if policy is OnDelete.RETAIN:
        return ReleasePlan(
            Step.RETAIN, decision.reason, directory, note=note, event_type=event_type
        )
    refusal = rules.refusal(facts, directory)
    if refusal is not None:
        return ReleasePlan(Step.REFUSE, refusal, directory)
    step = Step.DELETE if policy is OnDelete.DELETE else Step.ARCHIVE
    return ReleasePlan(step, decision.reason, directory, note=note, event_type=event_type)


def retained(plan: ReleasePlan) -> core.ReleaseOutcome:
    kept = plan.note or " (onDelete: retain)"
    return core.ReleaseOutcome(
        "VolumeRetained", f'Directory "{plan.directory}" kept{kept}', plan.event_type
    )


def deleted(plan: ReleasePlan, existed: bool) -> core.ReleaseOutcome:
    if not existed:
        return core.ReleaseOutcome(
            "VolumeDeleted",
            f'Directory "{plan.directory}" was already missing; nothing to delete{plan.note}',
            plan.event_type,
        )
    return core.ReleaseOutcome(
        "VolumeDeleted", f'Directory "{plan.directory}" deleted{plan.note}', plan.event_type
    )


def archived(plan: ReleasePlan, archive: RelativeDir | None) -> core.ReleaseOutcome:
    if archive is None:
        return core.ReleaseOutcome(
            "VolumeArchived",
            f'Directory "{plan.directory}" was already missing; nothing to archive{plan.note}',
            plan.event_type,
        )
    return core.ReleaseOutcome(
        "VolumeArchived",
        f'Directory "{plan.directory}" archived as "{archive}"{plan.note}',
        plan.event_type,
    )
