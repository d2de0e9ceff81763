"""Files of an offload folder: the error type, how a file is written (aligned safetensors, its CRC-32 taken while
writing), how a checkpoint is identified, and opening without following links."""

from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from lightning_bigmodel.checkpoint.resolve import is_safetensors
from lightning_bigmodel.checkpoint.safetensors_view import DTYPE_CODES
from lightning_bigmodel.checkpoint.shard import ShardHandle

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_ALIGN = 64  # data offset of every file: views are as aligned as a fresh allocation (same kernels, same results)


class OffloadFolderError(ValueError, OSError):
    """An offload folder cannot be created, written or filled (``errno`` is the cause's, when there is one)."""


def source_identity(files: Sequence[Union[str, Path, ShardHandle]]) -> list[dict[str, Any]]:
    """What identifies a checkpoint's content cheaply: per file, its resolved path, size, inode, device, ctime, mtime
    and a digest of its safetensors header (:meth:`ShardHandle.identity`). A file copied over another with the same size
    and mtime (``cp -p``) has a new inode or ctime. Pass the open handles of a reader to identify what it reads."""
    out = []
    for file in files:
        if isinstance(file, ShardHandle):
            out.append(file.identity())
            continue
        handle = ShardHandle(file, safetensors=is_safetensors(file))
        try:
            out.append(handle.identity())
        finally:
            handle.close()
    return out


def _save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write ``tensors`` as one safetensors file whose data starts 64-byte aligned; return the CRC-32 of its bytes.

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
    crc = 0
    with open(path, "wb") as f:
        for chunk in [struct.pack("<Q", len(raw)), raw] + [
            memoryview(datas[name].reshape(-1).view(torch.uint8).numpy()) for name in order if datas[name].numel()
        ]:
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)  # while writing: the bytes are never read back to be hashed
    return f"{crc:08x}"


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


def _nofollow(path: str, flags: int) -> int:
    """``opener`` for :func:`open` that never follows a symbolic link at the last component (``ELOOP`` instead)."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o644)


def _link_error(path: Path) -> OffloadFolderError:
    try:
        target = f" (to {os.readlink(path)!r})"
    except OSError:
        target = ""
    out = OffloadFolderError(
        f"{str(path)!r} in the offload folder is a symbolic link{target}. Nothing in an offload folder is followed "
        "through a link: remove it (the library recreates the file)."
    )
    out.errno = errno.ELOOP
    return out
