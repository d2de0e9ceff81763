"""An offload folder: tensors written once as safetensors files, then used as zero-copy memory-mapped views.

Only tensors that cannot be referenced in place (a ``.bin`` checkpoint, a dtype conversion, weights of a model built
in memory) are written here. Each tensor is one file written atomically (temporary file, ``fsync``, ``os.replace``);
``offload_index.json`` records every tensor's file, shape and dtype, plus the identity of the source checkpoint (path,
size and modification time of each of its files). A rerun over the same source reuses the entries it finds; a folder
written for another source is cleared first. An exclusive ``fcntl.flock`` on ``.lock`` serialises processes sharing a
folder; views handed out stay valid when another process replaces a file later (they map the old inode).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

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


def source_identity(files: Sequence[Union[str, Path]]) -> list[dict[str, Any]]:
    """What identifies a checkpoint's content cheaply: resolved path, size and ``mtime_ns`` of each file."""
    out = []
    for file in files:
        stat = os.stat(file)
        out.append({"path": str(Path(file).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_aligned(tensor: torch.Tensor, path: Path) -> None:
    """Write ``tensor`` as a one-entry safetensors file named ``"tensor"`` whose data starts 64-byte aligned.

    The format allows padding the JSON header with spaces; the safetensors library reads such files as usual.
    """
    data = tensor.detach().to("cpu").contiguous()
    nbytes = data.numel() * data.element_size()
    header = {"tensor": {"dtype": DTYPE_CODES[data.dtype], "shape": list(data.shape), "data_offsets": [0, nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if nbytes:
            f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "OffloadFolder":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(
                f"`offload_folder` {str(self.folder)!r} cannot be created ({err}). Pass a writable folder."
            ) from err
        self._lock_file = open(self.folder / _LOCK, "a+")
        if fcntl is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
        self.entries = self._read_manifest()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._dirty:
                self._write_manifest()
        finally:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

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

    def _write_manifest(self) -> None:
        manifest = {"version": _VERSION, "source": self.source, "tensors": self.entries}
        _write_atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        _fsync_dir(self.folder)
        self._dirty = False

    # ------------------------------------------------------------------ tensors
    def has(self, name: str, shape: Sequence[int], dtype: torch.dtype, key: Optional[str] = None) -> bool:
        """Whether a reusable file for ``name`` (read from source ``key``) with this shape and dtype is there."""
        entry = self.entries.get(name)
        if entry is None:
            return False
        if (entry.get("shape"), entry.get("dtype"), entry.get("key")) != (list(shape), str(dtype), key):
            return False
        file = self.folder / entry["file"]
        return file.is_file() and file.stat().st_size == entry.get("size")

    def write(self, name: str, tensor: torch.Tensor, key: Optional[str] = None) -> torch.Tensor:
        """Write ``tensor`` as ``name`` (from source ``key``, replacing any previous file); return its mapped view."""
        if self._lock_file is None:
            raise RuntimeError("OffloadFolder.write() needs the folder open: use `with OffloadFolder(...) as store:`.")
        if not self._dirty:
            (self.folder / MANIFEST).unlink(missing_ok=True)  # a crash from here on leaves no stale manifest
            self._dirty = True
        self.entries.pop(name, None)
        file_name = _UNSAFE.sub("_", name) + ".safetensors"
        path = self.folder / file_name
        _write_atomic(path, lambda tmp: _save_aligned(tensor, tmp))
        self.entries[name] = {
            "file": file_name,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype),
            "key": key,
            "size": path.stat().st_size,
        }
        return self.view(name)

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy CPU view of a stored tensor (private copy-on-write map: writes never reach the file)."""
        path = self.folder / self.entries[name]["file"]
        return view(open_mmap(path), read_header(path).entries["tensor"])
