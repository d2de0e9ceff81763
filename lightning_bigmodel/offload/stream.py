"""The streaming engine's reads: the bytes of file-backed weights, with a few large ``preadv`` calls, into buffers.

A ``"disk"`` weight (and, until its first use, a ``"cpu"`` one loaded in place) is a memory-mapped view of a
safetensors file: the checkpoint itself, or an offload file. Touching the view moves a page, or the kernel's read-ahead
window, per fault, on the compute thread; and a file truncated under the job kills the process with ``SIGBUS``. Here
the view is never touched. :class:`Layout` finds the file range behind each view (the map it belongs to, see
:func:`~lightning_bigmodel.offload.pages.file_of`), merges the ranges that are adjacent in the file, and reads them
with ``os.preadv`` straight into a buffer: one call per contiguous run (a layer's weights are usually one run), through
the descriptor the map was made from, so the file read is the one that was planned even if its path now names another.

Faults are errors, never crashes: a read that comes back short (the file was truncated) or fails, and a file whose
size, mtime or ctime changed since it was mapped (checked with one ``fstat`` after each run is read: rewritten in
place), raise :class:`~lightning_bigmodel.checkpoint.errors.CheckpointError` naming the file and the tensors. A file
replaced by ``rename`` (a new inode) or deleted is not a change: the open descriptor still reads the planned file.

Buffers are plain ``uint8`` tensors, each view at a 64-byte aligned offset: anonymous memory for a CPU execution
device, page-locked memory for a GPU (its copies to the GPU are then asynchronous). A read whose bytes should not stay
in the page cache (``release``: memory is short) goes around it with ``O_DIRECT`` when the buffer allows (see
:func:`aligned_empty`): the disk writes straight into the buffer, so the kernel neither copies the bytes nor allocates,
charges to the memory cgroup and frees page cache for them (measured under a 1.6 GiB cgroup: a third of the reader's
CPU time per byte, on a machine whose two cores also compute). ``O_DIRECT`` reads whole 4 KiB blocks into a 4 KiB
aligned place, so a run lands at its file offset's remainder; its tensors are then moved the few bytes up to their
64-byte aligned places (a ``memmove`` in the buffer: results equal those of a fresh allocation). Where the file system
refuses ``O_DIRECT`` (tmpfs), buffered ``preadv`` is used. Buffers of 2 MiB and more are advised for huge pages
(:mod:`~lightning_bigmodel.offload._anonymous`): an ``O_DIRECT`` read into 4 KiB pages goes out as many small device
requests, and ran at a third of the disk's bandwidth here. Why no ``io_uring``: no maintained binding ships for this
Python; a read of a whole run already keeps the device's queue busy (it is split into requests the kernel submits
together). The reads themselves are in :mod:`~lightning_bigmodel.offload._reads`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Optional, Sequence

import torch

from lightning_bigmodel.offload._reads import (  # noqa: F401 - aligned_empty, check_unchanged: for the pool, staging
    ALIGN,
    DIRECT,
    FADV_DONTNEED,
    O_DIRECT,
    Piece,
    Run,
    aligned_empty,
    check_unchanged,
    read_direct,
    read_run,
    round_up,
)
from lightning_bigmodel.offload.pages import Tracked, file_of, is_file_backed
from lightning_bigmodel.offload.subclass import is_wrapped, map_inner, plain_parts

class Layout:
    """Where the file-backed tensors of one unit (a module's disk weights) are in their files and in a buffer.

    Args:
        parts: ``(name, tensor)`` pairs; tensors that are no contiguous view of a tracked file map (and empty ones)
            are left out: :meth:`view_of` returns ``None`` for them and they are used as they are.
    """

    def __init__(self, parts: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.places: dict[int, tuple[int, int]] = {}  # data_ptr -> (position in the buffer, bytes)
        self.direct_reads = 0  # runs read with O_DIRECT (tests and benchmarks)
        found: list[tuple[Tracked, int, str, int, int]] = []  # (file, offset, name, data_ptr, bytes)
        seen: set[int] = set()
        for name, tensor in parts:
            nbytes = tensor.numel() * tensor.element_size()
            if not nbytes or tensor.data_ptr() in seen or not tensor.is_contiguous():
                continue
            where = file_of(tensor) if is_file_backed(tensor) else None
            if where is not None:
                seen.add(tensor.data_ptr())
                found.append((where[0], where[1], name, tensor.data_ptr(), nbytes))
        self.runs: list[Run] = []
        position = 0
        for tracked, offset, name, ptr, nbytes in sorted(found, key=lambda item: (item[0].fd, item[1])):
            run = self.runs[-1] if self.runs else None
            if run is None or run.tracked is not tracked or run.end != offset:
                if run is not None:  # room for the previous run's aligned read too
                    position = max(position, run.start + round_up(run.end, DIRECT) - run.offset // DIRECT * DIRECT)
                run = Run(tracked, start=round_up(position, DIRECT))
                self.runs.append(run)
                position = run.start + offset % DIRECT  # where an aligned read puts the run's first byte
            position = round_up(position, ALIGN)
            run.pieces.append(Piece(name, position, nbytes, offset))
            self.places[ptr] = (position, nbytes)
            position += nbytes
        if self.runs:
            last = self.runs[-1]
            position = max(position, last.start + round_up(last.end, DIRECT) - last.offset // DIRECT * DIRECT)
        self.nbytes = position

    @property
    def names(self) -> list[str]:
        return [piece.name for run in self.runs for piece in run.pieces]

    def read_into(self, buffer: torch.Tensor, release: bool = False, direct: Optional[bool] = None) -> None:
        """Fill ``buffer`` (a CPU ``uint8`` tensor of at least :attr:`nbytes`) from the files; with ``release``, drop
        the ranges read from the page cache (the buffer holds them now). ``direct`` (default: ``release``): read
        around the page cache with ``O_DIRECT`` where the buffer and the file system allow (not for ranges expected
        in the page cache: ``O_DIRECT`` would read them from the disk again).

        Raises:
            CheckpointError: a read failed or came back short, or a file changed since it was mapped.
        """
        if not self.runs:
            return
        # A memoryview over the tensor's bytes without `numpy()`, which would mark its storage as not resizable (the
        # sign of a file view, see `is_file_backed`); `buffer` outlives the view (this call).
        memory = memoryview((ctypes.c_char * buffer.numel()).from_address(buffer.data_ptr())).cast("B")
        direct = (release if direct is None else direct) and bool(O_DIRECT) and buffer.data_ptr() % DIRECT == 0
        for run in self.runs:
            if direct and read_direct(run, memory, buffer.data_ptr()):
                self.direct_reads += 1
            else:
                read_run(run, [memory[p.pos : p.pos + p.nbytes] for p in run.pieces])
            check_unchanged(run.tracked, [piece.name for piece in run.pieces])
            if release and FADV_DONTNEED is not None:
                try:
                    os.posix_fadvise(run.tracked.fd, run.offset, run.end - run.offset, FADV_DONTNEED)
                except OSError:  # advice only
                    pass

    def view_of(self, buffer: torch.Tensor, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """The tensor in ``buffer`` holding ``tensor``'s bytes (same dtype and shape), or ``None`` when not laid out."""
        place = self.places.get(tensor.data_ptr()) if tensor.numel() else None
        if place is None:
            return None
        position, nbytes = place
        return buffer[position : position + nbytes].view(tensor.dtype).view(tensor.shape)

    def rebuild(self, buffer: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` made of ``buffer``'s bytes: a plain view, or a wrapper subclass (a quantized weight) of views of
        its inner tensors; parts not laid out are kept as they are."""
        if is_wrapped(tensor):
            return map_inner(tensor, lambda part: self.rebuild(buffer, part))
        found = self.view_of(buffer, tensor)
        return tensor if found is None else found


def read_copy(tensor: torch.Tensor, name: str, release: bool = False) -> Optional[torch.Tensor]:
    """A fresh CPU tensor (its class kept, for a quantized weight) holding the bytes of the file-backed ``tensor``,
    read with ``preadv`` (the map is never touched); ``None`` when no part of it is a view of a tracked map."""
    layout = Layout([(name, part) for part in plain_parts(tensor)])
    if not layout.nbytes:
        return None
    buffer = aligned_empty(layout.nbytes) if release else torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.read_into(buffer, release)
    return layout.rebuild(buffer, tensor)


class CopiesOnFirstUse:
    """Forward pre-hook of a dispatched root: on the first forward, before any weight is touched, every ``"cpu"``
    tensor that is still a view of its file (loaded in place, zero-copy) is replaced by a copy read with ``preadv``.

    From then on the weights in use do not depend on the file: a shard truncated, rewritten or deleted later changes
    nothing (and cannot raise ``SIGBUS``); a file changed between loading and the first forward raises
    :class:`CheckpointError` naming it. Loading itself stays zero-copy (it reads nothing), and the first forward
    reads these bytes with a few large reads instead of page faults; a copy takes the memory the view's pages took.

    Args:
        groups: the model's tensor groups (:class:`~lightning_bigmodel.offload.placement.TensorGroup`) to check.
        release: drop the ranges read from the page cache (memory is short).
    """

    def __init__(self, groups: Sequence, release: bool = False) -> None:
        self.groups = [g for g in groups if g.tensor.device.type == "cpu" and _file_backed(g.tensor)]
        self.release = release
        self.handle = None
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.groups)

    def attach(self, model: torch.nn.Module) -> Any:
        """Register the hook on ``model``; it removes itself once the copies are made. Returns its handle."""
        self.handle = model.register_forward_pre_hook(self.pre)
        return self.handle

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        from lightning_bigmodel.offload.placement import install

        with self._lock:  # a second thread's forward waits: no weight is used while it is being replaced
            while self.groups:
                group = self.groups[0]
                copy = read_copy(group.tensor, group.name, self.release)
                if copy is not None:
                    install(group, copy)
                self.groups.pop(0)
            if self.handle is not None:
                self.handle.remove()  # done: later forwards pay nothing


def _file_backed(tensor: torch.Tensor) -> bool:
    from lightning_bigmodel.offload.placement import is_disk

    return not is_disk(tensor) and any(is_file_backed(part) for part in plain_parts(tensor))
