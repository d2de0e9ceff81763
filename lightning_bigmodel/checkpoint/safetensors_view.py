"""Strict safetensors header parsing and zero-copy views over the file's memory map.

Why by hand: the ``safetensors`` torch API (``safe_open(...).get_tensor``, ``load_file``) always returns a copy; it
offers no tensor that stays backed by the file. Disk-offloaded weights need exactly that (the page cache does the work,
no second copy in RAM), so the header is parsed here (by :mod:`~lightning_bigmodel.checkpoint.safetensors_header`,
whose names this module re-exports) and ``torch.frombuffer`` wraps the memory map.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lightning_bigmodel.checkpoint.safetensors_header import (  # noqa: F401 (re-exported: the public names live here)
    DTYPE_CODES,
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorEntry,
    parse_header,
)
from lightning_bigmodel.checkpoint.shard import ShardHandle
from lightning_bigmodel.offload.pages import track_file


def read_header(path: Path, handle=None) -> SafetensorsHeader:
    """Parse and validate the header of ``path`` (read from ``handle``, a
    :class:`~lightning_bigmodel.checkpoint.shard.ShardHandle`, when given) without reading any tensor data."""
    if handle is None:
        handle = ShardHandle(path, safetensors=False)
        try:
            return handle.parse_header().header
        finally:
            handle.close()
    return handle.parse_header().header if handle.header is None else handle.header


def open_mmap(path: Path, handle=None):
    """A private copy-on-write map of the whole file: writes to views never reach the file (or other processes).

    Made from ``handle`` (a :class:`~lightning_bigmodel.checkpoint.shard.ShardHandle`) when given, so the map is of
    the file that was opened and checked, whatever the path names now; the map itself holds no descriptor.
    """
    own = handle is None
    handle = ShardHandle(path, safetensors=False) if own else handle
    try:
        mapping = handle.map()
        track_file(mapping, handle.fd)  # read-ahead and release of disk weights advise exactly their file range
    finally:
        if own:
            handle.close()
    return mapping


def view(mapping, entry: TensorEntry) -> torch.Tensor:
    """Zero-copy CPU tensor over ``mapping`` for ``entry``.

    ``torch.frombuffer`` holds a reference to ``mapping``, so the map stays open as long as any view lives, whatever
    happens to the reader that created it. An entry whose offset is not a multiple of its itemsize (legal in the
    format, never written by the safetensors library) is copied instead of viewed.
    """
    numel = math.prod(entry.shape)
    if numel == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if entry.begin % entry.dtype.itemsize:
        raw = bytearray(mapping[entry.begin : entry.end])
        return torch.frombuffer(raw, dtype=entry.dtype, count=numel).view(entry.shape)
    flat = torch.frombuffer(mapping, dtype=entry.dtype, count=numel, offset=entry.begin)
    return flat.view(entry.shape)
