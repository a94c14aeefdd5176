"""Host I/O the image build shares: progress lines, logged commands, mounts below a directory.

What: :func:`log` (``[images]`` lines on stderr), :func:`run_logged` (a command with its output
appended to a log file, its tail in the error), reading ``/proc/self/mountinfo`` for the mount
points below a directory (:func:`mounts_under`, deepest first), unmounting them, and
:func:`remove_tree`, an ``rm -rf`` that unmounts first so it never empties a bound ``/dev``.

Why apart: debootstrap (``controlplane.baseimage``) and the private dockerd
(``controlplane.dockerd``) both mount below the run's state directory and both log long
commands to files; this module is what they share, without importing each other.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run_logged(
    argv: Sequence[str],
    logfile: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``argv`` with output appended to ``logfile``; on failure, raise with its tail."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        code = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, check=False
        ).returncode
    if code != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {code}); {logfile}:\n{tail}")


def _unescape_mountinfo(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_text)


def mounts_under(mountinfo: str, root: Path) -> list[Path]:
    """Mount points at or below ``root`` in a ``/proc/self/mountinfo`` text, deepest first."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = Path(_unescape_mountinfo(fields[4]))
            if point == root or root in point.parents:
                points.append(point)
    return sorted(set(points), key=lambda p: len(p.parts), reverse=True)


def current_mounts_under(root: Path) -> list[Path]:
    return mounts_under(Path("/proc/self/mountinfo").read_text(), root.resolve())


def unmount_all_under(root: Path) -> None:
    """Unmount whatever is mounted below ``root`` (debootstrap's /proc, dockerd's netns...)."""
    for point in current_mounts_under(root):
        log(f"unmounting {point}")
        if subprocess.run(["umount", str(point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(point)], check=True)
    left = current_mounts_under(root)
    if left:
        raise RuntimeError(f"still mounted under {root}: {left}")


def remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses to descend into a mount (a bind of /dev must never be emptied)."""
    if not path.exists():
        return
    unmount_all_under(path)
    shutil.rmtree(path)
