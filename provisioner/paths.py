"""Relative directories under the NFS export: naming, pattern rendering and the safety gate.

core.py asks this module which directory a claim gets; storage.py asks it where on disk that is.
It is the only producer of paths that may be created, renamed or removed. It is pure: standard
library only, no kopf, kubernetes or prometheus_client, and it never changes the filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

JOURNAL_DIR = ".nfs-provisioner"
"""The provisioner's own records at the export root (journal.py); never a claim's directory."""

MAX_NAME_BYTES = 255
"""Longest directory name (one path component) Linux and NFS accept, in UTF-8 bytes."""

_HASH_CHARS = 10
_SAFE_EXAMPLE = "${.PVC.namespace}/${.PVC.name}"
_RULE_JOURNAL = (
    f"{JOURNAL_DIR} (in any letter case) at the export root holds the provisioner's own records"
)
_RULE_EMPTY = "it is empty, and an empty directory would be the export root itself"

# nfs-subdir's token regex (`\${\.PVC\.((labels|annotations)\.(.*?)|.*?)}`), widened to `.PV.`.
# The key is lazy up to the first "}", so keys may contain "." and "/" but not "}".
_TOKEN = re.compile(
    r"\$\{\.(?P<kind>PVC|PV)\.(?:(?P<map>labels|annotations)\.(?P<key>.*?)|(?P<field>.*?))\}"
)


def _quote(value: str) -> str:
    # JSON quoting escapes NUL, newlines and quotes, so a hostile value cannot forge log lines.
    return json.dumps(value, ensure_ascii=False)


class UnsafePathError(ValueError):
    """A rendered or recorded directory that must not be created, renamed or removed.

    ``rendered`` is the offending path, ``rule`` the rule it breaks, ``pattern`` the class's
    pathPattern it came from, or None when it was read back from a PersistentVolume.
    """

    def __init__(self, rendered: str, rule: str, pattern: str | None = None) -> None:
        self.rendered = rendered
        self.rule = rule
        self.pattern = pattern
        if pattern is not None:
            message = (
                f"pathPattern {_quote(pattern)} rendered {_quote(rendered)}, which is unsafe: "
                f"{rule}. Use a pattern whose labels/annotations render to plain relative names, "
                f"e.g. {_quote(_SAFE_EXAMPLE)}"
            )
        else:
            message = (
                f"recorded directory {_quote(rendered)} is unsafe: {rule}. Only plain relative "
                "paths strictly inside the export are touched: restore the volume's recorded "
                "directory to what the provisioner wrote, or clean up by hand"
            )
        super().__init__(message)


@dataclass(frozen=True)
class ClaimFields:
    """The parts of a PersistentVolumeClaim a pathPattern may refer to."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RelativeDir:
    """A validated directory relative to the export: at least one safe component.

    Constructing one always validates it, so holding a RelativeDir means the path is safe to
    join under the mount (containment against symlinks is still checked by ``locate``).
    """

    parts: tuple[str, ...]

    def __post_init__(self) -> None:
        joined = "/".join(self.parts)
        if not self.parts:
            raise UnsafePathError(joined, _RULE_EMPTY)
        for part in self.parts:
            rule = _component_rule(part)
            if rule is not None:
                raise UnsafePathError(joined, rule)
        if is_journal_name(self.parts[0]):
            raise UnsafePathError(joined, _RULE_JOURNAL)

    def __str__(self) -> str:
        return "/".join(self.parts)

    @property
    def leaf(self) -> str:
        return self.parts[-1]

    @property
    def parent_parts(self) -> tuple[str, ...]:
        return self.parts[:-1]


def parts_overlap(first: Sequence[str], second: Sequence[str]) -> bool:
    """Whether one path is the other or lies inside it, component by component: ``ns/app``
    overlaps ``ns/app/data`` and ``ns``, not ``ns/application``."""
    depth = min(len(first), len(second))
    return tuple(first[:depth]) == tuple(second[:depth])


def is_journal_name(component: str) -> bool:
    """Whether a top-level component names the provisioner's own directory, in any case: on a
    case-insensitive export (some NAS shares) ``.NFS-Provisioner`` is the same directory. Both
    folds: servers that compare by upper case also match a dotless i (U+0131) to ``i``."""
    return (
        component.casefold() == JOURNAL_DIR.casefold() or component.upper() == JOURNAL_DIR.upper()
    )


def _component_rule(part: str) -> str | None:
    """The rule a single path component breaks, or None if it is a plain name."""
    if part == "":
        return 'it has an empty path component ("//", a trailing "/" or an empty value)'
    if "/" in part:
        return f'the path component {_quote(part)} contains "/"'
    if "\x00" in part:
        return "it contains a NUL byte"
    if part in (".", ".."):
        return f"a path component is {_quote(part)}"
    return _size_rule(part)


def _size_rule(part: str) -> str | None:
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError:
        return f"the path component {_quote(part)} is not valid UTF-8"
    if size > MAX_NAME_BYTES:
        return (
            f"the path component {_quote(part)} is {size} bytes, "
            f"over the {MAX_NAME_BYTES}-byte limit for a directory name"
        )
    return None


def parse_relative(value: str, pattern: str | None = None) -> RelativeDir:
    """Validate a rendered or recorded path; refuse, never normalise, anything unusual."""
    if value == "":
        raise UnsafePathError(value, _RULE_EMPTY, pattern)
    # Checked before splitting so that "/abs" and "a\x00b" get their own rule, not a vaguer one.
    if "\x00" in value:
        raise UnsafePathError(value, "it contains a NUL byte", pattern)
    if value.startswith("/"):
        raise UnsafePathError(
            value, 'it is absolute (starts with "/"); it must be relative to the export', pattern
        )
    parts = tuple(value.split("/"))
    for part in parts:
        rule = _component_rule(part)
        if rule is not None:
            raise UnsafePathError(value, rule, pattern)
    if is_journal_name(parts[0]):
        raise UnsafePathError(value, _RULE_JOURNAL, pattern)
    return RelativeDir(parts)


def _fit_name(name: str) -> str:
    """``name`` itself if it fits in one component, else a stable prefix plus a short hash."""
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    suffix = "-" + hashlib.sha256(encoded).hexdigest()[:_HASH_CHARS]
    # Cutting bytes can split a multibyte character; "ignore" drops only that partial tail.
    prefix = encoded[: MAX_NAME_BYTES - len(suffix)].decode("utf-8", "ignore")
    return prefix + suffix


def default_dir(namespace: str, claim_name: str, pv_name: str) -> RelativeDir:
    """nfs-subdir's ``<namespace>-<claim>-<pv>``, shortened deterministically past 255 bytes."""
    return RelativeDir((_fit_name(f"{namespace}-{claim_name}-{pv_name}"),))


def render_pattern(pattern: str, claim: ClaimFields, pv_name: str) -> str:
    """Substitute nfs-subdir's ``${.PVC.*}`` tokens and our ``${.PV.name}``; no validation.

    Unknown tokens and missing labels/annotations render as "", as in nfs-subdir, so existing
    StorageClasses keep their directory names; ``parse_relative`` then judges the result.
    """

    def substitute(token: re.Match[str]) -> str:
        if token["kind"] == "PV":
            return pv_name if token["field"] == "name" else ""
        if token["map"] == "labels":
            return claim.labels.get(token["key"], "")
        if token["map"] == "annotations":
            return claim.annotations.get(token["key"], "")
        return {"namespace": claim.namespace, "name": claim.name}.get(token["field"], "")

    return _TOKEN.sub(substitute, pattern)


def claim_dir(pattern: str | None, claim: ClaimFields, pv_name: str) -> RelativeDir:
    """The directory a claim gets: the default name, or the class's pathPattern made safe.

    An empty rendering is refused: old nfs-subdir images fell back to the export root there.
    """
    if pattern is None:
        return default_dir(claim.namespace, claim.name, pv_name)
    return parse_relative(render_pattern(pattern, claim, pv_name), pattern=pattern)


def locate(mount: Path, rel: RelativeDir | str) -> Path:
    """The on-disk path of ``rel`` under ``mount``, after checking it stays strictly inside.

    Every destructive filesystem call goes through here. Symlinks in the existing part of the
    path are resolved, so a link pointing outside the export, or at its root, is refused.
    """
    checked = parse_relative(rel) if isinstance(rel, str) else rel
    path = mount.joinpath(*checked.parts)
    root = os.path.realpath(mount)
    resolved = os.path.realpath(path)
    if resolved == root:
        where = "the export root itself"
    elif os.path.commonpath([root, resolved]) != root:
        where = "outside the export"
    else:
        return path
    raise UnsafePathError(
        str(checked),
        f"under {_quote(str(mount))} it resolves to {_quote(resolved)} "
        f"through a symbolic link, which is {where}",
    )


def archive_name(rel: RelativeDir, taken: Callable[[RelativeDir], bool]) -> RelativeDir:
    """``archived-<leaf>`` beside ``rel``, or the first free ``archived-<leaf>-N`` (N >= 2).

    ``taken`` says whether a candidate already exists; an existing archive is never reused.
    Names over 255 bytes are shortened like ``default_dir``, so each N still gives its own name.
    """
    attempt = 1
    while True:
        name = f"archived-{rel.leaf}" if attempt == 1 else f"archived-{rel.leaf}-{attempt}"
        candidate = RelativeDir((*rel.parent_parts, _fit_name(name)))
        if not taken(candidate):
            return candidate
        attempt += 1
