"""SPEC §4, one owner per directory: a directory an existing PV records is never given to a second
claim, nor a path inside or around it - at start-up, for concurrent claims, for PVs we did not
write, and after a watch gap.

Each case makes the dangerous ordering happen on purpose instead of hoping for it:

- start-up and concurrency put an HTTP proxy between the provisioner and kube-apiserver that
  forwards everything (watches stream through) but holds chosen requests back - kopf's
  PersistentVolume list, or one claim's PV create - which is a slow network, nothing more;
- the watch gap freezes the provisioner (SIGSTOP), changes the cluster and restarts
  kube-apiserver, so the watches it resumes are answered 410 Gone and kopf re-lists, which
  never reports what vanished in between (the same restart as test_resilience.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from controlplane.binaries import KUBE_APISERVER, KUBE_CONTROLLER_MANAGER
from controlplane.runner import ControlPlane
from tests.integration.conftest import StartProvisioner, StorageClasses, provisioners
from tests.integration.harness import (
    ANN_DIRECTORY,
    NFS_PATH,
    NFS_SERVER,
    Kube,
    ProvisionerProcess,
    claim,
    claims_resource_version,
    snapshot,
    storage_class,
    unique,
    wait_for,
    wait_for_410_after_restart,
)

pytestmark = pytest.mark.integration

BY_ANNOTATION = {"pathPattern": "${.PVC.annotations.dir}", "onDelete": "delete"}
ANN_EXPORT_PATH = "nfs.provisioner.dev/export-path"
WAIT = 120  # seconds; generous: the machine is shared and the apiserver restarts in some cases


# --- a proxy that can hold requests back ---------------------------------------------------------

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass(frozen=True)
class Hold:
    """Requests to hold back until ``ApiProxy.release``: every field that is set must match."""

    method: str
    path: str
    user_agent: str = ""  # a prefix: "kopf/" is kopf, the kubernetes client is "OpenAPI-..."
    claim_name: str = ""  # a PV create whose spec.claimRef.name is this

    def matches(self, method: str, path: str, user_agent: str, body: bytes) -> bool:
        if method != self.method or path != self.path:
            return False
        if not user_agent.startswith(self.user_agent):
            return False
        if self.claim_name:
            with contextlib.suppress(ValueError, AttributeError):
                return bool(json.loads(body)["spec"]["claimRef"]["name"] == self.claim_name)
            return False
        return True


@dataclass
class ApiProxy:
    """Plain-HTTP front of kube-apiserver for one provisioner (its bearer token passes through).

    Runs its own event loop in a thread. ``held`` lists every request held so far.
    """

    upstream: str
    ca_file: Path
    url: str = ""
    held: list[str] = field(default_factory=list)
    _rules: list[Hold] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _released: asyncio.Event | None = None
    _stopping: asyncio.Event | None = None
    _thread: threading.Thread | None = None
    _session: aiohttp.ClientSession | None = None

    def start(self) -> ApiProxy:
        started = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve(started)), name="api-proxy", daemon=True
        )
        self._thread.start()
        assert started.wait(30), "the API proxy did not start"
        return self

    def hold(self, rule: Hold) -> None:
        self._rules.append(rule)

    def release(self) -> None:
        """Let every held request through and hold nothing more."""
        self._rules.clear()
        assert self._loop is not None and self._released is not None
        self._loop.call_soon_threadsafe(self._released.set)

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    async def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._stopping = asyncio.Event()
        context = ssl.create_default_context(cafile=str(self.ca_file))
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as session:
            app = web.Application(client_max_size=64 << 20)
            self._session = session
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app, shutdown_timeout=1)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            started.set()
            await self._stopping.wait()
            self._released.set()
            await runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        agent = request.headers.get("User-Agent", "")
        if any(rule.matches(request.method, request.path, agent, body) for rule in self._rules):
            self.held.append(f"{request.method} {request.path_qs} ({agent})")
            assert self._released is not None
            await self._released.wait()
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        assert self._session is not None
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.path_qs}",
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            # A client that goes away (a watch it ends, a provisioner that stops) ends this too.
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[ApiProxy]:
    started = ApiProxy(control_plane.server, control_plane.ca_file).start()
    yield started
    started.stop()


@pytest.fixture
def proxied_provisioner(
    proxy: ApiProxy, sa_kubeconfig: Path, tmp_path: Path
) -> Iterator[StartProvisioner]:
    """Like the ``provisioner`` fixture, with the API reached through ``proxy``; stopped before
    the proxy is."""
    config = yaml.safe_load(sa_kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"] = {"server": proxy.url}
    kubeconfig = tmp_path / "proxied-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    kubeconfig.chmod(0o600)
    yield from provisioners(kubeconfig, tmp_path, log_prefix="proxied", name_prefix="own")


# --- PersistentVolumes made by hand ----------------------------------------------------------


def hand_volume(
    name: str, server: str, path: str, annotations: dict[str, str] | None = None
) -> str:
    """An Available PV no claim of ours can bind to (its class exists nowhere)."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {
                "capacity": {"storage": "1Mi"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": f"manual-{name}",
                "nfs": {"server": server, "path": path},
            },
        }
    )


@pytest.fixture
def hand_volumes(admin: Kube) -> Iterator[Callable[..., str]]:
    """Create PVs by hand (``hand_volume``'s arguments, minus the name: it is made unique)."""
    names: list[str] = []

    def create(prefix: str, server: str, path: str, **kw: Any) -> str:
        name = unique(prefix)
        names.append(name)
        admin.apply(hand_volume(name, server, path, **kw))
        return name

    yield create
    if names:
        admin.run("delete", "pv", *names, "--ignore-not-found", "--wait=false", check=False)


def ours(directory: str) -> dict[str, str]:
    """The annotations with which our provisioner records a PV's directory."""
    return {ANN_DIRECTORY: directory, ANN_EXPORT_PATH: NFS_PATH}


def outcome(admin: Kube, namespace: str, name: str) -> str | None:
    """ "Bound", or "refused: <the ProvisioningFailed message>", or None while undecided."""
    pvc = admin.get("pvc", name, namespace)
    if pvc is not None and pvc.get("status", {}).get("phase") == "Bound":
        return "Bound"
    for event in admin.events(namespace, name):
        if event.get("reason") == "ProvisioningFailed":
            return f"refused: {event.get('message', '')}"
    return None


def settled(admin: Kube, namespace: str, name: str, timeout: float = WAIT) -> str:
    return wait_for(
        f"claim {namespace}/{name} to be Bound or refused",
        lambda: outcome(admin, namespace, name),
        timeout,
    )


def volume_of(admin: Kube, namespace: str, name: str) -> str:
    pvc = admin.get("pvc", name, namespace)
    assert pvc is not None
    return f"pvc-{pvc['metadata']['uid']}"


def logged(process: ProvisionerProcess, *parts: str) -> bool:
    return any(all(part in line for part in parts) for line in process.logs().splitlines())


# --- 1. start-up ---------------------------------------------------------------------------


def test_startup_reconciles_nothing_before_the_volumes_are_listed(
    admin: Kube,
    proxy: ApiProxy,
    proxied_provisioner: StartProvisioner,
    namespace: str,
    hand_volumes: Callable[..., str],
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    """kopf's PV list is held back for the whole test (a big, slow list), its claim list is not:
    only the provisioner's own complete lists before the first reconcile keep the pending
    claim out of the directory the PV records."""
    directory = f"{namespace}/taken"
    owner = hand_volumes(
        "recorded", NFS_SERVER, f"{NFS_PATH}/{directory}", annotations=ours(directory)
    )
    proxy.hold(Hold("GET", "/api/v1/persistentvolumes", user_agent="kopf/"))
    name = f"test.nfs.io/{unique('own')}"
    class_name = storage_classes(name, BY_ANNOTATION, prefix="startup")
    admin.apply(claim("late", namespace, class_name, annotations={"dir": directory}))

    process = proxied_provisioner(name)
    result = settled(admin, namespace, "late")

    assert any("kopf/" in request for request in proxy.held), "kopf's PV list was not held"
    assert result.startswith("refused: "), f"claim provisioned before the PVs were known: {result}"
    assert f'directory "{directory}" is already used by PersistentVolume {owner}' in result
    assert admin.get("pv", volume_of(admin, namespace, "late")) is None
    assert not (tmp_path / "export" / directory).exists()
    assert logged(process, "start-up gate: listed")


# --- 2. concurrency ------------------------------------------------------------------------


def test_concurrent_claims_for_nested_directories_never_both_proceed(
    admin: Kube,
    proxy: ApiProxy,
    proxied_provisioner: StartProvisioner,
    namespace: str,
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    """The first claim's PV create is held, so it is in flight when the second claim, for a
    directory inside the first one's, is reconciled."""
    outer, inner = f"{namespace}/outer", f"{namespace}/outer/inner"
    proxy.hold(Hold("POST", "/api/v1/persistentvolumes", claim_name="first"))
    process = proxied_provisioner()
    class_name = storage_classes(process.name, BY_ANNOTATION, prefix="nested")
    admin.apply(claim("first", namespace, class_name, annotations={"dir": outer}))
    wait_for("the first claim's PV create to be held", lambda: proxy.held, timeout=WAIT)

    admin.apply(claim("second", namespace, class_name, annotations={"dir": inner}))
    wait_for(
        "the second claim to be provisioned or told to wait",
        lambda: (
            admin.phase("pvc", "second", namespace) == "Bound"
            or logged(
                process,
                f"claim {namespace}/second:",
                f"which the provisioning of claim {namespace}/first is working on right now",
            )
        ),
        timeout=WAIT,
    )
    assert admin.phase("pvc", "second", namespace) != "Bound", (
        f'"{inner}" was provisioned while "{outer}" was being provisioned for another claim'
    )
    assert admin.get("pv", volume_of(admin, namespace, "second")) is None

    proxy.release()
    first = admin.wait_phase("pvc", "first", "Bound", namespace, timeout=WAIT)
    result = settled(admin, namespace, "second")
    assert result.startswith("refused: "), result
    assert f"already used by PersistentVolume {first['spec']['volumeName']}" in result
    assert admin.phase("pvc", "second", namespace) == "Pending"
    assert admin.get("pv", volume_of(admin, namespace, "second")) is None
    assert not (tmp_path / "export" / inner).exists()


# --- 3. PVs we did not write ---------------------------------------------------------------


def test_volumes_made_by_hand_or_by_nfs_subdir_own_their_directories(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    hand_volumes: Callable[..., str],
    storage_classes: StorageClasses,
    tmp_path: Path,
) -> None:
    """Only spec.nfs records where these PVs point: the server matches ours whatever its case,
    a trailing "/" changes nothing; the same path on another server is somebody else's."""
    mine = hand_volumes("byhand", NFS_SERVER.upper(), f"{NFS_PATH}/{namespace}/byhand/")
    hand_volumes("elsewhere", "other.example.test", f"{NFS_PATH}/{namespace}/elsewhere")
    hand_volumes("dotdot", NFS_SERVER, f"{NFS_PATH}/{namespace}/../{namespace}/dots")
    process = provisioner()
    class_name = storage_classes(process.name, BY_ANNOTATION, prefix="byhand")
    export = tmp_path / "export"
    before = snapshot(export)
    cases = {
        "same": f"{namespace}/byhand",
        "inside": f"{namespace}/byhand/data",
        "around": namespace,
    }
    for name, directory in cases.items():
        admin.apply(claim(name, namespace, class_name, annotations={"dir": directory}))
    results = {name: settled(admin, namespace, name) for name in cases}

    for name, directory in cases.items():
        assert results[name].startswith("refused: "), (name, results[name])
        assert (
            f'directory "{directory}" is already used by PersistentVolume {mine}' in (results[name])
        )
        assert admin.get("pv", volume_of(admin, namespace, name)) is None
    assert snapshot(export) == before

    # Another server's export is not ours; a PV naming ".." owns nothing and breaks nothing.
    admin.apply(
        claim("other", namespace, class_name, annotations={"dir": f"{namespace}/elsewhere"})
    )
    assert settled(admin, namespace, "other") == "Bound"
    assert process.ready()


# --- 4. after a watch gap ------------------------------------------------------------------


def watch_gap(
    admin: Kube,
    control_plane: ControlPlane,
    process: ProvisionerProcess,
    during: Callable[[], None],
) -> None:
    """Freeze the provisioner, restart kube-apiserver, run ``during``, thaw the provisioner.

    The restart comes first: the old server has no watch connection left to write the changes
    of ``during`` into (a frozen process's socket would still buffer them). The provisioner's
    watches then resume from a resourceVersion the restarted server no longer has (410 Gone,
    checked here), so kopf re-lists: what ``during`` deleted is simply absent from the new list,
    and no DELETED event is ever delivered for it.
    """
    assert process.process is not None
    server = control_plane.server
    old_rv = claims_resource_version(admin)
    process.process.send_signal(signal.SIGSTOP)
    try:
        control_plane.restart(KUBE_APISERVER)
        wait_for_410_after_restart(admin, old_rv, timeout=WAIT)
        during()
    finally:
        process.process.send_signal(signal.SIGCONT)
        for component in (KUBE_APISERVER, KUBE_CONTROLLER_MANAGER):
            if not control_plane.is_running():
                control_plane.restart(component)
        assert control_plane.server == server


def test_claim_deleted_during_a_watch_gap_is_not_provisioned(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    """The claim waits for its StorageClass; it is deleted during the gap and the class is
    created after it, so the stale claim is what the class event brings to the work queue.
    The periodic resync is out of reach (an hour): either the list-and-prune that follows
    kopf's re-list forgets the claim first, or the check right before provisioning drops it."""
    process = provisioner(RESYNC_PERIOD="3600")
    class_name = unique("after-gap")
    admin.apply(claim("gone", namespace, class_name))
    volume = volume_of(admin, namespace, "gone")
    wait_for(
        "the provisioner to hold the claim",
        lambda: logged(process, f"claim {namespace}/gone: waiting", class_name),
        timeout=WAIT,
    )

    def delete_claim() -> None:
        admin.run("delete", "pvc", "gone", "-n", namespace, "--wait=true", "--timeout=60s")

    try:
        watch_gap(admin, control_plane, process, delete_claim)
        admin.apply(storage_class(class_name, process.name, {"onDelete": "delete"}))
        uid = volume.removeprefix("pvc-")
        wait_for(
            "the stale claim to be provisioned or dropped",
            lambda: (
                admin.get("pv", volume) is not None
                or logged(process, f"claim {namespace}/gone:", "no longer exists")
                or logged(process, f"claim uid {uid}: absent from the list")
            ),
            timeout=WAIT,
        )
        assert admin.get("pv", volume) is None, f"deleted claim got PersistentVolume {volume}"
        assert not any(
            p.name.startswith(f"{namespace}-gone-") for p in (tmp_path / "export").iterdir()
        )
    finally:
        admin.run("delete", "storageclass", class_name, "--ignore-not-found", check=False)


def test_volume_deleted_during_a_watch_gap_frees_its_directory_after_the_relist(
    admin: Kube,
    provisioner: StartProvisioner,
    namespace: str,
    control_plane: ControlPlane,
    hand_volumes: Callable[..., str],
    storage_classes: StorageClasses,
) -> None:
    directory = f"{namespace}/gap"
    owner = hand_volumes("gap", NFS_SERVER, f"{NFS_PATH}/{directory}", annotations=ours(directory))
    # No periodic resync during the test: only kopf's re-list after 410 Gone can trigger the
    # list-and-prune that forgets the PV deleted during the gap.
    process = provisioner(RESYNC_PERIOD="3600")
    class_name = storage_classes(process.name, BY_ANNOTATION, prefix="gap")
    admin.apply(claim("probe", namespace, class_name, annotations={"dir": directory}))
    result = settled(admin, namespace, "probe")
    assert f"already used by PersistentVolume {owner}" in result  # the provisioner knows the PV
    admin.run("delete", "pvc", "probe", "-n", namespace, "--wait=true", "--timeout=60s")

    def delete_volume() -> None:
        admin.run("delete", "pv", owner, "--wait=true", "--timeout=60s")

    watch_gap(admin, control_plane, process, delete_volume)
    admin.apply(claim("after", namespace, class_name, annotations={"dir": directory}))
    after = admin.wait_phase("pvc", "after", "Bound", namespace, timeout=WAIT)
    assert after["spec"]["volumeName"] == volume_of(admin, namespace, "after")
