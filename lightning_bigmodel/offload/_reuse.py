"""Checks of a reused offload file: opened without following links, size and header against its manifest entry, and
its CRC-32 computed in the background (the folder's exit waits for the result)."""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.checkpoint.shard import ShardHandle
from lightning_bigmodel.offload._files import _folder_error
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


class BackgroundChecksums:
    """CRC-32 of reused files on a small thread pool, started as each file is first reused."""

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._futures: dict[str, Future] = {}
        self._stop = threading.Event()

    def start(self, name: str, handle: ShardHandle) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="offload-checksum")
        self._futures[name] = self._pool.submit(handle.checksum, self._stop)

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
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return bad
