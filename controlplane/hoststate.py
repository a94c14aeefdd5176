"""What a kubelet node changes on the host: recorded before it starts, undone after it stops.

Host-global effects and how they are undone: a kubelet and containerd cannot be fully confined
to a directory. They create ``/run/containerd``, ``/run/netns/cni-*``, ``/var/lib/cni``,
``/var/lib/kubelet``, ``/var/log/containers``, a bridge link, ``kubepods`` cgroups, sometimes
``KUBE-*`` iptables chains, and the kubelet rewrites sysctls at start (``vm.overcommit_memory``
0->1, ``kernel.panic`` 1->10, ``kernel.panic_on_oops`` 0->1 here) as the bridge plugin does
``ip_forward``. :func:`capture_host_state` records all of that before the start;
:func:`restore_host` removes what is new and writes the recorded values back;
:func:`diff_host_state` says what still differs (``Node.host_differences``, limited by
:func:`node_scope` to what a node can touch, so Docker next door is not blamed), so a test can
assert nothing does.

Why apart from ``controlplane.node``: it is the host's side, not the node's; the pure part
(the state as comparable values, its diff, its JSON form for the state file, a node's scope,
the preflight check) comes first and is tested without root, then the I/O (capture, unmount,
restore). Nothing here signals a process by name: only processes in ``kubepods`` cgroups that
did not exist before the node started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.binaries import KUBELET
from controlplane.nodeconfig import BRIDGE, POD_SUBNET, SERVICE_LINK
from controlplane.processes import _run

# Host paths the node may create; each is removed afterwards if it did not exist before.
HOST_PATHS = (
    "/run/containerd",
    "/run/netns",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/usr/libexec/kubernetes",
    "/var/lib/containerd",
)
# Directories whose entries are compared one by one (they may exist before, shared).
HOST_LISTED_DIRS = ("/run/netns", "/run/containerd", "/run/containerd/runc")
# Entries of those a node's containerd creates (shim sockets, runc state, fifos), removed when
# new; other new entries belong to someone else and are only reported.
NODE_ENTRIES = {"/run/containerd": {"s", "runc", "fifo"}, "/run/containerd/runc": {"k8s.io"}}
# Written by the kubelet at start (setupKernelTunables) or by the CNI bridge plugin.
HOST_SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Processes the node starts (``comm``, 15 characters at most).
NODE_COMMS = frozenset({"containerd", "containerd-shim", "kubelet", "runc"})
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "kubepods"


# --------------------------------------------------------------------------- host state (pure part)


@dataclass(frozen=True)
class HostState:
    """What of the host a node can change, as comparable values."""

    mounts: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()
    iptables: tuple[str, ...] = ()
    ip6tables: tuple[str, ...] = ()
    sysctls: Mapping[str, str] = field(default_factory=dict)
    listening: frozenset[str] = frozenset()
    processes: frozenset[str] = frozenset()
    paths: Mapping[str, bool] = field(default_factory=dict)
    listings: Mapping[str, frozenset[str]] = field(default_factory=dict)
    cgroups: frozenset[str] = frozenset()


def normalize_iptables_save(text: str) -> tuple[str, ...]:
    """iptables-save output without comments and packet counters, to compare two runs."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\s*\[\d+:\d+\]", "", line))
    return tuple(out)


def iptables_chains(rules: Iterable[str]) -> dict[str, set[str]]:
    """table -> chain names, from normalized iptables-save lines."""
    chains: dict[str, set[str]] = {}
    table = ""
    for line in rules:
        if line.startswith("*"):
            table = line[1:]
            chains.setdefault(table, set())
        elif line.startswith(":"):
            chains.setdefault(table, set()).add(line[1:].split()[0])
    return chains


def _set_diff(label: str, before: Iterable[str], after: Iterable[str]) -> list[str]:
    b, a = set(before), set(after)
    return [f"{label}: new {item}" for item in sorted(a - b)] + [
        f"{label}: gone {item}" for item in sorted(b - a)
    ]


def diff_host_state(before: HostState, after: HostState) -> list[str]:
    """Human-readable differences; empty when the host is as it was."""
    problems: list[str] = []
    problems += _set_diff("mount", before.mounts, after.mounts)
    problems += _set_diff("link", before.links, after.links)
    problems += _set_diff("iptables", before.iptables, after.iptables)
    problems += _set_diff("ip6tables", before.ip6tables, after.ip6tables)
    for key in sorted(set(before.sysctls) | set(after.sysctls)):
        if before.sysctls.get(key) != after.sysctls.get(key):
            problems.append(
                f"sysctl {key}: was {before.sysctls.get(key)!r}, is {after.sysctls.get(key)!r}"
            )
    problems += _set_diff("listening", before.listening, after.listening)
    problems += _set_diff("process", before.processes, after.processes)
    for path in sorted(set(before.paths) | set(after.paths)):
        if before.paths.get(path) != after.paths.get(path):
            state = "exists" if after.paths.get(path) else "is missing"
            problems.append(f"path {path}: {state} now")
    for directory in sorted(set(before.listings) | set(after.listings)):
        problems += _set_diff(
            f"entry of {directory}",
            before.listings.get(directory, frozenset()),
            after.listings.get(directory, frozenset()),
        )
    problems += _set_diff("cgroup", before.cgroups, after.cgroups)
    return problems


def host_state_to_json(state: HostState) -> dict[str, Any]:
    """A JSON-able form of ``state`` (sets become sorted lists), for the state file."""
    return {
        "mounts": sorted(state.mounts),
        "links": sorted(state.links),
        "iptables": list(state.iptables),
        "ip6tables": list(state.ip6tables),
        "sysctls": dict(state.sysctls),
        "listening": sorted(state.listening),
        "processes": sorted(state.processes),
        "paths": dict(state.paths),
        "listings": {k: sorted(v) for k, v in state.listings.items()},
        "cgroups": sorted(state.cgroups),
    }


def host_state_from_json(data: Mapping[str, Any]) -> HostState:
    """The inverse of :func:`host_state_to_json`."""
    return HostState(
        mounts=frozenset(data["mounts"]),
        links=frozenset(data["links"]),
        iptables=tuple(data["iptables"]),
        ip6tables=tuple(data["ip6tables"]),
        sysctls=dict(data["sysctls"]),
        listening=frozenset(data["listening"]),
        processes=frozenset(data["processes"]),
        paths={k: bool(v) for k, v in data["paths"].items()},
        listings={k: frozenset(v) for k, v in data["listings"].items()},
        cgroups=frozenset(data["cgroups"]),
    )


# What of the host-wide state a node can touch (see :func:`node_scope`).
NODE_MOUNT_PREFIXES = (
    "/run/netns",
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/sys/fs/cgroup",
)
NODE_IPTABLES_MARKS = ("KUBE-", "CNI-", BRIDGE, POD_SUBNET.rsplit(".", 1)[0] + ".")


def link_name(entry: str) -> str:
    """The link name of a :attr:`HostState.links` entry (``name`` or ``name master=X``)."""
    return entry.split(" ", 1)[0]


def node_scope(state: HostState, owner: Path, bridge: str = BRIDGE) -> HostState:
    """``state`` reduced to what a node under ``owner`` can change: mounts under ``owner`` or
    :data:`NODE_MOUNT_PREFIXES`; our bridge, veths on it and masterless veths; iptables lines
    naming KUBE-/CNI- chains, the bridge or the pod subnet. The rest (sysctls, paths, cgroups,
    processes and listeners, already owner-scoped) is kept.

    Why: Docker or another test on the same host mounts overlays and adds veths and DOCKER
    chains while a node runs; a host-wide diff would blame the node for them.
    """
    roots = [str(owner).rstrip("/"), *NODE_MOUNT_PREFIXES]

    def our_mount(entry: str) -> bool:
        point = entry.split(" ", 1)[0]
        return any(point == r or point.startswith(r + "/") for r in roots)

    def our_link(entry: str) -> bool:
        name, _, master = entry.partition(" master=")
        return bool({bridge, SERVICE_LINK} & {name, master}) or (
            name.startswith("veth") and not master
        )

    def our_rule(line: str) -> bool:
        return any(mark in line for mark in NODE_IPTABLES_MARKS)

    return dataclasses.replace(
        state,
        mounts=frozenset(filter(our_mount, state.mounts)),
        links=frozenset(filter(our_link, state.links)),
        iptables=tuple(filter(our_rule, state.iptables)),
        ip6tables=tuple(filter(our_rule, state.ip6tables)),
    )


def preflight_problems(
    state: HostState, running: Iterable[str] = (), bridge: str = BRIDGE
) -> list[str]:
    """Why a node must not start on a host in ``state`` with processes ``running`` (comms):
    another kubelet, or a killed run's leftovers (which would be taken for the host's own and
    never cleaned)."""
    problems = []
    if bridge in {link_name(entry) for entry in state.links}:
        problems.append(f"link {bridge} exists (a node is running or a killed run left it)")
    problems += [
        f"cgroup {c} exists (another kubelet, or leftovers)" for c in sorted(state.cgroups)
    ]
    if KUBELET in set(running):
        problems.append("a kubelet is running (another node?)")
    return problems


# --------------------------------------------------------------------------- host state (I/O)


def _mounts() -> frozenset[str]:
    found = set()
    for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        found.add(f"{fields[4]} {tail[0] if tail else '?'} {tail[1] if len(tail) > 1 else '?'}")
    return frozenset(found)


def _mountpoints() -> list[str]:
    return [m.split(" ", 1)[0] for m in _mounts()]


def node_processes(owner: Path | None = None) -> dict[int, str]:
    """pid -> comm of the processes a node starts (:data:`NODE_COMMS`); with ``owner``, only
    those whose command line names it (each of ours names its state directory: containerd's
    and the kubelet's --config, the shims' -address), so another run's are not counted."""
    found = {}
    needle = None if owner is None else str(owner).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text(encoding="utf-8").strip()
            if comm not in NODE_COMMS:
                continue
            if needle is not None and needle not in (entry / "cmdline").read_bytes():
                continue
        except OSError:
            continue
        found[int(entry.name)] = comm
    return found


def _listening(pids: Mapping[int, str]) -> frozenset[str]:
    """TCP listeners owned by ``pids``."""
    result = _run(["ss", "-ltnpH"])
    found = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        for pid in (int(p) for p in re.findall(r"pid=(\d+)", line)):
            if pid in pids and len(parts) >= 4:
                found.add(f"{parts[3]} {pids[pid]}")
    return frozenset(found)


def _cgroups() -> frozenset[str]:
    found: set[str] = set()
    if CGROUP_ROOT.is_dir():
        for hierarchy in CGROUP_ROOT.iterdir():
            with contextlib.suppress(OSError):
                found.update(str(p) for p in hierarchy.glob(f"{CGROUP_PREFIX}*"))
    return frozenset(found)


def _read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _links() -> frozenset[str]:
    """Network links, each as ``name`` or ``name master=BRIDGE``."""
    net = Path("/sys/class/net")
    found = set()
    for name in os.listdir(net):
        master = net / name / "master"
        found.add(f"{name} master={master.resolve().name}" if master.exists() else name)
    return frozenset(found)


def capture_host_state(owner: Path | None = None) -> HostState:
    """Record what a node can change on this host (see the module docstring).

    ``owner`` (a node's state directory) limits processes and listeners to that node's; the
    rest is host-wide.
    """
    processes = node_processes(owner)
    sysctls = {name: value for name in HOST_SYSCTLS if (value := _read_sysctl(name)) is not None}
    listings = {}
    for directory in HOST_LISTED_DIRS:
        with contextlib.suppress(OSError):
            listings[directory] = frozenset(os.listdir(directory))
    return HostState(
        mounts=_mounts(),
        links=_links(),
        iptables=normalize_iptables_save(_run(["iptables-save"]).stdout),
        ip6tables=normalize_iptables_save(_run(["ip6tables-save"]).stdout),
        sysctls=sysctls,
        listening=_listening(processes),
        processes=frozenset(f"{comm} (pid {pid})" for pid, comm in processes.items()),
        paths={path: os.path.lexists(path) for path in HOST_PATHS},
        listings=listings,
        cgroups=_cgroups(),
    )


def unmount_under(prefixes: Sequence[Path | str], keep: Iterable[str] = ()) -> list[str]:
    """Unmount every mount at or below one of ``prefixes`` (deepest first), except ``keep``."""
    kept = set(keep)
    roots = [str(p).rstrip("/") for p in prefixes]
    targets = [
        point
        for point in _mountpoints()
        if point not in kept and any(point == r or point.startswith(r + "/") for r in roots)
    ]
    failed = []
    for point in sorted(set(targets), key=lambda p: p.count("/"), reverse=True):
        if _run(["umount", point]).returncode != 0 and _run(["umount", "-l", point]).returncode:
            failed.append(point)
    return failed


def _remove_iptables_chains(
    tool: str, before: Sequence[str], prefixes: tuple[str, ...] = ("KUBE-", "CNI-")
) -> None:
    """Delete chains named ``prefixes*`` that ``tool`` (iptables/ip6tables) did not have before
    (the kubelet's utility chains; CNI's, should masquerading be turned on)."""
    old = iptables_chains(before)
    now = iptables_chains(normalize_iptables_save(_run([f"{tool}-save"]).stdout))
    for table, chains in now.items():
        new = {c for c in chains if c.startswith(prefixes) and c not in old.get(table, set())}
        if not new:
            continue
        rules = _run([tool, "-t", table, "-S"]).stdout.splitlines()
        for rule in rules:  # first the jumps into them, from any chain
            words = rule.split()
            if rule.startswith("-A ") and any(
                words[i] in {"-j", "-g"} and words[i + 1] in new for i in range(len(words) - 1)
            ):
                _run([tool, "-t", table, "-D", *words[1:]])
        for chain in new:
            _run([tool, "-t", table, "-F", chain])
        for chain in new:
            _run([tool, "-t", table, "-X", chain])


def _kill_cgroup_members(before: frozenset[str]) -> None:
    """SIGKILL processes left in ``kubepods`` cgroups that are new since ``before`` (pods of a
    node whose containerd died: a dead shim leaves its container running). Only cgroups this
    node created are touched."""
    killed = False
    for path in sorted(_cgroups() - before):
        for procs in Path(path).rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                for pid in {int(p) for p in procs.read_text(encoding="utf-8").split()}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed = True
    if killed:
        time.sleep(0.5)  # let them exit so their cgroups can be removed


def _remove_cgroups(before: frozenset[str]) -> None:
    for path in sorted(_cgroups() - before):
        for directory in sorted(
            (p for p in Path(path).rglob("*") if p.is_dir()),
            key=lambda p: len(p.parts),
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            Path(path).rmdir()


def _remove_netns_and_links(before: HostState, bridge: str) -> None:
    netns = Path("/run/netns")
    old_netns = before.listings.get(str(netns), frozenset())
    if netns.is_dir():
        for entry in netns.iterdir():
            if entry.name.startswith("cni-") and entry.name not in old_netns:
                with contextlib.suppress(OSError):
                    entry.unlink()
    net = Path("/sys/class/net")
    for link in sorted(set(os.listdir(net)) - {link_name(entry) for entry in before.links}):
        master = net / link / "master"
        if master.exists() and master.resolve().name == bridge:
            _run(["ip", "link", "delete", link])
    for ours in (bridge, SERVICE_LINK):
        if ours not in {link_name(entry) for entry in before.links} and (net / ours).exists():
            _run(["ip", "link", "delete", ours])


def _restore_sysctls(before: HostState) -> None:
    for name, value in before.sysctls.items():
        if _read_sysctl(name) != value:
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / name).write_text(value + "\n", encoding="utf-8")


def _remove_new_paths(before: HostState) -> None:
    for directory, ours in NODE_ENTRIES.items():
        old = before.listings.get(directory)
        if old is None or not Path(directory).is_dir():
            continue  # absent before: the whole path goes below
        for entry in (set(os.listdir(directory)) - old) & ours:
            shutil.rmtree(Path(directory) / entry, ignore_errors=True)
    for name, existed in before.paths.items():
        path = Path(name)
        if existed or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def restore_host(before: HostState, bridge: str = BRIDGE) -> None:
    """Undo what a node left on the host since ``before`` (after its processes stopped).

    First any process still in a new ``kubepods`` cgroup (a pod of a node that died), then in
    real-node.md's order: mounts (network namespaces, the kubelet's and containerd's),
    network namespaces and links (veths on our bridge, then the bridge), KUBE-* chains,
    sysctls (ip_forward and the kubelet's tunables), paths that did not exist, then the
    empty ``kubepods`` cgroups. What existed before is left alone.
    """
    _kill_cgroup_members(before.cgroups)
    unmount_under(
        ["/run/netns", "/run/containerd", "/var/lib/kubelet"],
        keep=(m.split(" ", 1)[0] for m in before.mounts),
    )
    _remove_netns_and_links(before, bridge)
    _remove_iptables_chains("iptables", before.iptables)
    _remove_iptables_chains("ip6tables", before.ip6tables)
    _restore_sysctls(before)
    _remove_new_paths(before)
    _remove_cgroups(before.cgroups)
