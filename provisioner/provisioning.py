"""What to do with a claim: one pure decision, and every refusal the reconciler reports.

The reconciler gathers what it knows about a claim into ``ClaimFacts`` and asks ``plan_claim``; it
executes the answer and decides nothing itself. The steps, in the order they are asked:

1. ``core.decide_claim``: is the claim ours, and can it be provisioned now (SPEC §3)? Claims
   that are bound, being deleted, another provisioner's, waiting for their class or for a node
   are ignored or wait; a selector, ``volumeMode: Block`` or a data source are refused.
2. The class parameters (``config.parse_class_parameters``) and the directory they render for
   this claim (``paths.claim_dir``): a bad parameter or an unsafe path is refused (SPEC §11).
3. Overlap with a directory a PersistentVolume already records (the cache): never shared.
4. With the directory reserved and inspected on the export (``ClaimFacts.inspection``),
   ``ownership.decide``, the tenant rules of SPEC §4: create, reuse (adopting a directory
   without a record) or refuse.

Until step 4 has an inspection, a claim that passes 1-3 gets ``INSPECT``: reserve the directory,
inspect it and ask again. A symlink or mount found on the way is refused by ``redirected``. Each
refusal names the claim, quotes the value and says what to do.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Set
from dataclasses import dataclass

from provisioner import core, ownership, paths
from provisioner.config import ClassParameters, ParameterError, parse_class_parameters
from provisioner.journal import Intent, Owner


class Verdict(enum.Enum):
    IGNORE = "ignore"  # not ours, or nothing to do
    WAIT = "wait"  # ours, but not yet (missing class, no selected node)
    REFUSE = "refuse"  # as it is, it can never be provisioned: one Warning, tried again later
    INSPECT = "inspect"  # reserve the directory, inspect it, then decide again
    CREATE = "create"
    REUSE = "reuse"


@dataclass(frozen=True)
class ClaimFacts:
    """Everything known about a claim when it is decided."""

    claim: core.Claim
    storage_class: core.StorageClass | None
    provisioner_name: str
    volume_exists: bool = False
    """A PV of the name this claim's would have exists already."""
    overlapping: Callable[[str], Set[str]] = core.nothing_overlaps
    """The PVs whose recorded directory is a directory, inside it or around it (the cache)."""
    inspection: ownership.Inspection | None = None
    """What storage found on the export for the directory, under its reservation."""
    cluster: str = ""
    provisioner_namespace: str = ""
    now: str = ""
    """When the claim's owner record says it was made (with the inspection)."""


@dataclass(frozen=True)
class ClaimPlan:
    verdict: Verdict
    reason: str
    directory: paths.RelativeDir | None = None
    parameters: ClassParameters | None = None
    storage_class: core.StorageClass | None = None
    """INSPECT, CREATE and REUSE: the class the PV is written for."""
    tenant: Owner | None = None
    """CREATE and REUSE: the owner record the directory gets (or has)."""
    adopt: bool = False
    """REUSE of a directory without a record: write ``tenant``'s."""


def plan_claim(facts: ClaimFacts) -> ClaimPlan:
    """Ignore, wait, refuse, inspect, create or reuse: see the module docstring for the order."""
    claim = facts.claim
    gate = core.decide_claim(
        claim, facts.storage_class, facts.provisioner_name, facts.volume_exists
    )
    if gate.verdict is not core.Verdict.PROVISION:
        return ClaimPlan(Verdict(gate.verdict.value), gate.reason)
    assert facts.storage_class is not None  # decide_claim waits while the class is missing
    try:
        parameters = parse_class_parameters(
            facts.storage_class.name, facts.storage_class.parameters
        )
        directory = paths.claim_dir(
            parameters.path_pattern,
            paths.ClaimFields(claim.namespace, claim.name, claim.labels, claim.annotations),
            claim.volume_name_for,
        )
    except (ParameterError, paths.UnsafePathError) as error:
        return ClaimPlan(Verdict.REFUSE, f'claim "{claim.key}": {error}')
    holders = set(facts.overlapping(str(directory))) - {claim.volume_name_for}
    if holders:
        return ClaimPlan(Verdict.REFUSE, _shared(directory, holders))
    if facts.inspection is None:
        return ClaimPlan(
            Verdict.INSPECT, "ours and unbound", directory, parameters, facts.storage_class
        )
    return _owned(facts, directory, parameters, facts.inspection)


def _shared(directory: paths.RelativeDir, holders: Set[str]) -> str:
    return (
        f'directory "{directory}" is already used by PersistentVolume '
        f"{', '.join(sorted(holders))} (the same directory, inside it or around it); "
        "a directory is never shared between claims. Change the pathPattern inputs "
        "(labels/annotations) or delete the other claim"
    )


def _owned(
    facts: ClaimFacts,
    directory: paths.RelativeDir,
    parameters: ClassParameters,
    inspection: ownership.Inspection,
) -> ClaimPlan:
    claim = facts.claim
    tenant = Owner(
        cluster=facts.cluster,
        namespace=claim.namespace,
        provisioner=facts.provisioner_name,
        volume=claim.volume_name_for,
        since=facts.now,
    )
    decision = ownership.decide(
        inspection,
        directory,
        tenant,
        default_name=parameters.path_pattern is None,
        provisioner_namespace=facts.provisioner_namespace,
    )
    if decision.plan is ownership.Plan.REFUSE:
        return ClaimPlan(Verdict.REFUSE, f'claim "{claim.key}": {decision.reason}')
    verdict = Verdict.CREATE if decision.plan is ownership.Plan.CREATE else Verdict.REUSE
    return ClaimPlan(
        verdict,
        decision.reason,
        directory,
        parameters,
        facts.storage_class,
        tenant,
        decision.adopt,
    )


def redirected(claim: core.Claim, directory: paths.RelativeDir, error: Exception) -> str:
    """The refusal when storage found a symlink, a non-directory or a mount on the path."""
    return f'claim "{claim.key}": directory "{directory}": {error}'


def intent(claim: core.Claim, plan: ClaimPlan) -> Intent:
    """The record written before a directory is created, so a crash leaves it findable."""
    assert plan.directory is not None and plan.tenant is not None
    return Intent(
        volume=claim.volume_name_for,
        namespace=claim.namespace,
        claim=claim.name,
        claim_uid=claim.uid,
        directory=str(plan.directory),
        cluster=plan.tenant.cluster,
        provisioner=plan.tenant.provisioner,
        since=plan.tenant.since,
    )
