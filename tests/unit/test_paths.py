"""Unit tests for provisioner.paths: the safety gate, pattern rendering, naming and containment.

Tables of named cases.
Pure and fast: nothing here may touch the filesystem outside tmp_path.
"""

from __future__ import annotations

import hashlib

import pytest

from provisioner.paths import (
    MAX_NAME_BYTES,
    ClaimFields,
    RelativeDir,
    UnsafePathError,
    archive_name,
    claim_dir,
    default_dir,
    parse_relative,
    render_pattern,
)

CLAIM = ClaimFields(
    namespace="team-a",
    name="data",
    labels={"app": "web", "tier": "db"},
    annotations={"nfs.io/storage-path": "shared", "dir": "../etc", "dot": "."},
)
PV = "pvc-0b1c"


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        pytest.param("..", 'a path component is ".."', id="dotdot"),
        pytest.param("a/../b", 'a path component is ".."', id="dotdot-inside"),
        pytest.param("../../etc", 'a path component is ".."', id="dotdot-leading"),
        pytest.param("a/..", 'a path component is ".."', id="dotdot-trailing"),
        pytest.param("/abs", "it is absolute", id="absolute"),
        pytest.param("/", "it is absolute", id="root"),
        pytest.param("", "it is empty", id="empty"),
        pytest.param(".", 'a path component is "."', id="dot"),
        pytest.param("a/./b", 'a path component is "."', id="dot-inside"),
        pytest.param("a//b", "empty path component", id="double-slash"),
        pytest.param("a/", "empty path component", id="trailing-slash"),
        pytest.param("a\x00b", "NUL byte", id="nul"),
        pytest.param("x" * 256, "is 256 bytes, over the 255-byte limit", id="component-256-bytes"),
        pytest.param("ok/" + "é" * 128, "is 256 bytes", id="multibyte-component-256-bytes"),
        pytest.param("\ud800", "is not valid UTF-8", id="lone-surrogate"),
    ],
)
def test_parse_relative_refuses(value: str, rule: str) -> None:
    with pytest.raises(UnsafePathError) as caught:
        parse_relative(value)
    assert rule in caught.value.rule
    assert caught.value.rendered == value
    assert caught.value.pattern is None


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        pytest.param("a", ("a",), id="single"),
        pytest.param("team-a/web/data", ("team-a", "web", "data"), id="nested"),
        pytest.param("...", ("...",), id="three-dots-is-a-name"),
        pytest.param("..a/.b", ("..a", ".b"), id="dot-prefixed-names"),
        pytest.param("with space", ("with space",), id="space"),
        pytest.param("x" * 255, ("x" * 255,), id="ascii-255-bytes"),
        pytest.param("é" * 127 + "a", ("é" * 127 + "a",), id="unicode-exactly-255-bytes"),
        pytest.param("日" * 85, ("日" * 85,), id="three-byte-unicode-255-bytes"),
    ],
)
def test_parse_relative_accepts(value: str, parts: tuple[str, ...]) -> None:
    rel = parse_relative(value)
    assert rel.parts == parts
    assert str(rel) == value


def test_unsafe_path_error_names_pattern_value_rule_and_fix() -> None:
    with pytest.raises(UnsafePathError) as caught:
        parse_relative("../etc", pattern="${.PVC.annotations.dir}")
    assert str(caught.value) == (
        'pathPattern "${.PVC.annotations.dir}" rendered "../etc", which is unsafe: '
        'a path component is "..". Use a pattern whose labels/annotations render to plain '
        'relative names, e.g. "${.PVC.namespace}/${.PVC.name}"'
    )


def test_unsafe_path_error_for_a_recorded_directory() -> None:
    with pytest.raises(UnsafePathError) as caught:
        parse_relative("../x")
    assert str(caught.value).startswith(
        'recorded directory "../x" is unsafe: a path component is "..". '
    )


def test_unsafe_path_error_escapes_control_characters() -> None:
    # A NUL or newline in an Event or log line would truncate or forge it.
    with pytest.raises(UnsafePathError) as caught:
        parse_relative("a\x00\nb")
    assert '"a\\u0000\\nb"' in str(caught.value)


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param((), id="no-parts"),
        pytest.param(("a/b",), id="slash-in-part"),
        pytest.param(("a", ".."), id="dotdot-part"),
        pytest.param(("",), id="empty-part"),
    ],
)
def test_relative_dir_validates_on_construction(parts: tuple[str, ...]) -> None:
    with pytest.raises(UnsafePathError):
        RelativeDir(parts)


def test_relative_dir_accessors() -> None:
    rel = RelativeDir(("team-a", "web", "data"))
    assert (str(rel), rel.leaf, rel.parent_parts) == ("team-a/web/data", "data", ("team-a", "web"))
    assert RelativeDir(("a",)).parent_parts == ()


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        pytest.param("${.PVC.namespace}/${.PVC.name}", "team-a/data", id="namespace-and-name"),
        pytest.param("${.PVC.labels.app}", "web", id="label"),
        pytest.param(
            "${.PVC.annotations.nfs.io/storage-path}", "shared", id="annotation-key-with-dot-slash"
        ),
        pytest.param("x${.PVC.labels.missing}y", "xy", id="missing-label-is-empty"),
        pytest.param("x${.PVC.annotations.missing}y", "xy", id="missing-annotation-is-empty"),
        pytest.param("x${.PVC.uid}y", "xy", id="unknown-pvc-field-is-empty"),
        pytest.param("x${.PVC.labels}y", "xy", id="labels-without-key-is-empty"),
        pytest.param("${.PV.name}", PV, id="pv-name"),
        pytest.param("x${.PV.uid}y", "xy", id="unknown-pv-field-is-empty"),
        pytest.param("data-${.PVC.name}-v1", "data-data-v1", id="literal-text-kept"),
        pytest.param("cost$5/{x}/${y}", "cost$5/{x}/${y}", id="non-token-dollar-braces-kept"),
        pytest.param("${.pvc.name}", "${.pvc.name}", id="tokens-are-case-sensitive"),
        pytest.param(
            "${.PVC.namespace}/${.PVC.labels.app}-${.PVC.labels.tier}/${.PV.name}",
            f"team-a/web-db/{PV}",
            id="several-tokens",
        ),
        pytest.param("${.PVC.annotations.dir}", "../etc", id="no-validation-here"),
        pytest.param("", "", id="empty-pattern"),
    ],
)
def test_render_pattern(pattern: str, expected: str) -> None:
    assert render_pattern(pattern, CLAIM, PV) == expected


def test_render_pattern_does_not_expand_tokens_inside_values() -> None:
    claim = ClaimFields("ns", "name", annotations={"dir": "${.PVC.name}"})
    assert render_pattern("${.PVC.annotations.dir}", claim, PV) == "${.PVC.name}"


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        pytest.param(None, f"team-a-data-{PV}", id="default-name"),
        pytest.param("${.PVC.namespace}/${.PVC.name}", "team-a/data", id="nested"),
        pytest.param("${.PVC.annotations.nfs.io/storage-path}", "shared", id="annotation"),
        pytest.param("${.PVC.namespace}/${.PV.name}", f"team-a/{PV}", id="pv-name"),
    ],
)
def test_claim_dir_accepts(pattern: str | None, expected: str) -> None:
    assert str(claim_dir(pattern, CLAIM, PV)) == expected


@pytest.mark.parametrize(
    ("pattern", "annotations", "rule"),
    [
        pytest.param("${.PVC.annotations.dir}", {"dir": "../etc"}, '".."', id="dotdot-annotation"),
        pytest.param("${.PVC.annotations.dir}", {"dir": "/etc"}, "absolute", id="absolute-value"),
        pytest.param("/${.PVC.name}", {}, "absolute", id="absolute-pattern"),
        pytest.param("${.PVC.annotations.missing}", {}, "it is empty", id="renders-empty"),
        pytest.param("${.PVC.annotations.dir}", {"dir": "."}, '"."', id="renders-dot"),
        pytest.param("${.PVC.annotations.dir}", {"dir": "a/.."}, '".."', id="renders-a-dotdot"),
        pytest.param("a/${.PVC.labels.missing}/b", {}, "empty path component", id="empty-middle"),
        pytest.param("${.PVC.name}/", {}, "empty path component", id="trailing-slash"),
        pytest.param("${.PVC.annotations.dir}", {"dir": "x" * 256}, "256 bytes", id="too-long"),
        pytest.param("${.PVC.annotations.dir}", {"dir": "a\x00"}, "NUL", id="nul-value"),
    ],
)
def test_claim_dir_refuses(pattern: str, annotations: dict[str, str], rule: str) -> None:
    claim = ClaimFields("team-a", "data", annotations=annotations)
    with pytest.raises(UnsafePathError) as caught:
        claim_dir(pattern, claim, PV)
    assert rule in caught.value.rule
    assert caught.value.pattern == pattern
    assert str(caught.value).startswith(f'pathPattern "{pattern}" rendered ')


def _full_name(namespace: str, claim_name: str, pv_name: str) -> str:
    return f"{namespace}-{claim_name}-{pv_name}"


@pytest.mark.parametrize(
    ("namespace", "claim_name", "pv_name", "size"),
    [
        pytest.param("n" * 63, "c" * 253, "pvc-" + "0" * 36, 255, id="ascii-max-names"),
        # "ab-" puts each 2-byte "é" at an odd offset, so the 244-byte cut splits one: drop it.
        pytest.param("ab", "é" * 200, "pvc-1", 254, id="two-byte-chars-cut-mid-character"),
        pytest.param("a", "日" * 100, "pvc-1", 253, id="three-byte-chars-cut-mid-character"),
        pytest.param("n", "c" * 252, "p", 255, id="one-byte-over"),
    ],
)
def test_default_dir_shortens_long_names(
    namespace: str, claim_name: str, pv_name: str, size: int
) -> None:
    full = _full_name(namespace, claim_name, pv_name)
    assert len(full.encode()) > MAX_NAME_BYTES
    rel = default_dir(namespace, claim_name, pv_name)
    assert rel == default_dir(namespace, claim_name, pv_name), "must be deterministic"
    name = rel.leaf
    assert len(rel.parts) == 1
    assert len(name.encode()) == size
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    assert name.endswith("-" + digest)
    assert full.startswith(name[: -len(digest) - 1])


def test_default_dir_keeps_names_that_fit() -> None:
    assert default_dir("ns", "data", PV) == RelativeDir((f"ns-data-{PV}",))
    exactly = "c" * (MAX_NAME_BYTES - len("n--p"))
    assert default_dir("n", exactly, "p").leaf == f"n-{exactly}-p"


def test_default_dir_distinguishes_long_names_with_a_common_prefix() -> None:
    first = default_dir("ns", "c" * 300, "pvc-1")
    second = default_dir("ns", "c" * 300, "pvc-2")
    assert first != second


# Containment against symbolic links is no longer a path rule: every filesystem call goes
# through ``safefs``, which opens one component at a time with O_NOFOLLOW and refuses any
# symlink under the export, including one that stays inside it (tenants own their directories,
# symlinks included, so "inside" proves nothing). Those cases live in test_safefs.py
# (test_opened_refuses_a_symlink_in_any_component, ...) and test_storage.py
# (test_destructive_calls_refuse_a_symlinked_path). The tests of ``paths.locate`` that approved
# links staying inside the export were removed with that rule; nothing calls ``locate`` any more.


@pytest.mark.parametrize(
    ("rel", "taken", "expected"),
    [
        pytest.param("app", set(), "archived-app", id="free"),
        pytest.param("team-a/app", set(), "team-a/archived-app", id="same-parent"),
        pytest.param("app", {"archived-app"}, "archived-app-2", id="first-taken"),
        pytest.param(
            "ns/app", {"ns/archived-app", "ns/archived-app-2"}, "ns/archived-app-3", id="two-taken"
        ),
        pytest.param("ns/app", {"archived-app"}, "ns/archived-app", id="other-parent-irrelevant"),
    ],
)
def test_archive_name(rel: str, taken: set[str], expected: str) -> None:
    assert str(archive_name(parse_relative(rel), lambda c: str(c) in taken)) == expected


def test_archive_name_shortens_long_leaves_and_keeps_collisions_apart() -> None:
    rel = parse_relative("ns/" + "x" * MAX_NAME_BYTES)
    taken: set[str] = set()
    names = []
    for _ in range(3):
        candidate = archive_name(rel, lambda c: str(c) in taken)
        taken.add(str(candidate))
        names.append(candidate)
    assert len(set(names)) == 3
    for candidate in names:
        assert candidate.parent_parts == ("ns",)
        assert candidate.leaf.startswith("archived-x")
        assert len(candidate.leaf.encode()) <= MAX_NAME_BYTES
    assert archive_name(rel, lambda c: False) == names[0], "must be deterministic"
