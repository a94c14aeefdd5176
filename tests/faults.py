"""The filesystem fault seam for tests: make chosen calls on the export fail or hang.

Not part of the package, so it cannot be switched on in the image: integration tests start
``python -m tests.faulty_provisioner`` (see ``harness.ProvisionerProcess``), which runs the real
entry point with ``FaultInjectingSyscalls`` around ``safefs.LocalSyscalls``. The rules file is
re-read before every call, so a test can change faults while the provisioner runs.
"""

from __future__ import annotations

import errno
import json
import os
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from provisioner.safefs import LocalSyscalls, Syscalls

FAULTS_ENV = "NFS_PROVISIONER_UNSAFE_FAULTS_FILE"
"""The rules file of ``tests.faulty_provisioner``; the plain provisioner ignores it."""

FaultOp = Literal[
    "open", "stat", "mkdir", "chmod", "chown", "rename", "unlink", "rmdir", "listdir", "write",
    "fsync",
]  # fmt: skip
_FAULT_OPS: tuple[FaultOp, ...] = typing.get_args(FaultOp)


def _quote(value: Path | str) -> str:
    return json.dumps(str(value), ensure_ascii=False)


@dataclass(frozen=True)
class FaultRule:
    """Make ``op`` on entries whose export-relative path contains ``match`` raise ``errno``
    ("error") or block ("hang")."""

    op: str
    match: str = ""
    effect: Literal["error", "hang"] = "error"
    errno: str = "EIO"

    def applies(self, op: str, where: str) -> bool:
        return self.op == op and self.match in where


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
                self._hang(rule)
            else:
                code = int(getattr(errno, rule.errno))
                raise OSError(code, os.strerror(code), where)

    def _hang(self, rule: FaultRule) -> None:
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
