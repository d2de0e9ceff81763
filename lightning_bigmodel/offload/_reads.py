"""The streaming engine's file reads (see :mod:`~lightning_bigmodel.offload.stream`): runs of adjacent tensors read
with ``preadv``, or with ``O_DIRECT`` around the page cache, and the checks that make every fault an error.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.offload._anonymous import huge_page_buffer
from lightning_bigmodel.offload.pages import Tracked

ALIGN = 64  # offset of every view inside a buffer: as aligned as a fresh allocation (same kernels, same results)
DIRECT = 4096  # O_DIRECT: file offsets, lengths and memory aligned to the largest logical block size in use
_IOV_MAX = 1024  # the kernel's limit on buffers per preadv call
FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
FADV_RANDOM = getattr(os, "POSIX_FADV_RANDOM", None)
O_DIRECT = getattr(os, "O_DIRECT", 0)


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised ``uint8`` CPU tensor of ``nbytes`` starting at a :data:`DIRECT`-aligned address (what an
    ``O_DIRECT`` read into it needs; a plain allocation is only 64-byte aligned). From 2 MiB on, in memory advised for
    huge pages (see :mod:`~lightning_bigmodel.offload._anonymous`: a read into it is a few large device requests)."""
    huge = huge_page_buffer(nbytes)
    if huge is not None:
        return huge
    raw = torch.empty(nbytes + DIRECT, dtype=torch.uint8)
    shift = -raw.data_ptr() % DIRECT
    return raw[shift : shift + nbytes]


@dataclass(frozen=True)
class Piece:
    name: str  # the tensor's name, for messages
    pos: int  # byte offset in the buffer
    nbytes: int
    offset: int  # byte offset in the file


@dataclass
class Run:
    """Pieces that follow each other in one file: read with one ``preadv``."""

    tracked: Tracked
    pieces: list[Piece] = field(default_factory=list)
    start: int = 0  # where in the buffer an O_DIRECT read of the run's aligned blocks lands (DIRECT-aligned)

    @property
    def offset(self) -> int:
        return self.pieces[0].offset

    @property
    def end(self) -> int:
        return self.pieces[-1].offset + self.pieces[-1].nbytes


def check_unchanged(tracked: Tracked, names: Sequence[str] = ()) -> None:
    """Raise :class:`CheckpointError` when the file behind ``tracked`` changed since it was mapped: its size, mtime,
    or ctime (a ctime change alone is ignored once the file has no name left: that is the rename or delete of a path,
    which leaves the open file as it was)."""
    stat = os.fstat(tracked.fd)
    size, mtime, ctime = tracked.stamp
    changed = []
    if stat.st_size != size:
        changed.append(f"{size} bytes when loaded, {stat.st_size} now")
    if stat.st_mtime_ns != mtime:
        changed.append("its modification time changed")
    elif stat.st_ctime_ns != ctime and stat.st_nlink > 0:
        changed.append("its status-change time changed")
    if changed:
        raise CheckpointError(
            f"Checkpoint file {tracked.path!r} changed while the model uses it ({'; '.join(changed)})"
            + (f", reading {_names(names)}" if names else "")
            + ". It was rewritten or truncated in place. Load the model again once the file is final; to update "
            "weights under running jobs, write a new file and rename it over the old one (jobs keep the old file)."
        )


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:4])
    return f"tensor {shown}" if len(names) == 1 else f"tensors {shown}" + (" ..." if len(names) > 4 else "")


def _exact(fd: int) -> int:
    """A descriptor of ``fd``'s file (even if renamed or deleted since) that reads exactly what is asked: the kernel's
    read-ahead is off for it (``POSIX_FADV_RANDOM``, per open file). A stream reads whole runs; read-ahead past a run
    would fetch the next tensors, which the stream reads around the page cache anyway: wasted reads, and page cache
    that pushes the resident subset out under a memory limit. The file's own descriptor is the fallback."""
    try:
        exact = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return fd
    if FADV_RANDOM is not None:
        try:
            os.posix_fadvise(exact, 0, 0, FADV_RANDOM)
        except OSError:  # advice only
            pass
    return exact


def read_run(run: Run, views: list[memoryview]) -> None:
    """``preadv`` the run into ``views`` (in file order), continuing after partial reads; raise on a short read."""
    fd = _exact(run.tracked.fd)
    try:
        _preadv_all(run, fd, list(views))
    finally:
        if fd != run.tracked.fd:
            os.close(fd)


def _preadv_all(run: Run, fd: int, views: list[memoryview]) -> None:
    offset, first = run.offset, 0
    while first < len(views):
        try:
            count = os.preadv(fd, views[first : first + _IOV_MAX], offset)
        except OSError as err:
            raise CheckpointError(
                f"Cannot read checkpoint file {run.tracked.path!r} at offset {offset} "
                f"({_names(_at(run, offset))}): {err}."
            ) from err
        if count == 0:
            _truncated(run, offset)
        offset += count
        while count and first < len(views):
            if count >= len(views[first]):
                count -= len(views[first])
                first += 1
            else:
                views[first] = views[first][count:]
                count = 0


def read_direct(run: Run, memory: memoryview, address: int) -> bool:
    """Read ``run``'s aligned blocks with ``O_DIRECT`` to ``run.start`` of the buffer (``memory``, at ``address``), then
    move each tensor up to its aligned place; ``False`` (nothing read) where the file system refuses ``O_DIRECT``.

    Raises:
        CheckpointError: the read failed or came back short.
    """
    first = run.offset // DIRECT * DIRECT
    length = round_up(run.end, DIRECT) - first
    try:  # the descriptor's file, even if renamed or deleted since; a descriptor of its own (O_DIRECT is per file)
        fd = os.open(f"/proc/self/fd/{run.tracked.fd}", os.O_RDONLY | O_DIRECT | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        done = 0
        while first + done < run.end:
            try:
                count = os.preadv(fd, [memory[run.start + done : run.start + length]], first + done)
            except OSError as err:
                if err.errno == errno.EINVAL and not done:
                    return False  # alignment refused here: read it buffered
                raise CheckpointError(
                    f"Cannot read checkpoint file {run.tracked.path!r} at offset {first + done} "
                    f"({_names(_at(run, first + done))}): {err}."
                ) from err
            if count == 0:
                _truncated(run, first + done)
            done += count
    finally:
        os.close(fd)
    for piece in reversed(run.pieces):  # each moves up (never down) by less than ALIGN: the last one first
        source = run.start + piece.offset - first
        if source != piece.pos:
            ctypes.memmove(address + piece.pos, address + source, piece.nbytes)
    return True


def _truncated(run: Run, offset: int) -> None:
    raise CheckpointError(
        f"Checkpoint file {run.tracked.path!r} ends at {offset} bytes, before the end of "
        f"{_names(_at(run, offset))} (it had {run.tracked.stamp[0]} bytes when loaded): it was truncated "
        "while the model uses it. Restore the file and load the model again."
    )


def _at(run: Run, offset: int) -> list[str]:
    """Names of the run's tensors from the one holding ``offset`` on."""
    return [piece.name for piece in run.pieces if piece.offset + piece.nbytes > offset] or [run.pieces[-1].name]
