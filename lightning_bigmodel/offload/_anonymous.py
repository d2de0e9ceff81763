"""Large read buffers in anonymous memory backed by transparent huge pages, so that a disk read into them is a few
large requests.

Why: an ``O_DIRECT`` read is split into block-device requests by the buffer's physical pages. Each 4 KiB page is one
segment, and a device takes a bounded number of segments per request (254 on the virtio disk measured here), so a
32 MiB read into ordinary memory went out as requests of about 512 KiB; the same read into 2 MiB pages went out as
requests of the device's maximum size (4 MiB). Cold reads of a checkpoint with ``O_DIRECT`` rose from 0.4-0.6 GB/s to
1.9-2.0 GB/s there, faster than read-ahead through the page cache (``MADV_WILLNEED``, 1.3-1.4 GB/s) in the same runs
(``python -m benchmarks.limit_run`` prints the read methods side by side). Buffered reads go through the page cache's
large folios and are not affected.

torch's allocator asks for huge pages only when ``THP_MEM_ALLOC_ENABLE`` is set before its first allocation (read
once per process), and glibc may hand out heap memory already faulted with small pages, so the buffers are private
anonymous memory maps advised ``MADV_HUGEPAGE``. Where the kernel has no transparent huge pages (or the advice is
refused) they are plain anonymous memory, as fast as before. ``torch.frombuffer`` storages cannot be resized, the sign
:func:`~lightning_bigmodel.offload.pages.is_file_backed` reads as "a view of a file": these buffers are recorded here
so that it does not take them for one.
"""

from __future__ import annotations

import mmap
import weakref
from typing import Optional

import torch

HUGE_PAGE = 2**21  # a PMD-sized transparent huge page with 4 KiB base pages (x86-64, arm64)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
_alive: dict[int, object] = {}  # storage address -> a token, for each buffer made here and not freed yet


def huge_page_buffer(nbytes: int) -> Optional[torch.Tensor]:
    """An uninitialised ``uint8`` CPU tensor of ``nbytes`` at a page-aligned address, in its own private anonymous
    map advised ``MADV_HUGEPAGE`` (unmapped when the last view of it is freed); ``None`` below :data:`HUGE_PAGE`
    bytes or where this platform's ``mmap`` lacks the flags (use a plain allocation then)."""
    if nbytes < HUGE_PAGE or _MADV_HUGEPAGE is None or None in _PRIVATE:
        return None
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    mapping = huge_page_map(size)
    buffer = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the map: it lives as long as any view of it
    address, token = buffer.data_ptr(), object()
    _alive[address] = token
    weakref.finalize(mapping, _forget, address, token)
    return buffer[:nbytes]


def _forget(address: int, token: object) -> None:
    """Drop the record of a buffer whose map is gone, unless a newer buffer took the same address meanwhile (the
    unmapping may release the GIL: another thread can map and record that address before this runs)."""
    if _alive.get(address) is token:
        del _alive[address]


def huge_page_map(size: int, kind: type[mmap.mmap] = mmap.mmap) -> mmap.mmap:
    """A private anonymous map of ``size`` bytes (a ``kind``), advised ``MADV_HUGEPAGE`` from :data:`HUGE_PAGE` bytes
    on where the platform allows (a shared one would be shmem, whose huge pages are a separate, usually off, setting).
    """
    if None in _PRIVATE:
        return kind(-1, size)
    mapping = kind(-1, size, flags=_PRIVATE[0] | _PRIVATE[1])
    if size >= HUGE_PAGE and _MADV_HUGEPAGE is not None:
        try:
            mapping.madvise(_MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: small pages, as torch.empty would give
            pass
    return mapping


def is_anonymous_buffer(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` views a buffer made by :func:`huge_page_buffer` (anonymous memory, not a file)."""
    return bool(_alive) and tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() in _alive
