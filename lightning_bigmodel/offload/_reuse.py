"""Checks of a reused offload file: opened without following links, size and header against its manifest entry, and
its CRC-32 computed in the background: the folder's exit waits for the result, or (a load that returns at once) each
module holding a tensor of the file waits for it before its first forward (:func:`wait_on_first_use`)."""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.checkpoint.shard import ShardHandle
from lightning_bigmodel.offload._files import OffloadFolderError, _folder_error
from lightning_bigmodel.offload._manifest import header_problem

CHECK_THREADS = 2  # checksums of reused files computed at once (pread and crc32 release the GIL)


def open_checked(folder: Path, entry: dict[str, Any], remove_links: bool) -> Optional[ShardHandle]:
    """The entry's file opened (``O_NOFOLLOW``) with its size and header as recorded, else ``None`` (not reusable).
    With ``remove_links``, a symbolic link in place of the file is removed (never followed): the caller rewrites it."""
    path = folder / entry["file"]
    try:
        handle = ShardHandle(path, nofollow=True)
    except CheckpointError:  # a header that does not parse
        return None
    except OSError as err:
        if err.errno == errno.ELOOP and remove_links:
            path.unlink(missing_ok=True)
        if err.errno in (errno.ENOENT, errno.ELOOP, errno.EACCES, errno.EISDIR, errno.EINVAL):  # EINVAL: no file
            return None
        raise _folder_error(folder, f"opening {entry['file']!r}", err) from err
    if handle.size != entry["size"] or header_problem(entry, handle.header) is not None:
        handle.close()
        return None
    return handle


class PendingCheck:
    """The background checksum of one reused file, judged by whoever needs its bytes first (see :meth:`wait`)."""

    def __init__(
        self, future: Future, folder: Path, file: str, expected: str, handle: ShardHandle, drop: Callable[..., None]
    ) -> None:
        self.future, self.folder, self.file, self.expected = future, folder, file, expected
        self.drop = drop  # `disk.drop_files`, passed in: disk imports this module
        self.inode = (handle.device, handle.inode)
        self._lock = threading.Lock()
        self._error: Optional[Exception] = None
        self._judged = False

    def wait(self) -> None:
        """Block until the file's checksum is known. On a mismatch (or a file that cannot be read), drop the file from
        its folder and manifest (once; a rerun rewrites it) and raise :class:`OffloadFolderError` naming it, now and on
        every later call: its bytes are never used."""
        with self._lock:
            if not self._judged:
                try:
                    found = self.future.result()
                except (OSError, CheckpointError):
                    found = None
                if found != self.expected:
                    self.drop(self.folder, {self.file: (self.expected, self.inode)})
                    self._error = mismatch_error(self.folder, [self.file], "the model was not run")
                self._judged = True
        if self._error is not None:
            raise self._error

    def __deepcopy__(self, memo: dict) -> "PendingCheck":
        return self  # a copy of the model holds the same file's bytes: it waits for the same check


def mismatch_error(folder: Path, files: list[str], model_state: str) -> OffloadFolderError:
    return OffloadFolderError(
        f"Offload file(s) {files} in `offload_folder` {str(folder)!r} do not match the checksum recorded when they "
        "were written: they changed on disk since (another process, a bad disk). They were removed from the folder and "
        f"its manifest, and {model_state}: load the model again to rewrite them from the checkpoint."
    )


class BackgroundChecksums:
    """CRC-32 of reused files on a small thread pool, started as each file is first reused, or with ``deferred`` once
    the load is done (:meth:`hand_over`): the checks then take no CPU from the load itself."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self._pool: Optional[ThreadPoolExecutor] = None
        self._futures: dict[str, Future] = {}
        self._handles: dict[str, ShardHandle] = {}
        self._stop = threading.Event()

    def start(self, name: str, handle: ShardHandle) -> None:
        self._handles[name] = handle
        if not self.deferred:
            self._submit(name, handle)

    def _submit(self, name: str, handle: ShardHandle) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="offload-checksum")
        self._futures[name] = self._pool.submit(handle.checksum, self._stop)

    def hand_over(
        self, folder: Path, entries: dict[str, dict[str, Any]], drop: Callable[..., None]
    ) -> dict[str, PendingCheck]:
        """Start the checks not started yet (in load order: the first modules' files first), stop tracking them and
        return them (tensor name -> :class:`PendingCheck`) to be judged at first use; the pool finishes them in the
        background and then ends its threads. A check that fails calls ``drop(folder, {file: (crc, inode)})``
        (:func:`~lightning_bigmodel.offload.disk.drop_files`) to remove the file from the folder and its manifest."""
        for name, handle in self._handles.items():
            if name not in self._futures and name in entries:
                self._submit(name, handle)
        pending = {
            name: PendingCheck(future, folder, entries[name]["file"], entries[name]["crc32"], self._handles[name], drop)
            for name, future in self._futures.items()
            if name in entries
        }
        self._futures.clear()
        self._handles.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)  # queued checks still run
            self._pool = None
        return pending

    def finish(self, expected: dict[str, str], abort: bool = False) -> list[str]:
        """Wait for every checksum; return the names whose file does not match ``expected[name]`` (an unreadable
        file does not match). With ``abort`` the checks still running stop early and nothing is judged."""
        if abort:
            self._stop.set()
        bad = []
        for name, future in self._futures.items():
            try:
                found = future.result()
            except (OSError, CheckpointError):
                found = None
            if not abort and name in expected and found != expected[name]:
                bad.append(name)
        self._futures.clear()
        self._handles.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return bad


def wait_on_first_use(groups: Sequence, pending: dict[str, PendingCheck]) -> list:
    """Make every module holding a tensor of a file still being checked wait for that check before its forward runs
    (a forward pre-hook, first in line, on each module holding it: tied aliases included). Once the checks of a
    module's files passed, its hook removes itself; a mismatch raises at that module's every forward. Returns the
    hook handles.

    ``groups`` are the loaded model's :class:`~lightning_bigmodel.offload.placement.TensorGroup` (``name``, ``slots``).
    """
    by_module: dict[int, tuple[nn.Module, list[PendingCheck]]] = {}
    for group in groups:
        check = pending.get(group.name)
        if check is None:
            continue
        for module, _ in group.slots:
            checks = by_module.setdefault(id(module), (module, []))[1]
            if check not in checks:
                checks.append(check)
    return [_FirstUse(checks).attach(module) for module, checks in by_module.values()]


class _FirstUse:
    def __init__(self, checks: list[PendingCheck]) -> None:
        self.checks = checks
        self.handle = None

    def attach(self, module: nn.Module):
        self.handle = module.register_forward_pre_hook(self.pre, prepend=True)
        return self.handle

    def pre(self, module: nn.Module, args: Any) -> None:
        for check in self.checks:
            check.wait()  # raises on a mismatch: the module never computes with those bytes
        self.handle.remove()

    def __deepcopy__(self, memo: dict) -> "_FirstUse":
        return self  # `copy.deepcopy(model)` before the first forward: the copy waits for the same checks
