"""An offload folder: tensors written once as safetensors files, then used as zero-copy memory-mapped views.

Only tensors that cannot be referenced in place (a ``.bin`` checkpoint, a dtype conversion, weights of a model built
in memory) are written here. Each tensor is one file written atomically (temporary file, ``fsync``, ``os.replace``);
``offload_index.json`` records every tensor's file, shape, dtype, size, header layout and a CRC-32 of the file's
bytes (computed while writing: nothing is read twice), plus the identity of the source checkpoint (path, size,
inode, device, ctime, mtime and header digest of each of its files, see
:meth:`~lightning_bigmodel.checkpoint.shard.ShardHandle.identity`). A rerun over the same source reuses the entries
it finds; a folder written for another source is cleared first. An exclusive ``fcntl.flock`` on ``.lock`` serialises
processes sharing a folder; views handed out stay valid when another process replaces a file later (they map the old
inode).

Reuse trusts nothing it has not checked. The manifest's schema is validated (an invalid one is treated like a torn
one: rebuilt). Each reused file is opened once (``O_NOFOLLOW``) and its size and header validated against the entry's
shape, dtype and layout; a file that fails is rewritten. Its checksum is verified in the background while the load goes
on; the folder's exit waits for it and refuses a mismatch with :class:`OffloadFolderError` naming the files, which are
then dropped from the folder and its manifest (a rerun rewrites them). With ``defer_checks`` (what loads use) the
checks start only at the exit, which does not wait: they are handed over (:attr:`OffloadFolder.pending`) and judged
when their tensors are first used (:func:`~lightning_bigmodel.offload._reuse.wait_on_first_use`), with the same
refusal and the same drop. Why CRC-32 (``zlib.crc32``) and not blake2b or xxhash: it is in the standard library
(xxhash would be a new dependency), releases the GIL, and hashed 4.5x faster than ``hashlib.blake2b`` here (2.2 vs
0.5 GiB/s), which is most of what reusing a folder costs; it catches every accidental change of up to 32 bits and any
other with odds 1 - 2**-32. A cryptographic hash would add no protection: whoever can
rewrite a file in the folder can rewrite the manifest beside it.

Nothing in the folder is followed through a symbolic link: files, manifest and lock are opened ``O_NOFOLLOW``,
temporary files created ``O_EXCL``; a link in place of a listed file is replaced, and ``.lock`` as a link is refused.

Crash safety: the manifest is removed before the first write of a session and rewritten at its end, so a process
killed part way leaves no manifest (the next run rebuilds what it needs) and, at worst, a temporary file, which the
next process to open the folder deletes. A folder that cannot be written or runs out of space raises
:class:`OffloadFolderError` naming it; the manifest then lists exactly the complete files present.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lightning_bigmodel._atomic import TMP_PATTERN, atomic_write, fsync_dir

from lightning_bigmodel.checkpoint.safetensors_view import open_mmap, view
from lightning_bigmodel.checkpoint.shard import ShardHandle, ensure_descriptors
from lightning_bigmodel.offload._files import (  # noqa: F401 (re-exported: the public names live here)
    OffloadFolderError,
    _folder_error,
    _link_error,
    _nofollow,
    _save_aligned,
    source_identity,
)
from lightning_bigmodel.offload._manifest import entry_problem, layout_of
from lightning_bigmodel.offload._reuse import BackgroundChecksums, PendingCheck, mismatch_error, open_checked

try:  # POSIX only; elsewhere a folder is not protected against concurrent writers
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MANIFEST = "offload_index.json"
_LOCK = ".lock"
_VERSION = 2  # 2: checksums, header layouts, inode/ctime identities
DESCRIPTORS_PER_FILE = 2  # a file's handle while loading, plus the read-ahead's track of its map
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_TMP = TMP_PATTERN  # what `atomic_write` names its temporary files
_FILE_SLACK = 4096  # per file, on top of its tensor bytes, when checking free space: header plus a filesystem block


def _fault_point(stage: str, path: Path) -> None:
    """Test seam, a no-op: called with ``"tmp-written"`` (temporary file complete, not yet renamed) and ``"committed"``
    (renamed into place). Fault-injection tests replace it to kill the process at these points."""


def _write_atomic(path: Path, write) -> None:
    atomic_write(path, write, before_commit=lambda tmp: _fault_point("tmp-written", tmp))
    _fault_point("committed", path)


class OffloadFolder:
    """Write-once store of safetensors files in ``folder``. Use as a context manager: it holds the folder's lock.

    Args:
        folder: where the files go (created if needed).
        source: identity of what the tensors come from (:func:`source_identity`), or ``None`` when it cannot be
            identified (weights built in memory): then nothing is ever reused.
        defer_checks: start the checksums of reused files when the folder closes and leave them running, in
            :attr:`pending`.
    """

    def __init__(
        self, folder: Union[str, Path], source: Optional[list[dict[str, Any]]], defer_checks: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.defer_checks = defer_checks
        self.pending: dict[str, PendingCheck] = {}  # with `defer_checks`: the checks left to judge at first use
        self.source = source
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock_file = None
        self._dirty = False
        self._written: list[Path] = []  # files written in this session (removed if the manifest cannot be saved)
        self._unwritable: Optional[OffloadFolderError] = None
        self._handles: dict[str, ShardHandle] = {}  # tensor name -> its file, opened once (checked, or just written)
        self._checks = BackgroundChecksums(deferred=defer_checks)  # of the reused files

    verify_checksums = True  # set to False only to measure what verification costs (benchmarks)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "OffloadFolder":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.folder / _LOCK, "a+", opener=_nofollow)
        except OSError as err:
            if err.errno == errno.ELOOP:  # a planted link: following it would create its target outside the folder
                raise _link_error(self.folder / _LOCK) from err
            raise _folder_error(self.folder, "creating it and its lock file", err) from err
        try:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
            self._remove_stale_tmp()
            self._unwritable = self._probe_writable()
            self.entries = self._read_manifest()
            if self._unwritable is not None and not self.entries:
                raise self._unwritable  # nothing to reuse: fail before the caller places anything
            ensure_descriptors(DESCRIPTORS_PER_FILE * len(self.entries), f"Offload folder {str(self.folder)!r}")
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Wait for the checksums of reused files (a mismatch drops their entries and raises, unless another error is
        propagating), record the complete files, release the lock."""
        failing = exc_type is not None
        try:
            if self.defer_checks and not failing:
                self.pending, mismatch = self._checks.hand_over(self.folder, self.entries, drop_files), None
            else:
                mismatch = self._finish_checks(abort=failing)
            if self._dirty:
                self._save_manifest(failing=failing)
            if mismatch is not None and not failing:
                raise mismatch
        finally:
            self._handles.clear()  # maps made from them need no descriptor
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_file is None:
            return
        if fcntl is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self._lock_file.close()
        self._lock_file = None

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files of writers that died (we hold the lock: no live writer has any), links included."""
        for path in self.folder.iterdir():
            if _TMP.match(path.name) and (path.is_symlink() or path.is_file()):
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # an unwritable folder: reported by the probe
                    pass

    def _probe_writable(self) -> Optional[OffloadFolderError]:
        """The error writing a file in the folder would raise, or ``None``. Raised at once when the folder holds nothing
        reusable; a complete folder that cannot be written is still read (the error comes with a write, if any)."""
        probe = self.folder / f".probe.{os.getpid()}.tmp"
        try:
            probe.unlink(missing_ok=True)  # a link planted under its name is removed, never written through
            with open(probe, "wb", opener=_nofollow) as f:
                f.write(b"0")
        except OSError as err:
            error = _folder_error(self.folder, f"creating the test file {probe.name!r}", err)
            error.__cause__ = err
            return error
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
        return None

    def ensure_space(self, nbytes: int, files: int = 1) -> None:
        """Raise :class:`OffloadFolderError` unless the folder's disk has room for ``files`` files holding ``nbytes``
        tensor bytes. Call it before placing anything, so that a full disk fails the load before it starts."""
        ensure_descriptors(DESCRIPTORS_PER_FILE * files, f"Writing {files} file(s) to offload folder {str(self.folder)!r}")
        needed = nbytes + files * _FILE_SLACK
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            err = OSError(errno.ENOSPC, f"needs {needed} bytes, {free} free")
            raise _folder_error(self.folder, f"checking room for {files} offloaded tensor(s)", err)

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST
        try:
            with open(path, "rb", opener=_nofollow) as f:
                manifest = json.loads(f.read())
        except (OSError, ValueError) as err:
            if isinstance(err, OSError) and err.errno == errno.ELOOP and self._unwritable is None:
                path.unlink(missing_ok=True)  # a link in place of the manifest: like a torn one, rebuilt
            return {}
        tensors = manifest.get("tensors") if isinstance(manifest, dict) else None
        if (
            self.source is None
            or not isinstance(manifest, dict)
            or manifest.get("version") != _VERSION
            or manifest.get("source") != self.source
            or not isinstance(tensors, dict)
            or any(entry_problem(name, entry) is not None for name, entry in tensors.items())
        ):
            if self._unwritable is None:  # else it cannot be cleared: the caller gets the probe's error
                self._clear(manifest.get("tensors") if isinstance(manifest, dict) else None)
            return {}
        return manifest["tensors"]

    def _clear(self, stale: Optional[dict[str, Any]]) -> None:
        """Forget a manifest written for another source, and delete the files it listed."""
        (self.folder / MANIFEST).unlink(missing_ok=True)
        for entry in (stale or {}).values():
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and name and not _UNSAFE.search(name) and not name.startswith("."):
                (self.folder / name).unlink(missing_ok=True)  # unlink removes a link itself, never its target

    def _save_manifest(self, failing: bool) -> None:
        """Record the complete files. If even that fails, delete this session's files: the folder then holds no
        manifest and no file it would have listed. While another error propagates (``failing``), raise nothing."""
        manifest = {"version": _VERSION, "source": self.source, "tensors": self.entries}
        try:
            _write_atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
            fsync_dir(self.folder)
        except OSError as err:
            for path in self._written:
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # pragma: no cover
                    pass
            if not failing:
                raise _folder_error(self.folder, f"writing {MANIFEST!r}", err) from err
        self._dirty = False

    # ------------------------------------------------------------------ tensors
    def has(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        key: Optional[str] = None,
        form: Optional[dict] = None,
    ) -> bool:
        """Whether a reusable file for ``name`` (read from source ``key``) with this shape and dtype is there; ``form``
        identifies a stored form written by :meth:`write_parts` (e.g. a quantization), ``None`` a plain tensor.

        The file is opened once (never through a link), its size and header checked against the entry, and its
        checksum verified in the background (the folder's exit waits for it). A file that fails a check is not
        reusable: the caller writes it again (a link in its place is removed)."""
        entry = self.entries.get(name)
        if entry is None:
            return False
        found = (entry.get("shape"), entry.get("dtype"), entry.get("key"), entry.get("form"))
        if found != (list(shape), str(dtype), key, form):
            return False
        if name in self._handles:
            return True
        handle = open_checked(self.folder, entry, remove_links=self._unwritable is None)
        if handle is None:
            self.entries.pop(name)
            if self._unwritable is None:  # else the rewrite fails with the folder's error, the manifest untouched
                self._begin_changes()
            return False
        self._handles[name] = handle
        if self.verify_checksums:
            self._checks.start(name, handle)
        return True

    def _finish_checks(self, abort: bool) -> Optional[OffloadFolderError]:
        """Wait for the background checksums; drop the entries (and files) that do not match. Returns the error to
        raise, naming them, or ``None``. With ``abort`` the checks still running stop early (nothing is judged)."""
        expected = {name: entry["crc32"] for name, entry in self.entries.items()}
        bad = [self.entries.pop(name)["file"] for name in self._checks.finish(expected, abort)]
        if not bad:
            return None
        self._begin_changes()
        for file in bad:
            try:
                (self.folder / file).unlink(missing_ok=True)
            except OSError:  # a read-only folder: the entry is gone from the manifest all the same, if it can be saved
                pass
        return mismatch_error(self.folder, bad, "the model was left as before this call")

    def write(self, name: str, tensor: torch.Tensor, key: Optional[str] = None) -> torch.Tensor:
        """Write ``tensor`` as ``name`` (from source ``key``, replacing any previous file); return its mapped view."""
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "key": key}
        self._write_file(name, {"tensor": tensor}, entry)
        return self.view(name)

    def write_parts(
        self,
        name: str,
        parts: dict[str, torch.Tensor],
        like: torch.Tensor,
        form: dict[str, Any],
        meta: dict[str, Any],
        key: Optional[str] = None,
    ) -> dict[str, torch.Tensor]:
        """Write the plain ``parts`` of a tensor stored in another form (e.g. quantized), in one file; return views.

        Args:
            name: the model tensor's name.
            parts: its inner tensors (``{"qdata": ..., "scale": ...}``).
            like: the logical tensor (its shape and dtype key the entry, as for :meth:`write`).
            form: JSON identity of the stored form; :meth:`has` reuses the entry only for the same ``form``.
            meta: JSON data needed to rebuild the tensor from its parts (given back by :meth:`view_parts`).
            key: the source checkpoint key.
        """
        entry = {"shape": list(like.shape), "dtype": str(like.dtype), "key": key, "form": form, "meta": meta}
        self._write_file(name, parts, entry)
        return self.view_parts(name)[0]

    def _write_file(self, name: str, tensors: dict[str, torch.Tensor], entry: dict[str, Any]) -> None:
        if self._lock_file is None:
            raise RuntimeError("OffloadFolder.write() needs the folder open: use `with OffloadFolder(...) as store:`.")
        if self._unwritable is not None:
            raise self._unwritable
        file_name = _UNSAFE.sub("_", name) + ".safetensors"
        if file_name.startswith("."):
            file_name = "_" + file_name[1:]  # never a hidden name (the lock, temporary files)
        path = self.folder / file_name
        digest = []
        try:
            self._begin_changes()
            self.entries.pop(name, None)
            self._handles.pop(name, None)
            _write_atomic(path, lambda tmp: digest.append(_save_aligned(tensors, tmp)))
            handle = ShardHandle(path, nofollow=True)  # the file just renamed into place (we hold the lock)
        except OSError as err:
            raise _folder_error(self.folder, f"writing {file_name!r} (tensor `{name}`)", err) from err
        self._written.append(path)
        self._handles[name] = handle
        self.entries[name] = {
            "file": file_name, **entry, "size": handle.size, "crc32": digest[0], "layout": layout_of(handle.header),
        }  # fmt: skip

    def _begin_changes(self) -> None:
        """Remove the manifest before the first change of a session: a crash from here on leaves no stale claim (the
        exit writes it again). In a folder that cannot be written the change fails later, with its own error."""
        if not self._dirty:
            try:
                (self.folder / MANIFEST).unlink(missing_ok=True)
            except OSError:
                if self._unwritable is None:
                    raise
            self._dirty = True

    def _handle(self, name: str) -> ShardHandle:
        handle = self._handles.get(name)
        if handle is None:  # an entry reused without `has` (callers check first): open and check it now
            handle = open_checked(self.folder, self.entries[name], remove_links=self._unwritable is None)
            if handle is None:
                raise OffloadFolderError(
                    f"Offload file {self.entries[name]['file']!r} in {str(self.folder)!r} does not hold what its "
                    "manifest says. Run the load again: it rewrites the file."
                )
            self._handles[name] = handle
        return handle

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy CPU view of a stored tensor (private copy-on-write map: writes never reach the file), mapped from
        the file opened and checked by :meth:`has` or :meth:`write`."""
        handle = self._handle(name)
        return view(open_mmap(handle.path, handle), handle.header.entries["tensor"])

    def view_parts(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Zero-copy views of the parts :meth:`write_parts` stored for ``name``, and its ``meta``."""
        handle = self._handle(name)
        mapping = open_mmap(handle.path, handle)
        parts = {part: view(mapping, info) for part, info in handle.header.entries.items()}
        return parts, self.entries[name].get("meta", {})


def drop_files(folder: Path, files: dict[str, tuple[str, tuple[int, int]]]) -> None:
    """Remove ``files`` (name -> (CRC-32 recorded, (device, inode) found mismatching)) from the manifest of the
    offload folder, then from the folder, under its lock; an entry or file rewritten since is left. Best effort: where
    the folder cannot be written, the next reuse checks the file again and refuses it the same way."""
    try:
        with open(folder / _LOCK, "a+", opener=_nofollow) as lock:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            path = folder / MANIFEST
            try:
                with open(path, "rb", opener=_nofollow) as f:
                    manifest = json.loads(f.read())
                tensors = manifest["tensors"]
                bad = {(name, crc) for name, (crc, _) in files.items()}
                kept = {k: e for k, e in tensors.items() if (e.get("file"), e.get("crc32")) not in bad}
            except (OSError, ValueError, TypeError, KeyError, AttributeError):  # no (valid) manifest: nothing listed
                kept = tensors = None
            if kept is not None and len(kept) != len(tensors):
                manifest["tensors"] = kept
                _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
                fsync_dir(folder)
            for name, (_, inode) in files.items():
                try:
                    stat = os.stat(folder / name, follow_symlinks=False)
                    if (stat.st_dev, stat.st_ino) == inode:
                        (folder / name).unlink()
                except OSError:  # gone already, or a read-only folder
                    pass
    except OSError:
        pass
