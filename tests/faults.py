"""The fault seam for tests: make chosen filesystem or API calls fail or hang.

Not part of the package, so it cannot be switched on in the image: integration tests start
``python -m tests.faulty_provisioner`` (see ``harness.ProvisionerProcess``), which runs the real
entry point with ``FaultInjectingSyscalls`` around ``safefs.LocalSyscalls`` and
``FaultInjectingKubeApi`` in place of ``kube.KubeClient``. The rules file is re-read before every
call, so a test can change faults while the provisioner runs. Every hang that starts appends a
line ``<op> <where>`` to the ``.held`` file beside the rules (``held_file``), so that a test
knows the provisioner is held at the point it chose (and can SIGKILL it there).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from provisioner import events
from provisioner.api import JSON, ApiError, ObjectRef
from provisioner.kube import KubeClient
from provisioner.safefs import LocalSyscalls, Syscalls

FAULTS_ENV = "NFS_PROVISIONER_UNSAFE_FAULTS_FILE"
"""The rules file of ``tests.faulty_provisioner``; the plain provisioner ignores it."""

FaultOp = Literal[
    "open", "stat", "mkdir", "chmod", "chown", "rename", "unlink", "rmdir", "listdir", "write",
    "fsync",
]  # fmt: skip
"""Filesystem calls (``safefs.Syscalls``); ``where`` is the export-relative path."""

ApiOp = Literal[
    "get_claim", "create_volume", "get_volume", "delete_volume", "patch_volume",
    "remove_volume_finalizer", "post_event",
]  # fmt: skip
"""The reconciler's API calls; ``where`` is ``<namespace>/<claim>`` for get_claim, the PV name
for PV calls, ``<object name>/<reason>`` for post_event."""

_FAULT_OPS: tuple[str, ...] = (*typing.get_args(FaultOp), *typing.get_args(ApiOp))


def _quote(value: Path | str) -> str:
    return json.dumps(str(value), ensure_ascii=False)


@dataclass(frozen=True)
class FaultRule:
    """Make ``op`` where ``where`` contains ``match`` raise ``errno`` (an API call: a 500
    error) or block ("hang"). A leading ``^`` anchors ``match`` at the start of ``where``, a
    trailing ``$`` at its end."""

    op: str
    match: str = ""
    effect: Literal["error", "hang"] = "error"
    errno: str = "EIO"

    def applies(self, op: str, where: str) -> bool:
        if self.op != op:
            return False
        text, start, end = self.match, self.match.startswith("^"), self.match.endswith("$")
        text = text[1 if start else 0 : len(text) - 1 if end else len(text)]
        if start and end:
            return where == text
        if start:
            return where.startswith(text)
        if end:
            return where.endswith(text)
        return text in where


def held_file(rules_file: Path) -> Path:
    """Where each hang that starts is announced, one ``<op> <where>`` line per hang."""
    return rules_file.with_name(f"{rules_file.name}.held")


def _announce_hang(rules_file: Path, op: str, where: str) -> None:
    with held_file(rules_file).open("a") as held:
        held.write(f"{op} {where}\n")


def write_fault_rules(rules_file: Path, rules: Sequence[FaultRule]) -> None:
    """Replace the rules atomically, so a reader never sees a half-written file."""
    temporary = rules_file.with_suffix(".tmp")
    temporary.write_text(json.dumps([asdict(rule) for rule in rules]))
    temporary.replace(rules_file)


def read_fault_rules(rules_file: Path) -> list[FaultRule]:
    try:
        raw = json.loads(rules_file.read_text())
    except FileNotFoundError:
        return []
    except json.JSONDecodeError as exc:
        raise ValueError(f"fault rules file {_quote(rules_file)} is not valid JSON: {exc}") from exc
    if not isinstance(raw, list):
        raise ValueError(f"fault rules file {_quote(rules_file)} must hold a JSON list of rules")
    return [_parse_fault_rule(rules_file, index, item) for index, item in enumerate(raw)]


def _parse_fault_rule(rules_file: Path, index: int, item: object) -> FaultRule:
    where = f"fault rule #{index} in {_quote(rules_file)}"
    if not isinstance(item, dict) or not all(isinstance(value, str) for value in item.values()):
        raise ValueError(f"{where} must be an object of strings, got {item!r}")
    unknown = set(item) - {"op", "match", "effect", "errno"}
    if unknown:
        raise ValueError(
            f"{where} has unknown keys {sorted(unknown)}; use op, match, effect, errno"
        )
    rule = FaultRule(**item)
    if rule.op not in _FAULT_OPS:
        raise ValueError(f"{where}: op {_quote(rule.op)} is not one of {', '.join(_FAULT_OPS)}")
    if rule.effect not in ("error", "hang"):
        raise ValueError(f'{where}: effect {_quote(rule.effect)} must be "error" or "hang"')
    if not isinstance(getattr(errno, rule.errno, None), int):
        raise ValueError(f'{where}: errno {_quote(rule.errno)} is not a name like "EACCES"')
    return rule


class FaultInjectingSyscalls:
    """``Syscalls`` that fail or hang on demand, then do the real call; a fake, not a mock.

    A hang lasts until its rule is removed (then the real call proceeds, as when an NFS server
    comes back) or ``max_hang`` seconds pass.
    """

    def __init__(
        self,
        rules_file: Path,
        inner: Syscalls | None = None,
        max_hang: float = 3600.0,
        poll: float = 0.02,
    ) -> None:
        self.rules_file = rules_file
        self.inner: Syscalls = inner or LocalSyscalls()
        self._max_hang = max_hang
        self._poll = poll

    def _inject(self, op: FaultOp, where: str) -> None:
        for rule in read_fault_rules(self.rules_file):
            if not rule.applies(op, where):
                continue
            if rule.effect == "hang":
                self._hang(rule, op, where)
            else:
                code = int(getattr(errno, rule.errno))
                raise OSError(code, os.strerror(code), where)

    def _hang(self, rule: FaultRule, op: str, where: str) -> None:
        _announce_hang(self.rules_file, op, where)
        deadline = time.monotonic() + self._max_hang
        while time.monotonic() < deadline and rule in read_fault_rules(self.rules_file):
            time.sleep(self._poll)

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        self._inject("open", where)
        return self.inner.open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self._inject("stat", where)
        return self.inner.stat(parent, name, where)

    def mkdir(self, parent: int, name: str, where: str) -> None:
        self._inject("mkdir", where)
        self.inner.mkdir(parent, name, where)

    def chmod(self, fd: int, mode: int, where: str) -> None:
        self._inject("chmod", where)
        self.inner.chmod(fd, mode, where)

    def chown(self, fd: int, uid: int, gid: int, where: str) -> None:
        self._inject("chown", where)
        self.inner.chown(fd, uid, gid, where)

    def rename(
        self, parent: int, src: str, dst_parent: int, dst: str, where: str, replace: bool
    ) -> None:
        self._inject("rename", where)
        self.inner.rename(parent, src, dst_parent, dst, where, replace)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self._inject("unlink", where)
        self.inner.unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self._inject("rmdir", where)
        self.inner.rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self._inject("listdir", where)
        return self.inner.listdir(fd, where)

    def write(self, fd: int, data: bytes, where: str) -> None:
        self._inject("write", where)
        self.inner.write(fd, data, where)

    def fsync(self, fd: int, where: str) -> None:
        self._inject("fsync", where)
        self.inner.fsync(fd, where)


class FaultInjectingKubeApi(KubeClient):
    """``KubeClient`` whose reconciler-facing calls fail (a 500 from the API server) or hang on
    demand before the real request; the rules file is named by ``FAULTS_ENV``. A hang blocks
    only the awaiting task, as a slow API server would."""

    rules_file = Path()
    """Set by ``tests.faulty_provisioner`` before the provisioner is built."""
    poll = 0.02

    async def _inject(self, op: ApiOp, where: str) -> None:
        for rule in read_fault_rules(self.rules_file):
            if not rule.applies(op, where):
                continue
            if rule.effect == "error":
                raise ApiError(500, "InternalError", f"injected fault: {op} {where}")
            _announce_hang(self.rules_file, op, where)
            while rule in read_fault_rules(self.rules_file):  # noqa: ASYNC110 - polls a file
                await asyncio.sleep(self.poll)

    async def get_claim(self, namespace: str, name: str) -> JSON | None:
        await self._inject("get_claim", f"{namespace}/{name}")
        return await super().get_claim(namespace, name)

    async def create_volume(self, body: JSON) -> JSON:
        await self._inject("create_volume", str(body.get("metadata", {}).get("name", "")))
        return await super().create_volume(body)

    async def get_volume(self, name: str) -> JSON | None:
        await self._inject("get_volume", name)
        return await super().get_volume(name)

    async def delete_volume(self, name: str, uid: str = "") -> JSON | None:
        await self._inject("delete_volume", name)
        return await super().delete_volume(name, uid)

    async def patch_volume(self, name: str, patch: JSON) -> JSON:
        await self._inject("patch_volume", name)
        return await super().patch_volume(name, patch)

    async def remove_volume_finalizer(self, name: str, finalizer: str, uid: str) -> JSON | None:
        await self._inject("remove_volume_finalizer", name)
        return await super().remove_volume_finalizer(name, finalizer, uid)

    async def post_event(
        self, ref: ObjectRef, event_type: str, reason: str, message: str, component: str
    ) -> events.Action:
        await self._inject("post_event", f"{ref.name}/{reason}")
        return await super().post_event(ref, event_type, reason, message, component)
