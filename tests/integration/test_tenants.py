"""Tenants are adversaries (SPEC §4, the symlink row of §11): a workload owns everything inside
its volume, symlinks included, and chooses its claim's annotations. Nothing it writes there may
make the provisioner create, reuse, chmod, rename or remove anything outside that volume.

Each case acts as such a tenant would, against the real control plane: it writes symlinks into a
volume's directory on the temp export and sets claim annotations. The class pattern is
nfs-subdir's documented ``${.PVC.namespace}/${.PVC.annotations.nfs.io/storage-path}`` (the
default name where that matters too). Tenant B's volume, holding data and a mode B chose, and an
``outside`` directory next to the export are the victims: snapshots of both must not change.
A symlink inside a *bound* volume is covered by the one-owner check (a directory inside another
volume's is refused), so the symlink check proper is reached through the leftovers a tenant can
get back (retained, archived) and through release.

Reuse never crosses a namespace (SPEC §4): retained, archived and hand-made leftovers go to
claims of their own namespace only; anything else is refused with the admin-only way out,
``nfs-provisioner handover``, which is then run here as an admin would in the provisioner's pod.
The provisioner resyncs every 3 s, since a refusal is not retried until a resync.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.paths import JOURNAL_DIR
from tests.integration.conftest import MakeNamespace, StartProvisioner, StorageClasses
from tests.integration.harness import (
    REPO,
    Kube,
    Provisioned,
    ProvisionerProcess,
    bound,
    claim,
    delete_claim,
    provision,
    snapshot,
    unique,
    wait_for,
)

pytestmark = pytest.mark.integration

PATTERN = "${.PVC.namespace}/${.PVC.annotations.nfs.io/storage-path}"
STORAGE_PATH = "nfs.io/storage-path"
PROVISION_OUTCOMES = ("ProvisioningFailed", "ProvisioningSucceeded")
RELEASE_OUTCOMES = ("VolumeFailedDelete", "VolumeDeleted", "VolumeArchived", "VolumeRetained")
B_MODE = 0o750  # tenant B's own choice, so a chmod through a link would show in the snapshot

Snapshots = tuple[dict[str, str], dict[str, str]]


@dataclass(frozen=True)
class Site:
    """One provisioner, its export, a directory next to the export holding a marker, and the
    StorageClasses a case makes for that provisioner."""

    process: ProvisionerProcess
    export: Path
    outside: Path
    storage_classes: StorageClasses

    def snapshots(self) -> Snapshots:
        return snapshot(self.export), snapshot(self.outside)

    def storage_class(self, parameters: dict[str, str], prefix: str) -> str:
        return self.storage_classes(self.process.name, parameters, prefix=prefix)


@dataclass(frozen=True)
class Tenants:
    site: Site
    a: str
    """Tenant A's namespace: the attacker."""
    b: Provisioned
    """Tenant B's volume, with data: the victim."""


@pytest.fixture
def site(
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> Site:
    """The provisioner resyncs every 3 s. ``namespace`` comes before ``storage_classes`` so
    that the teardown deletes the classes, then the namespaces, then stops the provisioner."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "marker.txt").write_text("outside the export")
    process = provisioner(RESYNC_PERIOD="3")
    return Site(process, tmp_path / "export", outside, storage_classes)


@pytest.fixture
def tenants(admin: Kube, site: Site, namespace: str, new_namespace: MakeNamespace) -> Tenants:
    class_name = site.storage_class({"pathPattern": PATTERN}, prefix="victim")
    b = bound_volume(admin, site, new_namespace(), "b-data", class_name, "vol-b")
    (b.directory / "secret.txt").write_text("tenant B's data")
    b.directory.chmod(B_MODE)
    return Tenants(site, namespace, b)


def bound_volume(
    admin: Kube,
    site: Site,
    namespace: str,
    name: str,
    class_name: str,
    storage_path: str | None = None,
) -> Provisioned:
    """A Bound claim (annotated with ``storage_path``) whose directory is a real directory."""
    annotations = {STORAGE_PATH: storage_path} if storage_path is not None else None
    volume = provision(admin, namespace, class_name, site.export, name, annotations=annotations)
    assert volume.directory.is_dir()
    assert not volume.directory.is_symlink()
    return volume


def first_event(admin: Kube, namespace: str | None, name: str, reasons: tuple[str, ...]) -> str:
    """The reason and message of the first Event on the object with one of ``reasons``."""

    def probe() -> str | None:
        for event in admin.events(namespace, name):
            if event.get("reason") in reasons:
                return f"{event['reason']}: {event.get('message', '')}"
        return None

    return wait_for(f"one of {', '.join(reasons)} on {namespace or ''}/{name}", probe)


def assert_refused(admin: Kube, namespace: str, name: str) -> str:
    """The claim got a ProvisioningFailed Event (its message is returned) and no PV."""
    outcome = first_event(admin, namespace, name, PROVISION_OUTCOMES)
    assert outcome.startswith("ProvisioningFailed: "), outcome
    pvc = admin.get("pvc", name, namespace)
    assert pvc is not None
    assert pvc["status"]["phase"] == "Pending"
    assert admin.get("pv", f"pvc-{pvc['metadata']['uid']}") is None
    return outcome


def release(admin: Kube, volume: Provisioned) -> str:
    """Delete the claim; the first release Event on its PV, as "<reason>: <message>"."""
    delete_claim(admin, volume)
    return first_event(admin, None, volume.volume, RELEASE_OUTCOMES)


def released(admin: Kube, volume: Provisioned, reason: str) -> str:
    """``release``, whose first release Event must be ``reason``; then wait until the PV is
    gone. The Event's "<reason>: <message>" is returned."""
    outcome = release(admin, volume)
    assert outcome.startswith(f"{reason}: "), outcome
    admin.wait_gone("pv", volume.volume)
    return outcome


def without(tree: dict[str, str], rel: str) -> dict[str, str]:
    return {k: v for k, v in tree.items() if k != rel and not k.startswith(f"{rel}/")}


def moved(tree: dict[str, str], old: str, new: str) -> dict[str, str]:
    """``tree`` after the directory ``old`` was renamed to ``new``."""
    result = without(tree, old)
    for key, value in tree.items():
        if key == old or key.startswith(f"{old}/"):
            result[new + key[len(old) :]] = value
    return result


# --- a claim's path through a symlink a tenant planted ---------------------------------------

LinkTarget = Callable[[Tenants, Path], str]
LINK_TARGETS: dict[str, LinkTarget] = {
    # Relative links as a pod would write them; ``here`` is the directory holding the link.
    "tenant-b": lambda t, here: os.path.relpath(t.b.directory, here),
    "export-root": lambda t, here: os.path.relpath(t.site.export, here),
    "outside-absolute": lambda t, here: str(t.site.outside),
    "dangling-into-b": lambda t, here: os.path.relpath(t.b.directory.parent / "planted", here),
    "loop": lambda t, here: "link",
}

KEPT_AS = {"retained": ("retain", "VolumeRetained"), "archived": ("archive", "VolumeArchived")}
"""How a released volume stays as a leftover: the class's onDelete and the release Event."""

THROUGH_LINK = [
    pytest.param(leftover, target, position, id=f"{leftover}-{target}-{position}")
    for leftover, targets in (("retained", LINK_TARGETS), ("archived", ["tenant-b"]))
    for target in targets
    for position in ("through", "leaf")
]


@pytest.mark.parametrize(("leftover", "target", "position"), THROUGH_LINK)
def test_claim_through_a_symlink_in_a_leftover_volume_is_refused(
    admin: Kube, tenants: Tenants, leftover: str, target: str, position: str
) -> None:
    """A plants ``link`` in its volume, lets the claim go (the directory stays as a leftover of
    A's namespace) and asks for a claim at ``<leftover>/link/x`` or at the link itself."""
    site = tenants.site
    on_delete, reason = KEPT_AS[leftover]
    class_name = site.storage_class({"pathPattern": PATTERN, "onDelete": on_delete}, prefix="link")
    a = bound_volume(admin, site, tenants.a, "a-data", class_name, "vol-a")
    os.symlink(LINK_TARGETS[target](tenants, a.directory), a.directory / "link")
    released(admin, a, reason)
    base = "vol-a" if leftover == "retained" else "archived-vol-a"
    assert (site.export / tenants.a / base / "link").is_symlink()
    storage_path = f"{base}/link/x" if position == "through" else f"{base}/link"
    before = site.snapshots()

    admin.apply(claim("evil", tenants.a, class_name, annotations={STORAGE_PATH: storage_path}))
    refusal = assert_refused(admin, tenants.a, "evil")
    assert f'claim "{tenants.a}/evil"' in refusal
    assert f'"{tenants.a}/{base}/link" on the export is a symbolic link' in refusal
    assert site.snapshots() == before


def test_claim_through_a_symlink_in_a_bound_volume_is_refused(
    admin: Kube, tenants: Tenants
) -> None:
    """While A's volume is bound, any path inside it is another volume's: refused before the
    export is even looked at."""
    site = tenants.site
    class_name = site.storage_class({"pathPattern": PATTERN}, prefix="bound")
    a = bound_volume(admin, site, tenants.a, "a-data", class_name, "vol-a")
    os.symlink(os.path.relpath(tenants.b.directory, a.directory), a.directory / "link")
    before = site.snapshots()
    admin.apply(claim("evil", tenants.a, class_name, annotations={STORAGE_PATH: "vol-a/link/x"}))
    refusal = assert_refused(admin, tenants.a, "evil")
    assert f'directory "{tenants.a}/vol-a/link/x" is already used by PersistentVolume' in refusal
    assert a.volume in refusal
    assert site.snapshots() == before


# --- release of a directory swapped for a symlink ------------------------------------------------


@pytest.mark.parametrize("policy", ["delete", "archive"])
@pytest.mark.parametrize("pattern", [None, PATTERN], ids=["default-name", "storage-path"])
def test_release_of_a_directory_swapped_for_a_symlink_is_refused(
    admin: Kube, tenants: Tenants, pattern: str | None, policy: str
) -> None:
    """Someone with write access to the parent renames A's directory away and puts a link to
    B's volume at its name; the release must neither remove nor rename through it."""
    site = tenants.site
    parameters = {"onDelete": policy} | ({"pathPattern": pattern} if pattern else {})
    class_name = site.storage_class(parameters, prefix="swap")
    a = bound_volume(admin, site, tenants.a, "a-data", class_name, "vol-a" if pattern else None)
    (a.directory / "SUCCESS").write_text("A's data")
    away = a.directory.with_name(f"away-{a.directory.name}")
    a.directory.rename(away)
    os.symlink(os.path.relpath(tenants.b.directory, a.directory.parent), a.directory)
    before = site.snapshots()

    outcome = release(admin, a)
    assert outcome.startswith("VolumeFailedDelete: "), outcome
    assert f'"{a.recorded}" on the export is a symbolic link' in outcome
    assert admin.get("pv", a.volume) is not None
    assert site.snapshots() == before

    # The admin puts the directory back; the retry (with backoff) finishes the release.
    a.directory.unlink()
    away.rename(a.directory)
    admin.wait_gone("pv", a.volume, timeout=120)
    away_rel = str(Path(a.recorded).with_name(away.name))
    expected = without(before[0], a.recorded)
    if policy == "archive":
        archive_rel = str(Path(a.recorded).with_name(f"archived-{a.directory.name}"))
        expected = moved(expected, away_rel, archive_rel)
        assert (site.export / archive_rel / "SUCCESS").read_text() == "A's data"
    else:
        expected = without(expected, away_rel)
    assert site.snapshots() == (expected, before[1])


# --- removing a volume full of symlinks ----------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, PATTERN], ids=["default-name", "storage-path"])
def test_delete_removes_a_volume_full_of_symlinks_and_nothing_they_point_at(
    admin: Kube, tenants: Tenants, pattern: str | None
) -> None:
    site = tenants.site
    parameters = {"onDelete": "delete"} | ({"pathPattern": pattern} if pattern else {})
    class_name = site.storage_class(parameters, prefix="links")
    a = bound_volume(admin, site, tenants.a, "a-data", class_name, "vol-a" if pattern else None)
    deep = a.directory / "tree" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_text("nested")
    links = {
        a.directory / "to-b": os.path.relpath(tenants.b.directory, a.directory),
        a.directory / "to-b-file": os.path.relpath(tenants.b.directory / "secret.txt", a.directory),
        a.directory / "to-root": os.path.relpath(site.export, a.directory),
        a.directory / "to-outside": str(site.outside),
        a.directory / "to-outside-file": str(site.outside / "marker.txt"),
        a.directory / "dangling": "nowhere",
        a.directory / "loop": "loop",
        deep.parent / "up": "../../..",
        deep / "to-outside": str(site.outside),
        deep / "to-b": os.path.relpath(tenants.b.directory, deep),
    }
    for link, target in links.items():
        os.symlink(target, link)
    before = site.snapshots()

    released(admin, a, "VolumeDeleted")
    assert not os.path.lexists(a.directory)
    assert site.snapshots() == (without(before[0], a.recorded), before[1])


# --- an archive name taken by a symlink ----------------------------------------------------------


@pytest.mark.parametrize("target", ["tenant-b", "dangling"])
@pytest.mark.parametrize("pattern", [None, PATTERN], ids=["default-name", "storage-path"])
def test_archive_never_lands_on_a_symlink_in_its_way(
    admin: Kube, tenants: Tenants, pattern: str | None, target: str
) -> None:
    site = tenants.site
    parameters = {"onDelete": "archive"} | ({"pathPattern": pattern} if pattern else {})
    class_name = site.storage_class(parameters, prefix="squat")
    a = bound_volume(admin, site, tenants.a, "a-data", class_name, "vol-a" if pattern else None)
    (a.directory / "SUCCESS").write_text("A's data")
    squatter = a.directory.with_name(f"archived-{a.directory.name}")
    link = (
        os.path.relpath(tenants.b.directory, squatter.parent) if target == "tenant-b" else "nowhere"
    )
    os.symlink(link, squatter)
    before = site.snapshots()

    outcome = released(admin, a, "VolumeArchived")
    archive_rel = str(Path(a.recorded).with_name(f"archived-{a.directory.name}-2"))
    assert f'archived as "{archive_rel}"' in outcome
    assert (site.export / archive_rel / "SUCCESS").read_text() == "A's data"
    assert os.readlink(squatter) == link
    assert site.snapshots() == (moved(before[0], a.recorded, archive_rel), before[1])


# --- reuse never crosses a namespace (SPEC §4) ----------------------------------------------

ANY_PATH = "${.PVC.annotations.nfs.io/storage-path}"
"""Not rooted at the namespace: a claim of any namespace can render any path with it."""
STABLE_NAME = "${.PVC.namespace}-${.PVC.name}"


@dataclass(frozen=True)
class Leftover:
    """A directory no PV records, holding ``data.txt``, and a class whose claims render it."""

    rel: str
    class_name: str


def make_leftover(kind: str, admin: Kube, site: Site, owner: str) -> Leftover:
    """A leftover of namespace ``owner``: retained or archived by its claim, or made by hand
    (by an admin, or by nfs-subdir before the image was swapped) with or without ``owner`` as
    its first component."""
    on_delete, reason = KEPT_AS.get(kind, KEPT_AS["retained"])
    class_name = site.storage_class({"pathPattern": ANY_PATH, "onDelete": on_delete}, prefix=kind)
    if kind in ("retained", "archived"):
        volume = bound_volume(admin, site, owner, "orig", class_name, f"apps-{owner}/db")
        (volume.directory / "data.txt").write_text(f"written by {owner}")
        released(admin, volume, reason)
        rel = volume.recorded if kind == "retained" else f"apps-{owner}/archived-db"
    else:
        rel = f"{owner}/legacy" if kind == "hand-made-in-namespace" else f"{owner}-legacy"
        (site.export / rel).mkdir(parents=True)
    (site.export / rel / "data.txt").write_text(f"written by {owner}")
    return Leftover(rel, class_name)


def wait_message(admin: Kube, namespace: str, name: str, reason: str, fragment: str) -> str:
    def probe() -> str | None:
        for event in admin.events(namespace, name):
            if event.get("reason") == reason and fragment in event.get("message", ""):
                return str(event["message"])
        return None

    return wait_for(f'a {reason} Event on {namespace}/{name} saying "{fragment}"', probe)


def assert_reused(
    admin: Kube, export: Path, namespace: str, name: str, rel: str, after_refusal: bool = False
) -> Provisioned:
    """The claim is bound to a PV that records ``rel``, and the Event says it was reused.

    Unless the claim was refused before, its first outcome must be the success."""
    reasons = ("ProvisioningSucceeded",) if after_refusal else PROVISION_OUTCOMES
    outcome = first_event(admin, namespace, name, reasons)
    assert outcome.startswith("ProvisioningSucceeded: "), outcome
    volume = bound(admin, namespace, name, export)
    assert volume.recorded == rel
    wait_message(admin, namespace, name, "Provisioning", f'Reusing existing directory "{rel}"')
    return volume


def handover_hint(rel: str, namespace: str) -> str:
    return f'nfs-provisioner handover --directory "{rel}" --namespace "{namespace}"'


def assert_refused_with_hint(
    admin: Kube, site: Site, namespace: str, name: str, rel: str, why: str, before: Snapshots
) -> None:
    """The claim ``namespace/name`` is refused the directory ``rel``, saying ``why`` and how an
    admin hands it over, and the export and ``outside`` are as they were ``before``."""
    refusal = assert_refused(admin, namespace, name)
    assert f'claim "{namespace}/{name}": directory "{rel}"' in refusal
    assert why in refusal
    assert handover_hint(rel, namespace) in refusal
    assert site.snapshots() == before


def records(export: Path) -> dict[str, bytes]:
    """The provisioner's own records (owners and intents), file by file."""
    root = export / JOURNAL_DIR
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def run_handover(site: Site, directory: str, namespace: str) -> subprocess.CompletedProcess[str]:
    """``nfs-provisioner handover`` as an admin runs it in the provisioner's pod: same settings
    and ServiceAccount as the running provisioner."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "provisioner", "handover"),
            *("--directory", directory, "--namespace", namespace),
        ],
        cwd=REPO,
        env=site.process.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


LEFTOVERS = ["retained", "archived", "hand-made-in-namespace", "hand-made-elsewhere"]
WHY_NOT = {
    "retained": 'belongs to namespace "{owner}"',
    "archived": 'belongs to namespace "{owner}"',
    "hand-made-in-namespace": "has no owner record",
    "hand-made-elsewhere": "has no owner record",
}


@pytest.mark.parametrize("claimant", ["own-namespace", "foreign-namespace"])
@pytest.mark.parametrize("kind", LEFTOVERS)
def test_leftover_is_reused_only_by_its_own_namespace(
    admin: Kube,
    site: Site,
    namespace: str,
    new_namespace: MakeNamespace,
    kind: str,
    claimant: str,
) -> None:
    leftover = make_leftover(kind, admin, site, namespace)
    asking = namespace if claimant == "own-namespace" else new_namespace()
    before = site.snapshots()
    annotations = {STORAGE_PATH: leftover.rel}
    admin.apply(claim("again", asking, leftover.class_name, annotations=annotations))

    if asking == namespace and kind != "hand-made-elsewhere":
        assert_reused(admin, site.export, asking, "again", leftover.rel)
        after = site.snapshots()
        after[0][leftover.rel] = before[0][leftover.rel]  # reuse applies the class's mode
        assert after == before
        return
    why = WHY_NOT[kind].format(owner=namespace)
    assert_refused_with_hint(admin, site, asking, "again", leftover.rel, why, before)


def test_hand_made_directory_with_the_claims_default_name_is_reused(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    """The default name holds the claim's uid, so only this claim renders it: a directory
    with that name (nfs-subdir crashed before saving the PV, then the image was swapped) is
    adopted without any record of ours."""
    name = f"test.nfs.io/{unique('p')}"
    class_name = storage_classes(name, prefix="default")
    admin.apply(claim("data", namespace, class_name))
    pvc = admin.get("pvc", "data", namespace)
    assert pvc is not None
    rel = f"{namespace}-data-pvc-{pvc['metadata']['uid']}"
    export = tmp_path / "export"
    (export / rel).mkdir(parents=True)
    (export / rel / "data.txt").write_text("written before the swap")
    provisioner(name=name, export=export)
    assert_reused(admin, export, namespace, "data", rel)
    assert (export / rel / "data.txt").read_text() == "written before the swap"


def test_stable_name_reuse_stays_within_the_namespace(
    admin: Kube, site: Site, namespace: str, new_namespace: MakeNamespace
) -> None:
    """StatefulSet-style ``<namespace>-<claim>``: the re-created claim gets its data back; a
    claim of namespace ``<namespace>-y`` named ``z`` renders the same string and gets nothing."""
    class_name = site.storage_class({"pathPattern": STABLE_NAME, "onDelete": "retain"}, "sts")
    first = bound_volume(admin, site, namespace, "y-z", class_name)
    assert first.recorded == f"{namespace}-y-z"
    (first.directory / "data.txt").write_text("generation 1")
    released(admin, first, "VolumeRetained")
    admin.wait_gone("pvc", "y-z", namespace)

    admin.apply(claim("y-z", namespace, class_name))
    again = assert_reused(admin, site.export, namespace, "y-z", first.recorded)
    assert (first.directory / "data.txt").read_text() == "generation 1"
    released(admin, again, "VolumeRetained")

    lookalike = new_namespace(f"{namespace}-y")
    before = site.snapshots()
    admin.apply(claim("z", lookalike, class_name))
    why = f'belongs to namespace "{namespace}"'
    assert_refused_with_hint(admin, site, lookalike, "z", first.recorded, why, before)


def test_claim_annotations_cannot_take_a_directory_over(
    admin: Kube, site: Site, namespace: str, new_namespace: MakeNamespace
) -> None:
    """Whatever a tenant writes on its claim, ownership comes from the claim's namespace."""
    leftover = make_leftover("retained", admin, site, namespace)
    intruder = new_namespace()
    records_before = records(site.export)
    assert records_before, "the retained directory has no owner record to protect"
    before = site.snapshots()
    pretending = {
        STORAGE_PATH: leftover.rel,
        "nfs.provisioner.dev/namespace": namespace,
        "nfs.provisioner.dev/owner": namespace,
        "nfs.provisioner.dev/directory": leftover.rel,
        "namespace": namespace,
    }
    admin.apply(
        claim(
            "intruder",
            intruder,
            leftover.class_name,
            labels={"namespace": namespace},
            annotations=pretending,
        )
    )
    why = f'belongs to namespace "{namespace}"'
    assert_refused_with_hint(admin, site, intruder, "intruder", leftover.rel, why, before)
    assert records(site.export) == records_before


@pytest.mark.parametrize("kind", ["retained", "hand-made-elsewhere"])
def test_admin_hands_a_directory_over_and_the_refused_claim_is_provisioned(
    admin: Kube, site: Site, namespace: str, new_namespace: MakeNamespace, kind: str
) -> None:
    leftover = make_leftover(kind, admin, site, namespace)
    newcomer = new_namespace()
    annotations = {STORAGE_PATH: leftover.rel}
    admin.apply(claim("adopter", newcomer, leftover.class_name, annotations=annotations))
    assert handover_hint(leftover.rel, newcomer) in assert_refused(admin, newcomer, "adopter")

    result = run_handover(site, leftover.rel, newcomer)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f'handover: directory "{leftover.rel}" now belongs to namespace "{newcomer}"; '
        "its claims may reuse it"
    )
    # A refusal is not retried; the next resync (every 3 s here) provisions the claim.
    assert_reused(admin, site.export, newcomer, "adopter", leftover.rel, after_refusal=True)
    assert (site.export / leftover.rel / "data.txt").read_text() == f"written by {namespace}"


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        pytest.param(
            "../escape", '--directory="../escape" is invalid: a path component is ".."', id="dotdot"
        ),
        pytest.param(f"{JOURNAL_DIR}/owners", "holds the provisioner's own records", id="records"),
        pytest.param("{ns}/link", '"{ns}/link" on the export is a symbolic link', id="link"),
        pytest.param("{ns}/link/x", '"{ns}/link" on the export is a symbolic link', id="via-link"),
        pytest.param("{ns}/missing", "no such file or directory", id="missing"),
    ],
)
def test_handover_refuses_what_it_must_not_record(
    site: Site, namespace: str, directory: str, expected: str
) -> None:
    (site.export / namespace).mkdir()
    os.symlink(str(site.outside), site.export / namespace / "link")
    records_before = records(site.export)
    before = site.snapshots()
    result = run_handover(site, directory.format(ns=namespace), namespace)
    assert result.returncode == 1, result.stdout
    assert expected.format(ns=namespace) in result.stderr
    assert result.stdout == ""
    assert records(site.export) == records_before
    assert site.snapshots() == before


@pytest.mark.parametrize("where", ["{rel}", "{parent}"], ids=["the-volume", "around-it"])
def test_handover_refuses_a_directory_a_volume_uses(tenants: Tenants, where: str) -> None:
    """Handing over a live volume (or a directory around one) would give tenant B's data to
    A under B's running pods: the command refuses, naming the PV, and records nothing."""
    victim, site = tenants.b, tenants.site
    rel = victim.recorded
    directory = where.format(rel=rel, parent=rel.rpartition("/")[0] or rel)
    records_before = records(site.export)
    before = site.snapshots()
    result = run_handover(site, directory, tenants.a)
    assert result.returncode == 1, result.stdout
    assert f'handover: directory "{directory}" is used by PersistentVolume {victim.volume}' in (
        result.stderr
    )
    assert records(site.export) == records_before
    assert site.snapshots() == before
