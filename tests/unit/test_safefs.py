"""Unit tests for provisioner.safefs: the descriptor walk that never follows a symbolic link.

Real directory trees in tmp_path with real symlinks (relative, absolute, dangling, looping, to
the export root, to a directory outside the export); ``LocalSyscalls`` underneath, wrapped by
tests/faults.py or a small fake where a fault or another filesystem is needed. Each refusal
also checks that nothing changed, inside the export or outside it. The random-tree properties
are in test_properties.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from provisioner import safefs
from provisioner.safefs import (
    MOUNT_POINT,
    NOT_A_DIRECTORY,
    SYMLINK,
    LocalSyscalls,
    Redirected,
    Tree,
)
from tests.faults import FaultInjectingSyscalls, FaultRule, write_fault_rules

MARKER = "outside the export: never touched"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    root = tmp_path / "export"
    root.mkdir()
    (tmp_path / "outside" / "dir").mkdir(parents=True)
    (tmp_path / "outside" / "marker").write_text(MARKER)
    return root


@pytest.fixture
def outside(export: Path) -> Path:
    return export.parent / "outside"


@pytest.fixture
def tree(export: Path) -> Iterator[Tree]:
    with Tree(export, LocalSyscalls()) as opened:
        yield opened


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root``, never following a link: kind, inode, mode, link target and
    content hash, so a test can prove that nothing moved, changed or disappeared."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                detail: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                detail = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                detail = None
            found[os.path.relpath(path, root)] = (info.st_ino, info.st_mode, detail)
    return found


LINK_KINDS = [
    "relative-sibling",
    "absolute-outside",
    "outside-file",
    "export-root",
    "parent",
    "dangling",
    "loop",
]


def plant_link(path: Path, kind: str, export: Path, outside: Path) -> None:
    """A symlink at ``path`` of the kind a workload might plant."""
    target = {
        "relative-sibling": "sibling",
        "absolute-outside": str(outside / "dir"),
        "outside-file": str(outside / "marker"),
        "export-root": str(export),
        "parent": "..",
        "dangling": "nowhere",
        "loop": path.name,
    }[kind]
    path.symlink_to(target)


def build(export: Path, parts: tuple[str, ...], link_at: int, kind: str, outside: Path) -> None:
    """Plain directories for ``parts``, except a symlink of ``kind`` at index ``link_at``; a
    sibling directory with a file gives the relative links something real to point at."""
    current = export
    for index, name in enumerate(parts):
        (current / "sibling").mkdir(exist_ok=True)
        (current / "sibling" / "file").write_text("sibling data")
        if index == link_at:
            plant_link(current / name, kind, export, outside)
            return
        (current / name).mkdir()
        current = current / name


POSITIONS = [
    pytest.param(0, id="first-component"),
    pytest.param(1, id="middle-component"),
    pytest.param(2, id="leaf"),
]


@pytest.mark.parametrize("kind", LINK_KINDS)
@pytest.mark.parametrize("link_at", POSITIONS)
def test_opened_refuses_a_symlink_in_any_component(
    tree: Tree, export: Path, outside: Path, kind: str, link_at: int
) -> None:
    parts = ("a", "b", "c")
    build(export, parts, link_at, kind, outside)
    before = snapshot(export.parent)
    with pytest.raises(Redirected) as caught, tree.opened(parts):
        pytest.fail("a symlink was followed")
    assert (caught.value.where, caught.value.what) == ("/".join(parts[: link_at + 1]), SYMLINK)
    assert snapshot(export.parent) == before


@pytest.mark.parametrize("kind", LINK_KINDS)
@pytest.mark.parametrize("link_at", POSITIONS)
def test_existing_depth_and_make_dirs_refuse_a_symlink_in_any_component(
    tree: Tree, export: Path, outside: Path, kind: str, link_at: int
) -> None:
    parts = ("a", "b", "c")
    build(export, parts, link_at, kind, outside)
    before = snapshot(export.parent)
    with pytest.raises(Redirected):
        tree.existing_depth(parts)
    with pytest.raises(Redirected):
        tree.make_dirs((*parts, "d"))
    assert snapshot(export.parent) == before


def test_redirected_names_the_component_and_says_what_to_do() -> None:
    error = Redirected('ns/a"b', SYMLINK)
    assert str(error) == (
        '"ns/a\\"b" on the export is a symbolic link; the provisioner never follows symbolic '
        "links or crosses into other filesystems under the export, so nothing was touched "
        "through it. It was probably written by a workload: an admin should inspect and remove it"
    )


def test_opened_walks_plain_directories_and_refuses_a_file(tree: Tree, export: Path) -> None:
    (export / "a" / "b").mkdir(parents=True)
    (export / "a" / "file").write_text("x")
    with tree.opened(("a", "b")) as fd:
        assert os.fstat(fd).st_ino == os.stat(export / "a" / "b").st_ino
    with tree.opened(()) as fd:
        assert os.fstat(fd).st_ino == os.stat(export).st_ino
    with pytest.raises(Redirected) as caught, tree.opened(("a", "file", "x")):
        pass
    assert (caught.value.where, caught.value.what) == ("a/file", NOT_A_DIRECTORY)
    with pytest.raises(FileNotFoundError), tree.opened(("a", "missing", "x")):
        pass


@pytest.mark.parametrize(
    ("made", "parts", "depth"),
    [
        pytest.param((), ("a", "b"), 0, id="nothing"),
        pytest.param(("a",), ("a", "b"), 1, id="parent-only"),
        pytest.param(("a", "a/b"), ("a", "b"), 2, id="all"),
        pytest.param(("a", "a/b", "a/b/c"), ("a", "b"), 2, id="deeper-than-asked"),
        pytest.param(("x",), ("a", "b"), 0, id="another-tree"),
    ],
)
def test_existing_depth(
    tree: Tree, export: Path, made: tuple[str, ...], parts: tuple[str, ...], depth: int
) -> None:
    for path in made:
        (export / path).mkdir()
    assert tree.existing_depth(parts) == depth


def test_entry_is_an_lstat_of_the_last_component(tree: Tree, export: Path, outside: Path) -> None:
    (export / "ns" / "dir").mkdir(parents=True)
    (export / "ns" / "link").symlink_to(outside / "dir")
    (export / "top-link").symlink_to("ns")
    dir_info = tree.entry(("ns", "dir"))
    link_info = tree.entry(("ns", "link"))
    assert dir_info is not None and stat.S_ISDIR(dir_info.st_mode)
    assert link_info is not None and stat.S_ISLNK(link_info.st_mode)
    assert tree.entry(("ns", "missing")) is None
    with pytest.raises(FileNotFoundError):
        tree.entry(("gone", "x"))
    with pytest.raises(Redirected):
        tree.entry(("top-link", "dir"))


@pytest.mark.usefixtures("umask_022")
def test_make_dirs_creates_what_is_missing_like_mkdir_p(tree: Tree, export: Path) -> None:
    (export / "a").mkdir(mode=0o700)
    fd, created = tree.make_dirs(("a", "b", "c"))
    try:
        assert os.fstat(fd).st_ino == os.stat(export / "a" / "b" / "c").st_ino
    finally:
        os.close(fd)
    assert created == [2, 3]
    assert stat.S_IMODE(os.stat(export / "a").st_mode) == 0o700, "an existing parent is kept"
    assert stat.S_IMODE(os.stat(export / "a" / "b").st_mode) == 0o755
    fd, created = tree.make_dirs(("a", "b", "c"))
    os.close(fd)
    assert created == []


def test_make_dirs_refuses_a_file_in_the_way(tree: Tree, export: Path) -> None:
    (export / "a").write_text("a file")
    before = snapshot(export.parent)
    with pytest.raises(Redirected) as caught:
        tree.make_dirs(("a", "b"))
    assert (caught.value.where, caught.value.what) == ("a", NOT_A_DIRECTORY)
    assert snapshot(export.parent) == before


def volume_with_everything(export: Path, outside: Path) -> Path:
    """A tenant's volume holding data, nested directories and every kind of symlink."""
    volume = export / "ns" / "vol"
    (volume / "deep" / "deeper").mkdir(parents=True)
    (volume / "data").write_text("tenant data")
    (volume / "deep" / "deeper" / "more").write_text("more")
    (volume / "to-outside-dir").symlink_to(outside / "dir")
    (volume / "deep" / "to-outside-file").symlink_to(outside / "marker")
    (volume / "to-root").symlink_to(export)
    (volume / "deep" / "up").symlink_to("../..")
    (volume / "dangling").symlink_to("nowhere")
    (volume / "loop").symlink_to("loop")
    (volume / "to-sibling").symlink_to("../sibling")
    (volume / "empty").mkdir()
    (export / "ns" / "sibling").mkdir()
    (export / "ns" / "sibling" / "kept").write_text("sibling data")
    return volume


def without(entries: dict[str, tuple[object, ...]], prefix: str) -> dict[str, tuple[object, ...]]:
    return {
        key: value
        for key, value in entries.items()
        if key != prefix and not key.startswith(prefix + "/")
    }


def test_remove_tree_unlinks_symlinks_and_never_follows_them(
    tree: Tree, export: Path, outside: Path
) -> None:
    volume_with_everything(export, outside)
    before = snapshot(export.parent)
    assert tree.remove_tree(("ns", "vol")) is True
    assert snapshot(export.parent) == without(before, "export/ns/vol")
    assert (outside / "marker").read_text() == MARKER


def test_remove_tree_of_a_missing_directory(tree: Tree, export: Path) -> None:
    (export / "ns").mkdir()
    assert tree.remove_tree(("ns", "gone")) is False
    with pytest.raises(FileNotFoundError):
        tree.remove_tree(("gone", "x"))


@pytest.mark.parametrize("kind", LINK_KINDS)
@pytest.mark.parametrize("link_at", [pytest.param(0, id="parent"), pytest.param(1, id="leaf")])
def test_remove_tree_refuses_a_symlinked_path(
    tree: Tree, export: Path, outside: Path, kind: str, link_at: int
) -> None:
    build(export, ("ns", "vol"), link_at, kind, outside)
    before = snapshot(export.parent)
    with pytest.raises(Redirected):
        tree.remove_tree(("ns", "vol"))
    assert snapshot(export.parent) == before


def test_remove_tree_handles_nesting_deeper_than_the_recursion_limit(
    tree: Tree, export: Path
) -> None:
    # Built through descriptors: the full path is far longer than PATH_MAX.
    fd = os.open(export, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("vol", dir_fd=fd)
    for level in range(1200):
        child = os.open("vol" if level == 0 else "d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        os.mkdir("d", dir_fd=fd)
    os.close(fd)
    assert tree.remove_tree(("vol",)) is True
    assert os.listdir(export) == []


class OtherDevice(LocalSyscalls):
    """Reports entries named ``name`` as being on another filesystem, like a mount point."""

    def __init__(self, name: str) -> None:
        self.name = name

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        info = super().stat(parent, name, where)
        if name != self.name:
            return info
        values = list(info)
        values[stat.ST_DEV] += 1
        return os.stat_result(values)


def test_remove_tree_stops_at_a_mount_point_inside(export: Path) -> None:
    (export / "vol" / "mounted").mkdir(parents=True)
    (export / "vol" / "mounted" / "foreign").write_text("another filesystem's data")
    with Tree(export, OtherDevice("mounted")) as tree, pytest.raises(Redirected) as caught:
        tree.remove_tree(("vol",))
    assert (caught.value.where, caught.value.what) == ("vol/mounted", MOUNT_POINT)
    assert (export / "vol" / "mounted" / "foreign").read_text() == "another filesystem's data"


@pytest.fixture
def mounted(export: Path) -> Iterator[Path]:
    """A real tmpfs mounted at ``vol/mnt`` inside the export, holding a file (root only)."""
    point = export / "vol" / "mnt"
    point.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        (point / "foreign").write_text("another filesystem's data")
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_real_mount_point_is_never_entered(tree: Tree, export: Path, mounted: Path) -> None:
    with pytest.raises(Redirected) as caught, tree.opened(("vol", "mnt")):
        pytest.fail("walked into another filesystem")
    assert (caught.value.where, caught.value.what) == ("vol/mnt", MOUNT_POINT)
    with pytest.raises(Redirected) as caught:
        tree.remove_tree(("vol",))
    assert (caught.value.where, caught.value.what) == ("vol/mnt", MOUNT_POINT)
    with pytest.raises(Redirected):
        tree.remove_tree(("vol", "mnt"))
    assert (mounted / "foreign").read_text() == "another filesystem's data"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(FaultRule(op="listdir", match="vol/sub"), id="listdir-of-a-subdirectory"),
        pytest.param(FaultRule(op="listdir", match="vol"), id="listdir-of-the-top"),
        pytest.param(FaultRule(op="unlink", match="vol/sub/f"), id="unlink"),
        pytest.param(FaultRule(op="rmdir", match="vol/sub"), id="rmdir"),
        pytest.param(FaultRule(op="stat", match="vol/sub/f"), id="stat"),
        pytest.param(FaultRule(op="open", match="vol/sub/deeper"), id="open"),
    ],
)
def test_remove_tree_closes_every_descriptor_when_a_call_fails(
    export: Path, tmp_path: Path, rule: FaultRule
) -> None:
    """A failing NFS server makes remove_dir fail on every retry: each attempt must give its
    descriptors back, or the process runs out of them (EMFILE) and every claim fails."""
    (export / "vol" / "sub" / "deeper").mkdir(parents=True)
    (export / "vol" / "sub" / "f").write_text("x")
    rules = tmp_path / "faults.json"
    write_fault_rules(rules, [rule])
    with Tree(export, FaultInjectingSyscalls(rules)) as tree:
        before = open_descriptors()
        with pytest.raises(OSError, match="Input/output error"):
            tree.remove_tree(("vol",))
        assert open_descriptors() == before


@pytest.fixture
def fast_export(tmp_path: Path) -> Iterator[Path]:
    """An export on tmpfs where there is one (/dev/shm), else in tmp_path: a disk can take
    seconds for the ten thousand mkdirs of a deep tree, tmpfs a fraction of one."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    base = Path(tempfile.mkdtemp(dir=shm, prefix="test-safefs-"))
    try:
        yield base
    finally:
        # What a failed test leaves is too deep for shutil.rmtree's recursion.
        subprocess.run(["rm", "-rf", "--", str(base)], check=True)


def nest(export: Path, depth: int) -> None:
    """``vol/d/d/.../d``, ``depth`` levels below ``vol``, with a file at every level. Made
    through descriptors: the full path is far longer than PATH_MAX."""
    fd = os.open(export, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir("vol", dir_fd=fd)
        for level in range(depth):
            name = "vol" if level == 0 else "d"
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


def test_remove_tree_removes_a_tree_10000_deep(fast_export: Path) -> None:
    nest(fast_export, 10_000)
    with Tree(fast_export, LocalSyscalls()) as tree:
        before = open_descriptors()
        assert tree.remove_tree(("vol",)) is True
        assert open_descriptors() == before
    assert os.listdir(fast_export) == []


def test_remove_tree_removes_a_deep_tree_under_a_low_descriptor_limit(
    fast_export: Path,
) -> None:
    """A tree deeper than the descriptor limit must not fail every retry with EMFILE."""
    nest(fast_export, 1500)
    with Tree(fast_export, LocalSyscalls()) as tree:
        before = open_descriptors()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            removed = tree.remove_tree(("vol",))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_descriptors() == before
    assert removed is True
    assert os.listdir(fast_export) == []


Hook = Callable[[str, str], None]
"""Called as ``hook(op, where)`` just before a call."""


class Tenant(LocalSyscalls):
    """``LocalSyscalls`` that runs ``hook`` just before each call of a walk, playing a tenant
    who changes its volume between the walk's listdir and its next calls. Names are listed
    sorted, so that a walk (which takes the last listed name first) is the same on every run."""

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    def open(self, parent: int, name: str, flags: int, where: str) -> int:
        self.hook("open", where)
        return super().open(parent, name, flags, where)

    def stat(self, parent: int, name: str, where: str) -> os.stat_result:
        self.hook("stat", where)
        return super().stat(parent, name, where)

    def unlink(self, parent: int, name: str, where: str) -> None:
        self.hook("unlink", where)
        super().unlink(parent, name, where)

    def rmdir(self, parent: int, name: str, where: str) -> None:
        self.hook("rmdir", where)
        super().rmdir(parent, name, where)

    def listdir(self, fd: int, where: str) -> list[str]:
        self.hook("listdir", where)
        return sorted(super().listdir(fd, where))


Act = Callable[[Path], None]
"""A change the tenant makes, given the path of its volume."""


class Change:
    """A ``Hook`` making the change ``act`` just before the calls ``op`` on ``where``: the
    first ``times`` of them, or all of them if None."""

    def __init__(
        self,
        volume: Path,
        op: str,
        where: str,
        act: Act,
        times: int | None = 1,
    ) -> None:
        self.volume = volume
        self.op = op
        self.where = where
        self.act = act
        self.times = times
        self.fired = 0

    def __call__(self, op: str, where: str) -> None:
        if (op, where) != (self.op, self.where):
            return
        if self.times is None or self.fired < self.times:
            self.fired += 1
            self.act(self.volume)


def unlinking(path: str) -> Act:
    return lambda volume: (volume / path).unlink()


def removing(path: str) -> Act:
    return lambda volume: shutil.rmtree(volume / path)


def renaming(src: str, dst: str) -> Act:
    return lambda volume: os.rename(volume / src, volume / dst)


def writing(path: str) -> Act:
    def act(volume: Path) -> None:
        (volume / path).parent.mkdir(parents=True, exist_ok=True)
        (volume / path).write_text("written by the tenant during the delete")

    return act


def replacing_by_directory(path: str) -> Act:
    def act(volume: Path) -> None:
        (volume / path).unlink()
        writing(f"{path}/inner")(volume)

    return act


def replacing_by_file(path: str) -> Act:
    def act(volume: Path) -> None:
        shutil.rmtree(volume / path)
        (volume / path).write_text("a file now")

    return act


def replacing_by_link(path: str, target: Path) -> Act:
    def act(volume: Path) -> None:
        shutil.rmtree(volume / path)
        (volume / path).symlink_to(target)

    return act


def tenant_volume(export: Path) -> Path:
    """``ns/vol`` with files and nested directories, beside a sibling that must be kept."""
    volume = export / "ns" / "vol"
    (volume / "sub" / "deeper").mkdir(parents=True)
    for path in ("f", "sub/f", "sub/g", "sub/deeper/h"):
        (volume / path).write_text("tenant data")
    (export / "ns" / "sibling").mkdir()
    (export / "ns" / "sibling" / "kept").write_text("sibling data")
    return volume


def remove_while_the_tenant_changes(export: Path, change: Change) -> None:
    """remove_tree of ``ns/vol`` finds the volume gone, with the change made once, and
    nothing else changed (or a descriptor left open)."""
    before = snapshot(export.parent)
    descriptors = open_descriptors()
    with Tree(export, Tenant(change)) as tree:
        assert tree.remove_tree(("ns", "vol")) is True
    assert change.fired == 1, "the tenant's change was made"
    assert not os.path.lexists(export / "ns" / "vol")
    assert snapshot(export.parent) == without(before, "export/ns/vol")
    assert open_descriptors() == descriptors


@pytest.mark.parametrize(
    ("op", "where", "act"),
    [
        pytest.param("stat", "ns/vol/sub/f", unlinking("sub/f"), id="unlinked-before-stat"),
        pytest.param("unlink", "ns/vol/sub/f", unlinking("sub/f"), id="unlinked-before-unlink"),
        pytest.param("stat", "ns/vol/sub/f", renaming("sub/f", "sub/a"), id="renamed-in-place"),
        pytest.param("unlink", "ns/vol/sub/f", renaming("sub/f", "g2"), id="renamed-to-the-top"),
        pytest.param("open", "ns/vol/sub/deeper", removing("sub/deeper"), id="removed-before-open"),
        pytest.param(
            "open", "ns/vol/sub/deeper", renaming("sub/deeper", "sub/e"), id="renamed-before-open"
        ),
        pytest.param(
            "listdir", "ns/vol/sub/deeper", removing("sub/deeper"), id="removed-before-listdir"
        ),
        pytest.param(
            "rmdir", "ns/vol/sub/deeper", removing("sub/deeper"), id="removed-before-rmdir"
        ),
        pytest.param("rmdir", "ns/vol", removing(""), id="top-removed-before-its-rmdir"),
    ],
)
def test_remove_tree_skips_what_the_tenant_removes_or_renames(
    export: Path, op: str, where: str, act: Act
) -> None:
    """An entry gone between the listdir and the next call is not "the volume is missing"."""
    volume = tenant_volume(export)
    remove_while_the_tenant_changes(export, Change(volume, op, where, act))


@pytest.mark.parametrize(
    ("where", "act"),
    [
        pytest.param("ns/vol/sub/deeper", writing("sub/deeper/new"), id="file-in-the-deepest"),
        pytest.param("ns/vol/sub", writing("sub/new/dir/file"), id="nested-dirs-in-a-subdir"),
        pytest.param("ns/vol", writing("new"), id="file-in-the-top"),
    ],
)
def test_remove_tree_lists_again_what_the_tenant_fills_before_its_rmdir(
    export: Path, where: str, act: Act
) -> None:
    volume = tenant_volume(export)
    remove_while_the_tenant_changes(export, Change(volume, "rmdir", where, act))


@pytest.mark.parametrize(
    ("op", "where", "act"),
    [
        pytest.param("unlink", "ns/vol/f", replacing_by_directory("f"), id="file-by-directory"),
        pytest.param(
            "open", "ns/vol/sub/deeper", replacing_by_file("sub/deeper"), id="dir-by-file"
        ),
        pytest.param(
            "rmdir", "ns/vol/sub/deeper", replacing_by_file("sub/deeper"), id="emptied-by-file"
        ),
    ],
)
def test_remove_tree_handles_again_what_the_tenant_replaces(
    export: Path, op: str, where: str, act: Act
) -> None:
    volume = tenant_volume(export)
    remove_while_the_tenant_changes(export, Change(volume, op, where, act))


@pytest.mark.parametrize("target", ["dir", "marker"])
def test_remove_tree_unlinks_a_symlink_put_in_place_of_a_directory(
    export: Path, outside: Path, target: str
) -> None:
    """Replaced between its lstat and its open: the open refuses it (O_NOFOLLOW), the walk
    looks at it again and unlinks the symlink; what it points to is untouched."""
    volume = tenant_volume(export)
    act = replacing_by_link("sub/deeper", outside / target)
    remove_while_the_tenant_changes(export, Change(volume, "open", "ns/vol/sub/deeper", act))
    assert (outside / "marker").read_text() == MARKER


@pytest.mark.parametrize(
    "destination",
    [
        pytest.param("other/moved", id="to-another-volume"),
        pytest.param("vol/moved", id="within-the-volume"),
    ],
)
def test_remove_tree_starts_again_when_the_directory_it_is_in_is_moved(
    export: Path, destination: str
) -> None:
    """The walk goes back up through "..": moved, the directory it is in has another "..".

    The tenant moves ``vol/a/sub`` while the walk is in it (just before the rmdir of the
    emptied ``sub/deep``). ``vol/a`` holds files a1-a3, still pending there when the walk
    goes back up from ``sub`` (names are taken from the end of the sorted listing), and so
    does the tenant's other volume ``other``: going up into it and carrying on would remove
    those.
    """
    ns = export / "ns"
    (ns / "vol" / "a" / "sub" / "deep").mkdir(parents=True)
    (ns / "vol" / "a" / "sub" / "deep" / "file").write_text("tenant data")
    (ns / "other").mkdir()
    for name in ("a1", "a2", "a3"):
        (ns / "vol" / "a" / name).write_text("tenant data")
        (ns / "other" / name).write_text("another volume's data")
    before = snapshot(export.parent)
    change = Change(ns, "rmdir", "ns/vol/a/sub/deep", renaming("vol/a/sub", destination))
    with Tree(export, Tenant(change)) as tree:
        assert tree.remove_tree(("ns", "vol")) is True
    assert change.fired == 1
    assert not os.path.lexists(ns / "vol")
    after = snapshot(export.parent)
    if destination == "other/moved":
        assert os.listdir(ns / "other" / "moved") == [], "it was emptied while in the volume"
        del after["export/ns/other/moved"]
    assert after == without(before, "export/ns/vol")


def refilling_the_subdirectory(volume: Path) -> None:
    (volume / "sub" / secrets.token_hex(4)).write_text("more")


def refilling_the_top(volume: Path) -> None:
    (volume / secrets.token_hex(4)).write_text("more")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("where", "act"),
    [
        pytest.param("ns/vol/sub", refilling_the_subdirectory, id="a-subdirectory"),
        pytest.param("ns/vol", refilling_the_top, id="the-top"),
    ],
)
def test_remove_tree_gives_up_on_a_tenant_that_never_stops(
    export: Path, monkeypatch: pytest.MonkeyPatch, where: str, act: Act
) -> None:
    """A file added before every rmdir: the walk follows a bounded number of changes, then
    fails with EAGAIN (the delete is retried later) instead of looping forever."""
    monkeypatch.setattr(safefs, "_CHANGES_ALLOWED", 25)
    volume = tenant_volume(export)
    change = Change(volume, "rmdir", where, act, times=None)
    descriptors = open_descriptors()
    with Tree(export, Tenant(change)) as tree, pytest.raises(OSError) as caught:
        tree.remove_tree(("ns", "vol"))
    assert caught.value.errno == errno.EAGAIN
    assert caught.value.strerror == (
        "the volume kept changing while it was deleted; the delete is retried"
    )
    assert caught.value.filename == "ns/vol"
    assert change.fired == 26, "25 changes followed, the 26th given up on"
    assert (export / "ns" / "sibling" / "kept").read_text() == "sibling data"
    assert open_descriptors() == descriptors


def test_remove_tree_holds_a_constant_number_of_descriptors(export: Path) -> None:
    """Whatever the depth: the parent and the top, the current directory and the next one."""
    nest(export, 60)
    counts: list[int] = []
    with Tree(export, Tenant(lambda *_: counts.append(open_descriptors()))) as tree:
        before = open_descriptors()
        assert tree.remove_tree(("vol",)) is True
    assert counts
    assert max(counts) - before <= 4


@pytest.mark.parametrize(
    ("made", "removed"),
    [
        pytest.param({"vol": None}, True, id="empty"),
        pytest.param({"vol": None, "vol/f": "data"}, False, id="holds-a-file"),
        pytest.param({"vol": None, "vol/sub": None}, False, id="holds-a-directory"),
        pytest.param({"other": None}, False, id="missing"),
    ],
)
def test_remove_empty_never_removes_anything_with_content(
    tree: Tree, export: Path, made: dict[str, str | None], removed: bool
) -> None:
    for path, content in made.items():
        if content is None:
            (export / path).mkdir()
        else:
            (export / path).write_text(content)
    before = snapshot(export)
    assert tree.remove_empty(("vol",)) is removed
    assert snapshot(export) == (without(before, "vol") if removed else before)


@pytest.mark.parametrize("kind", LINK_KINDS)
def test_remove_empty_refuses_a_symlink(tree: Tree, export: Path, outside: Path, kind: str) -> None:
    (export / "sibling").mkdir()
    plant_link(export / "vol", kind, export, outside)
    before = snapshot(export.parent)
    with pytest.raises(Redirected) as caught:
        tree.remove_empty(("vol",))
    assert caught.value.what == SYMLINK
    assert snapshot(export.parent) == before


RENAMES = [
    pytest.param(True, id="renameat2"),
    # What happens on NFS, whose client refuses RENAME_NOREPLACE: check, then rename.
    pytest.param(False, id="check-then-rename"),
]


@pytest.fixture(params=RENAMES)
def rename_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    native = bool(request.param)
    if not native:
        monkeypatch.setattr(safefs, "_renameat2", None)
    return native


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("empty-dir", id="empty-directory"),
        pytest.param("full-dir", id="directory-with-data"),
        pytest.param("file", id="file"),
        pytest.param("link", id="symlink"),
    ],
)
def test_rename_dir_never_replaces_what_is_at_the_target(
    tree: Tree, export: Path, rename_kind: bool, target: str
) -> None:
    (export / "ns" / "app").mkdir(parents=True)
    (export / "ns" / "app" / "f").write_text("app data")
    made = export / "ns" / "archived-app"
    if target == "empty-dir":
        made.mkdir()
    elif target == "full-dir":
        made.mkdir()
        (made / "f").write_text("first archive")
    elif target == "file":
        made.write_text("a file")
    else:
        made.symlink_to("app")
    before = snapshot(export)
    with pytest.raises(FileExistsError):
        tree.rename_dir(("ns",), "app", "archived-app")
    assert snapshot(export) == before


def test_rename_dir_renames_within_the_parent(tree: Tree, export: Path, rename_kind: bool) -> None:
    (export / "ns" / "app").mkdir(parents=True)
    (export / "ns" / "app" / "f").write_text("app data")
    inode = os.stat(export / "ns" / "app").st_ino
    assert tree.rename_dir(("ns",), "app", "archived-app") is True
    assert os.stat(export / "ns" / "archived-app").st_ino == inode
    assert (export / "ns" / "archived-app" / "f").read_text() == "app data"
    assert not (export / "ns" / "app").exists()
    assert tree.rename_dir(("ns",), "app", "archived-app-2") is False, "missing source"


@pytest.mark.parametrize(
    ("make", "what"),
    [
        pytest.param("link", SYMLINK, id="symlink"),
        pytest.param("file", NOT_A_DIRECTORY, id="file"),
    ],
)
def test_rename_dir_refuses_a_source_that_is_no_directory(
    tree: Tree, export: Path, outside: Path, make: str, what: str
) -> None:
    if make == "link":
        (export / "app").symlink_to(outside / "dir")
    else:
        (export / "app").write_text("a file")
    before = snapshot(export.parent)
    with pytest.raises(Redirected) as caught:
        tree.rename_dir((), "app", "archived-app")
    assert (caught.value.where, caught.value.what) == ("app", what)
    assert snapshot(export.parent) == before


def test_rename_dir_refuses_a_symlinked_parent(tree: Tree, export: Path, outside: Path) -> None:
    (outside / "dir" / "app").mkdir()
    (export / "ns").symlink_to(outside / "dir")
    before = snapshot(export.parent)
    with pytest.raises(Redirected):
        tree.rename_dir(("ns",), "app", "archived-app")
    assert snapshot(export.parent) == before


def test_list_dirs_names_plain_directories_only(tree: Tree, export: Path) -> None:
    (export / "b").mkdir()
    (export / "a" / "inner").mkdir(parents=True)
    (export / "file").write_text("x")
    (export / "link").symlink_to("a")
    (export / "dangling").symlink_to("nowhere")
    assert tree.list_dirs() == ["a", "b"]
    assert tree.list_dirs(("a",)) == ["inner"]
    with pytest.raises(Redirected):
        tree.list_dirs(("link",))


def test_files_round_trip_atomically(tree: Tree, export: Path) -> None:
    (export / "records").mkdir()
    tree.write_file(("records",), "r.json", b"first")
    tree.write_file(("records",), "r.json", b"second")
    assert tree.read_file(("records",), "r.json") == b"second"
    assert os.listdir(export / "records") == ["r.json"], "no temporary file is left"
    (export / "records" / "sub").mkdir()
    assert tree.list_files(("records",)) == ["r.json"]
    assert tree.remove_file(("records",), "r.json") is True
    assert tree.remove_file(("records",), "r.json") is False
    assert tree.read_file(("records",), "r.json") is None
    assert tree.read_file(("missing",), "r.json") is None
    assert tree.remove_file(("missing",), "r.json") is False
    assert tree.list_files(("missing",)) == []


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(FaultRule(op="write", match="r.json"), id="write"),
        pytest.param(FaultRule(op="fsync", match="r.json"), id="fsync"),
        pytest.param(FaultRule(op="rename", match="r.json"), id="rename"),
    ],
)
def test_a_failed_write_keeps_the_old_record_and_no_temporary_file(
    export: Path, tmp_path: Path, rule: FaultRule
) -> None:
    (export / "records").mkdir()
    (export / "records" / "r.json").write_bytes(b"old")
    rules = tmp_path / "faults.json"
    write_fault_rules(rules, [rule])
    with Tree(export, FaultInjectingSyscalls(rules)) as tree:
        with pytest.raises(OSError) as caught:
            tree.write_file(("records",), "r.json", b"new")
        assert caught.value.errno == errno.EIO
    assert os.listdir(export / "records") == ["r.json"]
    assert (export / "records" / "r.json").read_bytes() == b"old"


def test_read_file_refuses_what_is_not_a_regular_file(
    tree: Tree, export: Path, outside: Path
) -> None:
    (export / "records" / "dir").mkdir(parents=True)
    (export / "records" / "link").symlink_to(outside / "marker")
    (export / "records-link").symlink_to(outside)
    with pytest.raises(Redirected) as caught:
        tree.read_file(("records",), "link")
    assert (caught.value.where, caught.value.what) == ("records/link", SYMLINK)
    with pytest.raises(Redirected) as caught:
        tree.read_file(("records",), "dir")
    assert caught.value.what == "not a regular file"
    with pytest.raises(Redirected):
        tree.read_file(("records-link",), "marker")


def test_read_file_refuses_a_huge_record(tree: Tree, export: Path) -> None:
    (export / "big").write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(OSError) as caught:
        tree.read_file((), "big")
    assert caught.value.errno == errno.EFBIG


def test_probe_leaves_nothing_behind(tree: Tree, export: Path) -> None:
    tree.probe(".probe")
    assert os.listdir(export) == []
    (export / ".exists").write_text("")
    with pytest.raises(FileExistsError):
        tree.probe(".exists")


def test_tree_closes_its_root_descriptor(export: Path) -> None:
    before = open_descriptors()
    with Tree(export, LocalSyscalls()) as tree:
        assert open_descriptors() == before + 1
        tree.close()  # closing twice is harmless
    assert open_descriptors() == before
