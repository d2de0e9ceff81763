"""Crash-safe file writes: a temporary file in the same folder, fsync, then an atomic rename.

One helper for every file the library writes (checkpoint shards and indexes, offload-folder tensors and manifest,
prediction chunks), so a crash at any point leaves either the old file or the complete new one, never a torn one.
Temporary files are named ``.<name>.<pid>.tmp``; readers ignore (and clean-ups delete) that pattern. A temporary file
is created fresh (``O_EXCL | O_NOFOLLOW``), so a symbolic link planted under its name is never written through.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Optional

TMP_PATTERN = re.compile(r"^\..+\.\d+\.tmp$")


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_private(tmp: Path) -> None:
    """Create ``tmp`` as a new regular file, never through a symbolic link planted under its name (a link there is
    removed, not followed): ``write(tmp)`` then opens our own file, and nothing is created outside the folder."""
    try:
        os.unlink(tmp)  # a leftover or a planted link: unlink removes the name itself, never the link's target
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    os.close(os.open(tmp, flags, 0o644))


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    *,
    before_commit: Optional[Callable[[Path], None]] = None,
    commit: Callable[[Path, Path], None] = os.replace,
    sync_folder: bool = False,
) -> None:
    """Call ``write(tmp)``, fsync ``tmp``, then ``commit(tmp, path)`` (``os.replace``); the temp file never outlives
    a failure. ``before_commit`` and ``commit`` are seams where tests inject crashes."""
    tmp = tmp_path_for(path)
    try:
        _create_private(tmp)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit(tmp)
        commit(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder became unwritable: nothing more can be cleaned
            pass
    if sync_folder:
        fsync_dir(path.parent)
