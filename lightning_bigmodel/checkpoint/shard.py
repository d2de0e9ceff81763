"""One open descriptor per checkpoint shard or offload file: the file as it was planned, and every read from it.

A job can run for hours over shards that other processes can replace, truncate or delete. Reading by path would then
mix files; so each shard is opened ONCE, when the checkpoint is scanned, and every tensor comes from that descriptor.
A shard replaced by ``os.replace`` (or deleted) later is still the planned file for this descriptor; a shard
truncated or extended in place is detected (:meth:`ShardHandle.check`) before any byte is read and reported as a
:class:`~lightning_bigmodel.checkpoint.errors.CheckpointError` naming it.

:class:`ShardHandle` (what other modules build on, e.g. a streaming engine reading disk layers into reusable buffers):

- ``path``, ``fd`` (one ``O_RDONLY | O_CLOEXEC`` descriptor, ``O_NOFOLLOW`` inside an offload folder), and the
  identity read from ``fstat`` at open: ``size``, ``inode``, ``device``, ``ctime_ns``, ``mtime_ns``;
- ``header_bytes`` / ``header``: a safetensors file's raw header (length prefix and JSON) and its strict parse
  (:class:`~lightning_bigmodel.checkpoint.safetensors_view.SafetensorsHeader`, byte offsets from the file's start);
  ``None`` / ``b""`` for a pickle;
- :meth:`~ShardHandle.pread_into` fills a writable buffer (``bytearray``, ``memoryview``, contiguous CPU tensor) from
  an absolute file offset with ``os.preadv``: positional, so threads may read one handle concurrently; a short read
  (the file shrank) raises ``CheckpointError`` naming the file;
- :meth:`~ShardHandle.read` returns a fresh tensor for a header entry (pread, no memory map: never ``SIGBUS``);
- :meth:`~ShardHandle.check` (one ``fstat``) raises when the open file's size changed, :meth:`~ShardHandle.replaced`
  tells whether the path now names another file; :meth:`~ShardHandle.identity` is the JSON identity (path, size,
  inode, device, ctime, mtime, a blake2b digest of the header bytes) that offload folders record;
- :meth:`~ShardHandle.map` maps the whole file private copy-on-write (for zero-copy views); the mapping holds no
  descriptor of its own (``mmap(2)`` through libc, unlike Python's ``mmap`` which keeps a duplicate), so a mapped
  file costs one descriptor for as long as the handle lives, and none once it is closed;
- :meth:`~ShardHandle.checksum` is the CRC-32 of the whole file, read with ``pread``; ``proc_path`` names the open file
  for APIs that only take a path (``torch.load(mmap=True)``): ``/proc/self/fd/N`` reopens this inode, not the path.

The descriptor closes with :meth:`~ShardHandle.close` or when the last reference to the handle goes: keep a
reference for as long as you read from it. :func:`ensure_descriptors` checks a load's need against ``RLIMIT_NOFILE``
before anything is opened, raising the soft limit up to the hard one when that is enough.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import struct
import sys
import weakref
import zlib
from pathlib import Path
from stat import S_ISREG
from typing import Any, Optional, Union

import torch

from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.checkpoint.safetensors_header import MAX_HEADER_BYTES, parse_header

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CHUNK = 8 * 2**20  # digest reads
DESCRIPTOR_SLACK = 64  # descriptors kept free for everything else the process opens while loading


class DescriptorLimitError(OSError):
    """Loading needs more file descriptors than ``RLIMIT_NOFILE`` allows, even after raising the soft limit."""


def _libc_mmap():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc


_LIBC = _libc_mmap()


def _map_fd(fd: int, length: int) -> Any:
    """A private copy-on-write map of ``length`` bytes of ``fd``: a writable buffer that unmaps when garbage.

    Why not :class:`mmap.mmap`: it keeps a duplicate descriptor for each map (two per file with the read-ahead's
    own), which runs a model of many files out of descriptors. Elsewhere than Linux it is used all the same."""
    if length == 0:
        return bytearray()
    if _LIBC is None:  # pragma: no cover
        return mmap.mmap(fd, length, access=mmap.ACCESS_COPY)
    address = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    buffer = (ctypes.c_char * length).from_address(address)
    weakref.finalize(buffer, _LIBC.munmap, address, length)
    return buffer


class ShardHandle:
    """One shard (or offload file) opened once; see the module docstring. ``nofollow`` refuses a symlink (``ELOOP``).

    Raises:
        OSError: the file cannot be opened (missing, a symlink with ``nofollow``, no permission).
        CheckpointError: ``safetensors`` is true and the header is malformed (named in the message).
    """

    def __init__(self, path: Union[str, Path], *, safetensors: bool = True, nofollow: bool = False) -> None:
        self.path = Path(path)
        # O_NONBLOCK: a FIFO planted under a shard's name cannot block the open (regular files ignore the flag).
        self.fd = os.open(self.path, os.O_RDONLY | _CLOEXEC | _NONBLOCK | (_NOFOLLOW if nofollow else 0))
        self._closer = weakref.finalize(self, os.close, self.fd)
        stat = os.fstat(self.fd)
        if not S_ISREG(stat.st_mode):
            self.close()
            raise OSError(errno.EINVAL, f"{str(self.path)!r} is not a regular file")
        self.size, self.inode, self.device = stat.st_size, stat.st_ino, stat.st_dev
        self.ctime_ns, self.mtime_ns = stat.st_ctime_ns, stat.st_mtime_ns
        self.header_bytes = b""
        self.header = None
        if safetensors:
            try:
                self.parse_header()
            except BaseException:
                self.close()  # now, not when the traceback that holds this handle is freed
                raise

    def parse_header(self) -> "ShardHandle":
        """Read and strictly parse the safetensors header (sets ``header`` and ``header_bytes``); returns ``self``."""
        self.header, self.header_bytes = parse_header(self.path, self._read_prefix(), self.size)
        return self

    def _read_prefix(self) -> bytes:
        """The 8-byte length and the JSON header, as far as the file holds them (parse_header judges)."""
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            return head
        (length,) = struct.unpack("<Q", head)
        if length > min(self.size - 8, MAX_HEADER_BYTES):
            return head  # parse_header reports the impossible length with the file's size
        return head + self._pread(length, 8)

    def _pread(self, length: int, offset: int) -> bytes:
        out = bytearray(length)
        self.pread_into(offset, out)
        return bytes(out)

    # ------------------------------------------------------------------ identity
    @property
    def closed(self) -> bool:
        return not self._closer.alive

    @property
    def proc_path(self) -> str:
        """A path that opens this very file (``/proc/self/fd/N`` on Linux), for APIs that take only a path."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else str(self.path)

    def identity(self) -> dict[str, Any]:
        """JSON identity of the file as opened: path, size, inode, device, ctime, mtime and the header's digest."""
        return {
            "path": str(self.path.resolve()), "size": self.size, "inode": self.inode, "device": self.device,
            "ctime_ns": self.ctime_ns, "mtime_ns": self.mtime_ns,
            "header": hashlib.blake2b(self.header_bytes, digest_size=16).hexdigest(),
        }  # fmt: skip

    def check(self) -> None:
        """Raise :class:`CheckpointError` naming the file when the open file changed since it was opened: another
        size or mtime, or another ctime while the file still has a name (``cp -p`` over it in place). A file that was
        replaced (renamed over) or deleted since is fine: this descriptor still reads the file that was planned."""
        stat = os.fstat(self.fd)
        if stat.st_size != self.size:
            what = f"it had {self.size} bytes when opened and has {stat.st_size} now (truncated or rewritten in place)"
        elif stat.st_mtime_ns != self.mtime_ns or (stat.st_nlink and stat.st_ctime_ns != self.ctime_ns):
            what = "it was rewritten in place (its mtime or ctime changed, same size)"
        else:
            return
        raise CheckpointError(
            f"Checkpoint file {str(self.path)!r} changed while in use: {what}. Nothing more is read from it; restore "
            "it (or replace files atomically: write a new file, then rename it over the old one) and load again."
        )

    def replaced(self) -> bool:
        """Whether ``path`` now names another file than the one opened (replaced, deleted, or changed metadata)."""
        try:
            stat = os.stat(self.path)
        except OSError:
            return True
        return (stat.st_ino, stat.st_dev, stat.st_ctime_ns) != (self.inode, self.device, self.ctime_ns)

    # ------------------------------------------------------------------ reading
    def pread_into(self, offset: int, buffer: Any) -> None:
        """Fill ``buffer`` (writable, contiguous) with the bytes at ``offset``; a short read raises CheckpointError."""
        view = memoryview(buffer.view(torch.uint8).numpy() if isinstance(buffer, torch.Tensor) else buffer).cast("B")
        done = 0
        while done < len(view):
            try:
                count = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as err:
                raise CheckpointError(f"Cannot read checkpoint file {str(self.path)!r} ({err}).") from err
            if count == 0:
                raise CheckpointError(
                    f"Checkpoint file {str(self.path)!r} ended at {offset + done} bytes while reading "
                    f"{len(view)} bytes at offset {offset} (opened with {self.size}): it was truncated. Restore it "
                    "and load again."
                )
            done += count

    def read(self, entry) -> torch.Tensor:
        """A fresh CPU tensor holding header ``entry`` (a ``TensorEntry``), read with pread after :meth:`check`."""
        self.check()
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if out.numel():
            self.pread_into(entry.begin, out.reshape(-1).view(torch.uint8))
        return out

    def map(self) -> Any:
        """A private copy-on-write map of the whole file (a buffer for ``torch.frombuffer``), made from this
        descriptor: the planned file even if the path was replaced since. It needs no descriptor of its own."""
        self.check()
        try:
            return _map_fd(self.fd, self.size)
        except OSError as err:
            raise CheckpointError(f"Cannot memory-map checkpoint file {str(self.path)!r} ({err}).") from err

    def checksum(self, stop: Optional[Any] = None) -> str:
        """CRC-32 of the whole file (8 hex digits; :func:`crc32_hex` of its bytes), read in chunks with pread.
        ``stop`` (an event) aborts early (returns ``""``). Both release the GIL: this runs beside other work."""
        crc = 0
        chunk = bytearray(min(_CHUNK, max(self.size, 1)))
        offset = 0
        while offset < self.size:
            if stop is not None and stop.is_set():
                return ""
            part = memoryview(chunk)[: min(len(chunk), self.size - offset)]
            self.pread_into(offset, part)
            crc = zlib.crc32(part, crc)
            offset += len(part)
        return f"{crc:08x}"

    def close(self) -> None:
        """Close the descriptor now (maps made from it stay valid)."""
        self._closer()

    def __repr__(self) -> str:
        return f"ShardHandle({str(self.path)!r}, size={self.size}, inode={self.inode}, closed={self.closed})"


def open_descriptors() -> Optional[int]:
    """How many descriptors this process has open (``None`` where it cannot be counted)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # the listing's own
        except OSError:
            continue
    return None


def ensure_descriptors(needed: int, what: str) -> None:
    """Make room for ``needed`` more open descriptors under ``RLIMIT_NOFILE``, raising the soft limit up to the hard
    one when that is enough; else raise :class:`DescriptorLimitError` with the count and the limit."""
    if resource is None or needed <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    total = needed + (open_descriptors() or 0) + DESCRIPTOR_SLACK
    if soft == resource.RLIM_INFINITY or total <= soft:
        return
    if hard == resource.RLIM_INFINITY or total <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (total if hard == resource.RLIM_INFINITY else hard, hard))
        return
    raise DescriptorLimitError(
        errno.EMFILE,
        f"{what} needs {needed} file descriptors (one per file, plus {DESCRIPTOR_SLACK} spare and "
        f"{total - needed - DESCRIPTOR_SLACK} already open: {total} in all), but the limit is {soft} (soft) and "
        f"{hard} (hard; RLIMIT_NOFILE, `ulimit -n`). Raise it (`ulimit -n {total}` before starting, or ask the "
        "administrator for a higher hard limit), or use fewer, larger shards (`max_shard_size`).",
    )
