"""Unit tests for provisioner.storage on a tmp_path export with the real LocalFilesystem.

Faults (EACCES, hangs) come from FaultInjectingFilesystem, because tests run as root and
cannot make a directory unwritable. Each test checks that nothing outside its target changed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from provisioner import storage as storage_module
from provisioner.paths import RelativeDir, UnsafePathError, parse_relative
from provisioner.storage import (
    DirOwner,
    FaultInjectingFilesystem,
    FaultRule,
    LocalFilesystem,
    Storage,
    StorageError,
    StorageTimeout,
    read_fault_rules,
    write_fault_rules,
)

_T = TypeVar("_T")
TIMEOUT = 0.2
ROOT_SQUASH_HINT = (
    "the export is not writable by the provisioner: check root_squash/all_squash on the NFS "
    "server and the ownership of the directory"
)


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its kind and file content, to prove nothing else moved."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = "file:" + path.read_text()
    return found


class RecordingFilesystem(LocalFilesystem):
    """LocalFilesystem that records chown calls instead of making them (no root needed)."""

    def __init__(self) -> None:
        self.chowns: list[tuple[Path, int, int]] = []

    def chown(self, path: Path, uid: int, gid: int) -> None:
        self.chowns.append((path, uid, gid))


class Observed:
    """A fake metrics sink for Storage's observe hook."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, op: str, seconds: float, outcome: str) -> None:
        assert seconds >= 0
        self.calls.append((op, outcome))


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    export.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious").write_text("keep me")
    return export


@pytest.fixture
def rules(tmp_path: Path) -> Iterator[Path]:
    rules_file = tmp_path / "faults.json"
    yield rules_file
    # Releases any call still hanging on a rule, so its worker thread can finish.
    write_fault_rules(rules_file, [])


@pytest.fixture
def observed() -> Observed:
    return Observed()


@pytest.fixture
def storage(mount: Path, rules: Path, observed: Observed) -> Iterator[Storage]:
    fs = FaultInjectingFilesystem(LocalFilesystem(), rules, poll=0.01)
    store = Storage(mount, fs, timeout=TIMEOUT, max_threads=4, observe=observed)
    yield store
    store.close()


@pytest.fixture
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_077")
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o777, id="default-0777"),
        pytest.param(0o750, id="restricted-0750"),
        pytest.param(0o2775, id="setgid-2775"),
    ],
)
def test_ensure_dir_sets_mode_regardless_of_umask(storage: Storage, mount: Path, mode: int) -> None:
    created = run(storage.ensure_dir(parse_relative("team-a/web/data"), DirOwner(mode=mode)))
    assert created is True
    assert mode_of(mount / "team-a" / "web" / "data") == mode
    # Parents are made like `mkdir -p`: 0o777 filtered by the umask.
    assert mode_of(mount / "team-a") == 0o700
    assert mode_of(mount / "team-a" / "web") == 0o700


def test_ensure_dir_reuses_an_existing_directory_and_its_data(
    storage: Storage, mount: Path
) -> None:
    rel = parse_relative("ns-data-pvc-1")
    assert run(storage.ensure_dir(rel, DirOwner())) is True
    (mount / "ns-data-pvc-1" / "db").write_text("rows")
    os.chmod(mount / "ns-data-pvc-1", 0o700)
    assert run(storage.ensure_dir(rel, DirOwner())) is False
    assert (mount / "ns-data-pvc-1" / "db").read_text() == "rows"
    assert mode_of(mount / "ns-data-pvc-1") == 0o777, "a reused leaf is chmod'ed too"


@pytest.mark.parametrize(
    ("owner", "expected"),
    [
        pytest.param(DirOwner(uid=1000, gid=2000), [(1000, 2000)], id="uid-and-gid"),
        pytest.param(DirOwner(uid=1000), [(1000, -1)], id="uid-only"),
        pytest.param(DirOwner(gid=2000), [(-1, 2000)], id="gid-only"),
        pytest.param(DirOwner(), [], id="neither"),
    ],
)
def test_ensure_dir_chowns_the_leaf_only_when_asked(
    mount: Path, owner: DirOwner, expected: list[tuple[int, int]]
) -> None:
    fs = RecordingFilesystem()
    store = Storage(mount, fs, timeout=TIMEOUT, max_threads=2)
    try:
        run(store.ensure_dir(parse_relative("ns/leaf"), owner))
    finally:
        store.close()
    assert fs.chowns == [(mount / "ns" / "leaf", uid, gid) for uid, gid in expected]


@pytest.mark.parametrize(
    ("file_at", "rel"),
    [
        pytest.param("leaf", "leaf", id="file-at-leaf"),
        pytest.param("parent", "parent/leaf", id="file-at-parent"),
    ],
)
def test_ensure_dir_refuses_a_file_in_the_way(
    storage: Storage, mount: Path, file_at: str, rel: str
) -> None:
    (mount / file_at).write_text("not a directory")
    before = snapshot(mount.parent)
    with pytest.raises(StorageError) as caught:
        run(storage.ensure_dir(parse_relative(rel), DirOwner()))
    assert caught.value.path == mount / file_at
    assert f'ensure_dir "{mount / file_at}" failed: it exists but is not a directory.' in str(
        caught.value
    )
    assert snapshot(mount.parent) == before


def test_missing_directories_are_not_an_error(storage: Storage, mount: Path) -> None:
    assert run(storage.remove_dir("gone")) is False
    assert run(storage.archive_dir("ns/gone")) is None
    run(storage.discard_created_dir(parse_relative("gone")))
    assert snapshot(mount) == {}


def test_remove_dir_removes_only_the_leaf(storage: Storage, mount: Path) -> None:
    (mount / "ns" / "app" / "deep").mkdir(parents=True)
    (mount / "ns" / "app" / "deep" / "f").write_text("x")
    (mount / "ns" / "sibling").mkdir()
    assert run(storage.remove_dir("ns/app")) is True
    assert snapshot(mount) == {"ns": "dir", "ns/sibling": "dir"}


def test_discard_created_dir_removes_the_leaf(storage: Storage, mount: Path) -> None:
    rel = parse_relative("ns/new")
    assert run(storage.ensure_dir(rel, DirOwner())) is True
    run(storage.discard_created_dir(rel))
    assert snapshot(mount) == {"ns": "dir"}


def test_archive_dir_renames_in_the_same_parent(storage: Storage, mount: Path) -> None:
    (mount / "ns" / "app").mkdir(parents=True)
    (mount / "ns" / "app" / "f").write_text("data")
    archived = run(storage.archive_dir(parse_relative("ns/app")))
    assert archived == RelativeDir(("ns", "archived-app"))
    assert snapshot(mount) == {
        "ns": "dir",
        "ns/archived-app": "dir",
        "ns/archived-app/f": "file:data",
    }


@pytest.mark.parametrize(
    "first_archive",
    [
        pytest.param("first", id="non-empty-archive"),
        # rename(2) would silently replace an empty target directory: it must not happen either.
        pytest.param(None, id="empty-archive"),
    ],
)
def test_archive_dir_never_overwrites_an_archive(
    storage: Storage, mount: Path, first_archive: str | None
) -> None:
    (mount / "archived-app").mkdir()
    if first_archive is not None:
        (mount / "archived-app" / "f").write_text(first_archive)
    (mount / "app").mkdir()
    (mount / "app" / "f").write_text("second")
    before = snapshot(mount)
    assert run(storage.archive_dir("app")) == RelativeDir(("archived-app-2",))
    after = snapshot(mount)
    assert {key: after[key] for key in after if key.startswith("archived-app/")} == {
        key: before[key] for key in before if key.startswith("archived-app/")
    }
    assert "app" not in after
    assert after["archived-app-2/f"] == "file:second"


class RacingFilesystem(LocalFilesystem):
    """Says "archived-app" is free once, as if another process created it just after."""

    def __init__(self) -> None:
        self.lied = False

    def exists(self, path: Path) -> bool:
        if path.name == "archived-app" and not self.lied:
            self.lied = True
            return False
        return super().exists(path)


def test_archive_dir_picks_the_next_name_when_it_loses_a_race(mount: Path) -> None:
    (mount / "archived-app").mkdir()
    (mount / "app").mkdir()
    fs = RacingFilesystem()
    store = Storage(mount, fs, timeout=TIMEOUT, max_threads=1)
    try:
        assert run(store.archive_dir("app")) == RelativeDir(("archived-app-2",))
    finally:
        store.close()
    assert fs.lied
    assert snapshot(mount) == {"archived-app": "dir", "archived-app-2": "dir"}


@pytest.mark.parametrize(
    "native", [pytest.param(True, id="renameat2"), pytest.param(False, id="check-then-rename")]
)
def test_local_rename_refuses_an_existing_empty_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    if not native:
        # What happens on NFS, whose client refuses RENAME_NOREPLACE.
        monkeypatch.setattr(storage_module, "_renameat2", None)
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        LocalFilesystem().rename(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "src").is_dir()
    LocalFilesystem().rename(tmp_path / "src", tmp_path / "free")
    assert (tmp_path / "free").is_dir()


@pytest.mark.parametrize(
    "rel",
    [
        pytest.param("..", id="dotdot"),
        pytest.param("a/../..", id="traversal"),
        pytest.param("", id="empty-is-the-root"),
        pytest.param(".", id="dot-is-the-root"),
        pytest.param("/etc", id="absolute"),
        pytest.param("escape", id="symlink-outside"),
        pytest.param("self", id="symlink-to-the-root"),
    ],
)
@pytest.mark.parametrize("operation", ["remove_dir", "archive_dir"])
def test_destructive_calls_refuse_unsafe_paths(
    storage: Storage, mount: Path, rel: str, operation: str
) -> None:
    (mount / "a").mkdir()
    (mount / "escape").symlink_to(mount.parent / "outside")
    (mount / "self").symlink_to(".")
    before = snapshot(mount.parent)
    act = storage.remove_dir if operation == "remove_dir" else storage.archive_dir
    with pytest.raises(UnsafePathError):
        run(act(rel))
    assert snapshot(mount.parent) == before


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        pytest.param("EACCES", ROOT_SQUASH_HINT, id="EACCES-root-squash"),
        pytest.param("EPERM", ROOT_SQUASH_HINT, id="EPERM-root-squash"),
        pytest.param("ENOSPC", "the export is full", id="ENOSPC"),
        pytest.param("EROFS", "the export is mounted read-only", id="EROFS"),
        pytest.param("ESTALE", "stale NFS file handle: remount the export", id="ESTALE"),
    ],
)
def test_filesystem_errors_become_storage_errors_with_a_hint(
    storage: Storage, mount: Path, rules: Path, code: str, hint: str
) -> None:
    (mount / "ns-app").mkdir()
    write_fault_rules(rules, [FaultRule(op="rmtree", match="ns-app", errno=code)])
    with pytest.raises(StorageError) as caught:
        run(storage.remove_dir("ns-app"))
    error = caught.value
    assert not isinstance(error, StorageTimeout)
    assert (error.op, error.path, error.hint) == ("remove_dir", mount / "ns-app", hint)
    assert f"({code})" in error.cause
    assert str(error).startswith(f'remove_dir "{mount / "ns-app"}" failed: ')
    assert str(error).endswith(f". {hint}")
    assert (mount / "ns-app").is_dir()


def test_an_etimedout_from_nfs_is_an_error_not_our_timeout(
    storage: Storage, rules: Path, observed: Observed
) -> None:
    # OSError(ETIMEDOUT) is Python's TimeoutError, the same class asyncio.wait_for raises.
    write_fault_rules(rules, [FaultRule(op="mkdir", match="slow", errno="ETIMEDOUT")])
    with pytest.raises(StorageError) as caught:
        run(storage.ensure_dir(parse_relative("slow"), DirOwner()))
    assert not isinstance(caught.value, StorageTimeout)
    assert "(ETIMEDOUT)" in caught.value.cause
    assert observed.calls == [("ensure_dir", "error")]


def test_a_hung_call_times_out_while_other_calls_go_on(
    storage: Storage, mount: Path, rules: Path, observed: Observed
) -> None:
    write_fault_rules(rules, [FaultRule(op="mkdir", match="stuck", effect="hang")])

    async def both() -> tuple[bool | BaseException, bool | BaseException]:
        return await asyncio.gather(
            storage.ensure_dir(parse_relative("stuck"), DirOwner()),
            storage.ensure_dir(parse_relative("fine"), DirOwner()),
            return_exceptions=True,
        )

    hung, fine = run(both())
    assert fine is True
    assert (mount / "fine").is_dir()
    assert isinstance(hung, StorageTimeout)
    assert str(hung) == (
        f'ensure_dir "{mount / "stuck"}" did not finish within {TIMEOUT:g} s; '
        "the NFS mount may be hung"
    )
    assert sorted(observed.calls) == [("ensure_dir", "ok"), ("ensure_dir", "timeout")]


def test_a_call_that_timed_out_in_the_queue_never_runs_late(mount: Path, rules: Path) -> None:
    # One thread, stuck: the second call waits in the queue, times out, and must not act later
    # (a directory appearing after its attempt was reported failed would confuse reconciling).
    write_fault_rules(rules, [FaultRule(op="mkdir", match="stuck", effect="hang")])
    fs = FaultInjectingFilesystem(LocalFilesystem(), rules, poll=0.01)
    store = Storage(mount, fs, timeout=TIMEOUT, max_threads=1)

    async def scenario() -> None:
        results = await asyncio.gather(
            store.ensure_dir(parse_relative("stuck"), DirOwner()),
            store.ensure_dir(parse_relative("queued"), DirOwner()),
            return_exceptions=True,
        )
        assert all(isinstance(result, StorageTimeout) for result in results)
        write_fault_rules(rules, [])
        # Runs after the stuck call and after the queued one would have, on the same thread.
        assert await store.ensure_dir(parse_relative("after"), DirOwner()) is True

    try:
        run(scenario())
    finally:
        store.close()
    assert snapshot(mount) == {"stuck": "dir", "after": "dir"}


def test_check_writable_passes_and_leaves_no_probe(storage: Storage, mount: Path) -> None:
    run(storage.check_writable())
    assert snapshot(mount) == {}


def test_check_writable_names_a_missing_mount(tmp_path: Path) -> None:
    store = Storage(tmp_path / "missing", LocalFilesystem(), timeout=TIMEOUT, max_threads=1)
    try:
        with pytest.raises(StorageError) as caught:
            run(store.check_writable())
    finally:
        store.close()
    assert str(caught.value).startswith(
        f'check_writable "{tmp_path / "missing"}" failed: the mount path does not exist. '
    )


def test_check_writable_refuses_a_file_as_mount(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    store = Storage(tmp_path / "file", LocalFilesystem(), timeout=TIMEOUT, max_threads=1)
    try:
        with pytest.raises(StorageError, match="the mount path is not a directory"):
            run(store.check_writable())
    finally:
        store.close()


def test_check_writable_explains_an_unwritable_export(
    storage: Storage, mount: Path, rules: Path
) -> None:
    write_fault_rules(rules, [FaultRule(op="write_probe", errno="EACCES")])
    with pytest.raises(StorageError) as caught:
        run(storage.check_writable())
    assert caught.value.path == mount
    assert caught.value.hint == ROOT_SQUASH_HINT


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param("{", "is not valid JSON", id="bad-json"),
        pytest.param('{"op": "mkdir"}', "must hold a JSON list", id="not-a-list"),
        pytest.param('[{"op": "mkdri"}]', 'op "mkdri" is not one of', id="unknown-op"),
        pytest.param('[{"op": "mkdir", "efect": "hang"}]', "unknown keys ['efect']", id="typo-key"),
        pytest.param('[{"op": "mkdir", "effect": "explode"}]', 'effect "explode"', id="bad-effect"),
        pytest.param('[{"op": "mkdir", "errno": "EWHAT"}]', 'errno "EWHAT"', id="bad-errno"),
        pytest.param('[{"op": 1}]', "must be an object of strings", id="not-strings"),
    ],
)
def test_fault_rules_file_errors_name_the_rule(tmp_path: Path, content: str, message: str) -> None:
    rules_file = tmp_path / "faults.json"
    rules_file.write_text(content)
    with pytest.raises(ValueError, match="fault rule") as caught:
        read_fault_rules(rules_file)
    assert message in str(caught.value)


def test_fault_rules_round_trip_and_missing_file_means_none(tmp_path: Path) -> None:
    rules_file = tmp_path / "faults.json"
    assert read_fault_rules(rules_file) == []
    rules = [FaultRule(op="rename", match="ns/", effect="hang"), FaultRule(op="chown")]
    write_fault_rules(rules_file, rules)
    assert read_fault_rules(rules_file) == rules


@pytest.mark.parametrize(
    ("rule", "path", "fails"),
    [
        pytest.param(FaultRule(op="mkdir", match="a"), "xay", True, id="substring-matches"),
        pytest.param(FaultRule(op="mkdir", match="b"), "xay", False, id="other-path"),
        pytest.param(FaultRule(op="chmod", match="a"), "xay", False, id="other-op"),
        pytest.param(FaultRule(op="mkdir"), "xay", True, id="empty-match-is-every-path"),
    ],
)
def test_fault_rules_match_op_and_path_substring(
    tmp_path: Path, rule: FaultRule, path: str, fails: bool
) -> None:
    rules_file = tmp_path / "faults.json"
    write_fault_rules(rules_file, [rule])
    fs = FaultInjectingFilesystem(LocalFilesystem(), rules_file)
    target = tmp_path / path
    if fails:
        with pytest.raises(OSError) as caught:
            fs.mkdir(target)
        assert caught.value.errno == errno.EIO
        assert not target.exists()
    else:
        fs.mkdir(target)
        assert target.is_dir()


def test_list_top_dirs_names_directories_only(storage: Storage, mount: Path) -> None:
    (mount / "ns-a" / "inner").mkdir(parents=True)
    (mount / "ns-b").mkdir()
    (mount / "file").write_text("x")
    (mount / "link").symlink_to("ns-a")
    assert sorted(run(storage.list_top_dirs())) == ["ns-a", "ns-b"]


def test_remove_empty_dir_never_removes_anything_with_content(
    storage: Storage, mount: Path
) -> None:
    (mount / "empty").mkdir()
    (mount / "full").mkdir()
    (mount / "full" / "data").write_text("kept")
    (mount / "nested" / "child").mkdir(parents=True)
    assert run(storage.remove_empty_dir(parse_relative("empty"))) is True
    assert run(storage.remove_empty_dir(parse_relative("full"))) is False
    assert run(storage.remove_empty_dir(parse_relative("nested"))) is False
    assert run(storage.remove_empty_dir(parse_relative("gone"))) is False
    assert snapshot(mount) == {
        "full": "dir",
        "full/data": "file:kept",
        "nested": "dir",
        "nested/child": "dir",
    }


def test_remove_empty_dir_refuses_a_symlink_to_the_root(storage: Storage, mount: Path) -> None:
    (mount / "self").symlink_to(".")
    before = snapshot(mount.parent)
    with pytest.raises(UnsafePathError):
        run(storage.remove_empty_dir(parse_relative("self")))
    assert snapshot(mount.parent) == before


def test_remove_empty_dir_failure_names_the_cause(
    storage: Storage, mount: Path, rules: Path
) -> None:
    (mount / "stuck").mkdir()
    write_fault_rules(rules, [FaultRule(op="rmdir", match="stuck", errno="EACCES")])
    with pytest.raises(StorageError) as caught:
        run(storage.remove_empty_dir(parse_relative("stuck")))
    assert caught.value.op == "remove_empty_dir"
    assert caught.value.hint == ROOT_SQUASH_HINT
    assert (mount / "stuck").is_dir()
