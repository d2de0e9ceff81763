"""An offload folder: tensors written once as safetensors files, then used as zero-copy memory-mapped views.

Only tensors that cannot be referenced in place (a ``.bin`` checkpoint, a dtype conversion, weights of a model built
in memory) are written here. Each tensor is one file written atomically (temporary file, ``fsync``, ``os.replace``);
``offload_index.json`` records every tensor's file, shape and dtype, plus the identity of the source checkpoint (path,
size and modification time of each of its files). A rerun over the same source reuses the entries it finds; a folder
written for another source is cleared first. An exclusive ``fcntl.flock`` on ``.lock`` serialises processes sharing a
folder; views handed out stay valid when another process replaces a file later (they map the old inode).

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
import struct
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from lightning_bigmodel._atomic import TMP_PATTERN, atomic_write, fsync_dir

from lightning_bigmodel.checkpoint.safetensors_view import DTYPE_CODES, open_mmap, read_header, view

try:  # POSIX only; elsewhere a folder is not protected against concurrent writers
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MANIFEST = "offload_index.json"
_LOCK = ".lock"
_VERSION = 1
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_ALIGN = 64  # data offset of every file: views are as aligned as a fresh allocation (same kernels, same results)
_TMP = TMP_PATTERN  # what `atomic_write` names its temporary files
_FILE_SLACK = 4096  # per file, on top of its tensor bytes, when checking free space: header plus a filesystem block


class OffloadFolderError(ValueError, OSError):
    """An offload folder cannot be created, written or filled (``errno`` is the cause's, when there is one)."""


def _fault_point(stage: str, path: Path) -> None:
    """Test seam, a no-op: called with ``"tmp-written"`` (temporary file complete, not yet renamed) and ``"committed"``
    (renamed into place). Fault-injection tests replace it to kill the process at these points."""


def source_identity(files: Sequence[Union[str, Path]]) -> list[dict[str, Any]]:
    """What identifies a checkpoint's content cheaply: resolved path, size and ``mtime_ns`` of each file."""
    out = []
    for file in files:
        stat = os.stat(file)
        out.append({"path": str(Path(file).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` as one safetensors file whose data starts 64-byte aligned.

    The format allows padding the JSON header with spaces; the safetensors library reads such files as usual. Several
    tensors (the parts of a quantized weight) go widest element first, so each starts at a multiple of its itemsize
    (the format allows no gaps between them).
    """
    datas = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    order = sorted(datas, key=lambda name: -datas[name].element_size())
    header, offset = {}, 0
    for name in order:
        data = datas[name]
        nbytes = data.numel() * data.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[data.dtype], "shape": list(data.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            if datas[name].numel():
                f.write(memoryview(datas[name].reshape(-1).view(torch.uint8).numpy()))


def _write_atomic(path: Path, write) -> None:
    atomic_write(path, write, before_commit=lambda tmp: _fault_point("tmp-written", tmp))
    _fault_point("committed", path)


def _folder_error(folder: Path, doing: str, err: OSError) -> OffloadFolderError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "Free space there, or pass an `offload_folder` on a disk with room for the offloaded weights."
        what = "ran out of space"
    else:
        fix = "Pass a writable `offload_folder` (check its permissions and that its parents are folders)."
        what = "is not writable"
    out = OffloadFolderError(f"`offload_folder` {str(folder)!r} {what} while {doing} ({err}). {fix}")
    out.errno = err.errno
    return out


class OffloadFolder:
    """Write-once store of safetensors files in ``folder``. Use as a context manager: it holds the folder's lock.

    Args:
        folder: where the files go (created if needed).
        source: identity of what the tensors come from (:func:`source_identity`), or ``None`` when it cannot be
            identified (weights built in memory): then nothing is ever reused.
    """

    def __init__(self, folder: Union[str, Path], source: Optional[list[dict[str, Any]]]) -> None:
        self.folder = Path(folder)
        self.source = source
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock_file = None
        self._dirty = False
        self._written: list[Path] = []  # files written in this session (removed if the manifest cannot be saved)
        self._unwritable: Optional[OffloadFolderError] = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "OffloadFolder":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.folder / _LOCK, "a+")
        except OSError as err:
            raise _folder_error(self.folder, "creating it and its lock file", err) from err
        try:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
            self._remove_stale_tmp()
            self._unwritable = self._probe_writable()
            self.entries = self._read_manifest()
            if self._unwritable is not None and not self.entries:
                raise self._unwritable  # nothing to reuse: fail before the caller places anything
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if self._dirty:
                self._save_manifest(failing=exc_type is not None)
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self._lock_file is None:
            return
        if fcntl is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
        self._lock_file.close()
        self._lock_file = None

    def _remove_stale_tmp(self) -> None:
        """Delete temporary files of writers that died (we hold the lock: no live writer has any)."""
        for path in self.folder.iterdir():
            if _TMP.match(path.name) and path.is_file():
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # an unwritable folder: reported by the probe
                    pass

    def _probe_writable(self) -> Optional[OffloadFolderError]:
        """The error writing a file in the folder would raise, or ``None``. Raised at once when the folder holds nothing
        reusable; a complete folder that cannot be written is still read (the error comes with a write, if any)."""
        probe = self.folder / f".probe.{os.getpid()}.tmp"
        try:
            with open(probe, "wb") as f:
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
        needed = nbytes + files * _FILE_SLACK
        free = shutil.disk_usage(self.folder).free
        if free < needed:
            err = OSError(errno.ENOSPC, f"needs {needed} bytes, {free} free")
            raise _folder_error(self.folder, f"checking room for {files} offloaded tensor(s)", err)

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if (
            self.source is None
            or not isinstance(manifest, dict)
            or manifest.get("version") != _VERSION
            or manifest.get("source") != self.source
            or not isinstance(manifest.get("tensors"), dict)
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
            if isinstance(name, str) and not _UNSAFE.search(name) and not name.startswith("."):
                (self.folder / name).unlink(missing_ok=True)

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
        identifies a stored form written by :meth:`write_parts` (e.g. a quantization), ``None`` a plain tensor."""
        entry = self.entries.get(name)
        if entry is None:
            return False
        found = (entry.get("shape"), entry.get("dtype"), entry.get("key"), entry.get("form"))
        if found != (list(shape), str(dtype), key, form):
            return False
        file = self.folder / entry["file"]
        return file.is_file() and file.stat().st_size == entry.get("size")

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
        path = self.folder / file_name
        try:
            if not self._dirty:
                (self.folder / MANIFEST).unlink(missing_ok=True)  # a crash from here on leaves no stale manifest
                self._dirty = True
            self.entries.pop(name, None)
            _write_atomic(path, lambda tmp: _save_aligned(tensors, tmp))
        except OSError as err:
            raise _folder_error(self.folder, f"writing {file_name!r} (tensor `{name}`)", err) from err
        self._written.append(path)
        self.entries[name] = {"file": file_name, **entry, "size": path.stat().st_size}

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy CPU view of a stored tensor (private copy-on-write map: writes never reach the file)."""
        path = self.folder / self.entries[name]["file"]
        return view(open_mmap(path), read_header(path).entries["tensor"])

    def view_parts(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Zero-copy views of the parts :meth:`write_parts` stored for ``name``, and its ``meta``."""
        entry = self.entries[name]
        path = self.folder / entry["file"]
        mapping = open_mmap(path)
        parts = {part: view(mapping, info) for part, info in read_header(path).entries.items()}
        return parts, entry.get("meta", {})
