"""The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), read from the files.

Containers (Kubernetes pods, SLURM jobs, ``docker run -m``) cap memory with a cgroup while ``/proc/meminfo`` still
shows the whole machine; a budget taken from ``MemAvailable`` alone gets the process OOM-killed. The limit that
binds is the tightest along the cgroup's ancestors, so every level up to the hierarchy's mount point is read.

Why by hand: neither torch nor the standard library reads cgroups, and ``psutil`` (not a dependency) reports the
machine's memory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SYSTEM_ROOT = Path("/")  # where ``/proc`` and ``/sys`` are read (tests point it at a fake tree)

# A v1 limit this large means "no limit" (the kernel reports PAGE_COUNTER_MAX pages, rounded: about 2**63).
_V1_UNLIMITED = 2**60


@dataclass(frozen=True)
class CgroupMemory:
    """The binding memory limit of a cgroup and what is in use under it.

    Attributes:
        limit: the limit in bytes (the tightest along the path to the hierarchy root).
        used: bytes charged to that cgroup that cannot simply be reclaimed (usage minus its file page cache on
            the active and inactive lists; locked pages stay counted).
        path: the directory of the cgroup whose limit binds.
        version: 1 or 2.
    """

    limit: int
    used: int
    path: Path
    version: int

    @property
    def room(self) -> int:
        """Bytes that can still be charged before the limit: ``limit - used`` (never negative)."""
        return max(0, self.limit - self.used)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _stat(path: Path, *keys: str) -> int:
    """Sum of ``keys`` in a ``memory.stat`` file (missing keys count 0)."""
    values: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in keys and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return sum(values.values())


def _memberships(root: Path) -> tuple[Optional[str], Optional[str]]:
    """This process's cgroup path in the v2 hierarchy and in the v1 ``memory`` hierarchy (``None`` when absent)."""
    v2 = v1 = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _mounts(root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """``(mount root, mount point)`` of every cgroup2 mount and of every v1 mount carrying ``memory``."""
    v2: list[tuple[str, Path]] = []
    v1: list[tuple[str, Path]] = []
    for line in (_read(root / "proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if not after:
            continue
        fstype, options = after[0], (after[2] if len(after) > 2 else "")
        mount = (fields[3], root / fields[4].lstrip("/"))
        if fstype == "cgroup2":
            v2.append(mount)
        elif fstype == "cgroup" and "memory" in options.split(","):
            v1.append(mount)
    return v2, v1


def _directory(cgroup: str, mounts: list[tuple[str, Path]]) -> Optional[tuple[Path, Path]]:
    """``(cgroup directory, mount point)`` for ``cgroup`` under the first mount whose root contains it."""
    for mount_root, point in mounts:
        if mount_root == "/" or cgroup == mount_root or cgroup.startswith(mount_root.rstrip("/") + "/"):
            relative = cgroup[len(mount_root) :] if mount_root != "/" else cgroup
            directory = point / relative.lstrip("/")
            if directory.is_dir():
                return directory, point
        # In a container with its own cgroup namespace the path reads "/" and the mount is the cgroup itself.
        if cgroup == "/" and point.is_dir():
            return point, point
    return None


def _levels(directory: Path, point: Path) -> list[Path]:
    """``directory`` and each parent up to and including the mount point."""
    levels = [directory]
    while directory != point and point in directory.parents:
        directory = directory.parent
        levels.append(directory)
    return levels


def _v2_level(directory: Path) -> Optional[CgroupMemory]:
    limit = _read(directory / "memory.max")
    if limit is None or limit == "max" or _int(limit) is None:
        return None
    usage = _int(_read(directory / "memory.current")) or 0
    cache = _stat(directory / "memory.stat", "active_file", "inactive_file")
    return CgroupMemory(int(limit), max(0, usage - cache), directory, 2)


def _v1_level(directory: Path) -> Optional[CgroupMemory]:
    limit = _int(_read(directory / "memory.limit_in_bytes"))
    if limit is None or limit >= _V1_UNLIMITED:
        return None
    usage = _int(_read(directory / "memory.usage_in_bytes")) or 0
    stat = directory / "memory.stat"
    cache = _stat(stat, "total_active_file", "total_inactive_file") or _stat(stat, "active_file", "inactive_file")
    return CgroupMemory(limit, max(0, usage - cache), directory, 1)


def cgroup_memory(root: Optional[Path] = None) -> Optional[CgroupMemory]:
    """The memory limit that binds this process, or ``None`` when no cgroup limits its memory.

    Reads ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` to find the process's cgroup directory in the v2
    hierarchy and the v1 ``memory`` hierarchy, then every level from it up to the mount point; the level with the
    least room (limit minus non-reclaimable use) binds. Unreadable files count as "no limit".

    Args:
        root: the filesystem root the files are read under (default :data:`SYSTEM_ROOT`).
    """
    root = SYSTEM_ROOT if root is None else root
    v2_path, v1_path = _memberships(root)
    v2_mounts, v1_mounts = _mounts(root)
    found: list[CgroupMemory] = []
    for cgroup, mounts, level in ((v2_path, v2_mounts, _v2_level), (v1_path, v1_mounts, _v1_level)):
        located = _directory(cgroup, mounts) if cgroup is not None else None
        if located is None:
            continue
        for directory in _levels(*located):
            limit = level(directory)
            if limit is not None:
                found.append(limit)
    return min(found, key=lambda memory: memory.room, default=None)
