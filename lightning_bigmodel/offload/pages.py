"""Page-level control of file-backed (memory-mapped) tensors: keep them resident, read them ahead, release them.

A safetensors weight loaded in place is a view of a private (copy-on-write) file mapping: zero-copy, but its pages
are page cache the kernel may evict at any time. Here:

- :func:`keep_resident` locks a view's pages with ``mlock2(MLOCK_ONFAULT)``: nothing is read at load time (zero cost),
  each page is locked as the first forward faults it in, and the kernel never evicts it afterwards. A read fault on a
  private mapping maps the page cache page itself, so locking this way copies nothing (plain ``mlock`` would fault
  the pages in for writing and give every page an anonymous copy). Where locking is refused (``RLIMIT_MEMLOCK``
  without ``CAP_IPC_LOCK``, an old kernel), the weight is copied into anonymous memory instead, which the kernel does
  not evict without swap either.
- :func:`read_ahead` starts reading a view's file range into the page cache without waiting, :func:`populate` reads
  and maps it (``MADV_POPULATE_READ``), so the disk works ahead of the compute thread in large requests.
- :func:`release` drops a view's pages from memory once used (``MADV_PAGEOUT``, then ``POSIX_FADV_DONTNEED`` on its
  file range): clean file pages leave the page cache, so streaming one layer does not push out others; private
  modifications, if any, are kept (swapped or left).
- :func:`resident_fraction` asks ``mincore`` which pages are in memory (tests and benchmarks).

Why by hand (``ctypes``): Python's ``mmap.madvise`` needs the ``mmap`` object and knows neither ``MADV_PAGEOUT`` nor
``MADV_POPULATE_READ``; ``mlock2`` and ``mincore`` are not exposed by the standard library or by torch.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import weakref
from typing import NamedTuple, Optional

import torch

from lightning_bigmodel.offload._anonymous import is_anonymous_buffer

PAGE = mmap.PAGESIZE
_MLOCK_ONFAULT = 1
_MADV_WILLNEED = 3
_MADV_PAGEOUT = 21  # Linux 5.4
_MADV_POPULATE_READ = 22  # Linux 5.14
_FADV_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)  # POSIX, absent on macOS and Windows
_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)

_libc: Optional[ctypes.CDLL] = None
_mapped: dict[int, "Tracked"] = {}  # start address of a tracked file map -> its end, descriptor, path
_unsupported: set[int] = set()  # madvise advice this libc/kernel lacks: not tried again


def _c() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def page_span(tensor: torch.Tensor, inner: bool = False) -> tuple[int, int]:
    """``(address, length)`` of the pages holding ``tensor``'s bytes: every page it touches, or with ``inner`` only the
    pages it fills alone (a page shared with a neighbour tensor is left out). ``(0, 0)`` when there are none."""
    nbytes = tensor.numel() * tensor.element_size()
    start = tensor.data_ptr()
    end = start + nbytes
    if inner:
        start, end = start + -start % PAGE, end - end % PAGE
    else:
        start, end = start - start % PAGE, end + -end % PAGE
    return (start, end - start) if end > start else (0, 0)


_ARGS = {
    "madvise": (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int),
    "mlock2": (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint),
    "mincore": (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p),
}


def _call(name: str, *args) -> int:
    """``libc.name(*args)``: 0 on success, else the errno (``-1`` when this libc lacks the call)."""
    libc = _c()
    function = getattr(libc, name, None) if libc is not None else None
    if function is None:
        return -1
    function.argtypes = _ARGS[name]
    return 0 if function(*args) == 0 else ctypes.get_errno()


def _madvise(tensor: torch.Tensor, advice: int, inner: bool = False) -> bool:
    start, length = page_span(tensor, inner)
    if not length or advice in _unsupported:
        return False
    error = _call("madvise", start, length, advice)
    if error in (-1, errno.ENOSYS):  # this libc or kernel lacks madvise (EINVAL may be one locked range: not cached)
        _unsupported.add(advice)
    return error == 0


class Tracked(NamedTuple):
    """A tracked file map: where it ends, a descriptor of the file it maps from offset 0 (owned here), its path, and
    the file's ``(size, mtime_ns, ctime_ns)`` when the map was made (see :func:`~lightning_bigmodel.offload.stream.
    check_unchanged`)."""

    end: int
    fd: int
    path: str
    stamp: tuple[int, int, int]


def track_file(mapping, source) -> None:
    """Remember which file ``mapping`` maps from offset 0, so :func:`populate`, :func:`release` and the streaming
    engine (:mod:`~lightning_bigmodel.offload.stream`) can reach exactly a view's file range.

    ``source`` is the open file: a descriptor, or an object with ``fd`` and ``path`` (a shard handle). The descriptor
    is duplicated (one per mapped file, closed when the map is freed): the file stays the one mapped, even when its
    path is replaced or the handle closed."""
    if not len(mapping):
        return
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))  # the temporary export ends with this statement
    fd = os.dup(source.fd if hasattr(source, "fd") else source)
    stat = os.fstat(fd)
    path = str(source.path) if hasattr(source, "path") else _fd_path(fd)
    tracked = Tracked(start + len(mapping), fd, path, (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    _mapped[start] = tracked
    weakref.finalize(mapping, _forget, start, tracked)


class _Borrowed(Tracked):
    """A tracked map made and freed by someone else (``torch.load(mmap=True)`` of a pickle shard): it is alive while
    any storage registered with it (:attr:`storages`, weak references) is, and forgotten at the first lookup after."""

    def alive(self) -> bool:
        return any(not ref.expired() for ref in self.storages)


def track_storage(tensor: torch.Tensor, source) -> bool:
    """Track the file map ``tensor`` is a view of when another library made it (``torch.load(mmap=True)`` maps the
    whole file from offset 0 and gives slices of it), like :func:`track_file` does for maps of ours; ``source`` is the
    open file (a descriptor or a shard handle, duplicated). The map is found in ``/proc/self/maps`` (the region holding
    the tensor, its file offset and inode, which must be ``source``'s); it stays tracked while ``tensor``'s storage,
    or that of another tensor registered with it, lives. ``False`` when the tensor is not in a map of that file."""
    from torch.multiprocessing.reductions import StorageWeakRef  # a weak reference to a storage (not to its wrapper)

    ref = StorageWeakRef(tensor.untyped_storage())
    found = file_of(tensor)
    if found is not None:
        if isinstance(found[0], _Borrowed):
            found[0].storages.append(ref)
        return True
    fd = source.fd if hasattr(source, "fd") else source
    stat = os.fstat(fd)
    region = _region_of(tensor.data_ptr())
    if region is None or region[1] != stat.st_ino:
        return False
    base = region[0]  # address of the file's first byte
    fd = os.dup(fd)
    path = str(source.path) if hasattr(source, "path") else _fd_path(fd)
    tracked = _Borrowed(base + stat.st_size, fd, path, (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
    tracked.storages = [ref]
    _mapped[base] = tracked
    return True


def _region_of(address: int) -> Optional[tuple[int, int]]:
    """``(address of file offset 0, inode)`` of the file-backed region of this process holding ``address``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                start, end = (int(part, 16) for part in fields[0].split("-"))
                if start <= address < end:
                    inode = int(fields[4])
                    return (start - int(fields[2], 16), inode) if inode else None
    except OSError:  # not Linux
        return None
    return None


def _live_maps() -> list[tuple[int, Tracked]]:
    """The tracked maps, after forgetting those made by others and freed since (:class:`_Borrowed`)."""
    out = []
    for start, tracked in list(_mapped.items()):
        if isinstance(tracked, _Borrowed) and not tracked.alive():
            _forget(start, tracked)
        else:
            out.append((start, tracked))
    return out


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<descriptor {fd}>"


def _forget(start: int, tracked: Tracked) -> None:
    if _mapped.get(start) is tracked:
        del _mapped[start]
    os.close(tracked.fd)


def file_of(tensor: torch.Tensor) -> Optional[tuple[Tracked, int]]:
    """``(tracked map, file offset of tensor's first byte)`` for a view of a tracked map, else ``None``."""
    start = tensor.data_ptr()
    for map_start, tracked in _live_maps():
        if map_start <= start < tracked.end:
            return tracked, start - map_start
    return None


def _file_advise(tensor: torch.Tensor, advice: Optional[int], inner: bool) -> bool:
    """``posix_fadvise`` over the file range behind ``tensor``'s pages, when its map is tracked."""
    if advice is None:
        return False
    start, length = page_span(tensor, inner)
    for map_start, (map_end, fd, _, _) in _live_maps():
        if length and map_start <= start < map_end:
            try:
                os.posix_fadvise(fd, start - map_start, min(length, map_end - start), advice)
            except OSError:  # advice only: a file system that refuses it changes nothing else
                return False
            return True
    return False


def is_file_backed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a view of a memory map (its storage does not own its memory, and is no read buffer of
    :mod:`~lightning_bigmodel.offload._anonymous`)."""
    return (
        tensor.device.type == "cpu" and not tensor.untyped_storage().resizable() and not is_anonymous_buffer(tensor)
    )


def lock_pages(tensor: torch.Tensor) -> bool:
    """Lock ``tensor``'s pages as they fault in (``mlock2(MLOCK_ONFAULT)``); ``False`` when the kernel refuses."""
    start, length = page_span(tensor)
    if not length:
        return True
    return _call("mlock2", start, length, _MLOCK_ONFAULT) == 0


def keep_resident(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in memory the kernel will not evict: a file view locked in place, else an anonymous copy.

    Tensors that own their memory (anonymous pages) are returned as they are.
    """
    if not is_file_backed(tensor) or lock_pages(tensor):
        return tensor
    return tensor.clone()


def populate(tensor: torch.Tensor) -> bool:
    """Read ``tensor``'s pages into memory and map them now (blocking; call it from a background thread).

    On a tracked map (:func:`track_file`) the exact file range is read first (``POSIX_FADV_WILLNEED``), so the faults
    that map the pages find them cached and start no read-ahead of the kernel's own beyond the tensor.
    """
    _file_advise(tensor, _FADV_WILLNEED, inner=False)
    return _madvise(tensor, _MADV_POPULATE_READ) or _madvise(tensor, _MADV_WILLNEED)


def read_ahead(tensor: torch.Tensor) -> bool:
    """Start reading ``tensor``'s file range into the page cache and return at once (``POSIX_FADV_WILLNEED`` on a
    tracked map, else ``MADV_WILLNEED``); the first touch then maps the cached pages (minor faults) or waits for the
    read in flight. Unlike :func:`populate` it holds no lock of the address space while the disk works."""
    return _file_advise(tensor, _FADV_WILLNEED, inner=False) or _madvise(tensor, _MADV_WILLNEED)


def release(tensor: torch.Tensor) -> bool:
    """Drop ``tensor``'s clean file pages from memory (``MADV_PAGEOUT``), leaving the pages it shares with neighbours.

    ``False`` when the kernel refuses (before Linux 5.4, or the range holds locked pages): the pages then stay until
    the kernel reclaims them.
    """
    paged_out = _madvise(tensor, _MADV_PAGEOUT, inner=True)
    # Pages of the range that are cached but not mapped here (read ahead by the kernel) go too, on a tracked map.
    return _file_advise(tensor, _FADV_DONTNEED, inner=True) or paged_out


def resident_fraction(tensor: torch.Tensor) -> float:
    """Fraction of ``tensor``'s pages in memory, from ``mincore`` (1.0 for a tensor without bytes)."""
    start, length = page_span(tensor)
    if not length:
        return 1.0
    pages = length // PAGE
    vector = (ctypes.c_ubyte * pages)()
    error = _call("mincore", start, length, ctypes.addressof(vector))
    if error:
        raise OSError(error, f"mincore failed on {length} bytes at {start:#x}")
    return sum(byte & 1 for byte in vector) / pages
