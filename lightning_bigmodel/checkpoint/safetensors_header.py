"""The safetensors header: its strict parser and what it describes (dtypes, tensor entries and their byte ranges).

Apart from :mod:`~lightning_bigmodel.checkpoint.safetensors_view` (which maps files and views tensors) so that
:class:`~lightning_bigmodel.checkpoint.shard.ShardHandle` parses the header it reads without importing the views (they
open their files through it). ``safetensors_view`` re-exports these names.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_bigmodel.checkpoint.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20  # the limit of the safetensors format itself

_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    entries: dict[str, TensorEntry]  # in header order
    metadata: Optional[dict[str, str]]
    data_start: int  # 8 + header length


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"Safetensors file {str(path)!r} is corrupt or truncated: {why}. Re-download or re-save it."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _entry(path: Path, name: str, info: Any, data_len: int, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, f"entry {name!r} is {info!r}, expected {{'dtype', 'shape', 'data_offsets'}}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(path, f"entry {name!r} has unknown dtype {dtype!r} (known: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _corrupt(path, f"entry {name!r} has shape {shape!r}, expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _corrupt(path, f"entry {name!r} has data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _corrupt(path, f"entry {name!r} has data_offsets {offsets!r} outside the {data_len}-byte data section")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise _corrupt(path, f"entry {name!r} spans {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
    return TensorEntry(DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: Path, entries: dict[str, TensorEntry]) -> None:
    previous_end, previous = -1, ""
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < previous_end and entry.end > entry.begin:
            raise _corrupt(path, f"entries {previous!r} and {name!r} overlap")
        if entry.end > entry.begin:
            previous_end, previous = entry.end, name


def parse_header(path: Path, prefix: bytes, size: int) -> tuple[SafetensorsHeader, bytes]:
    """Parse and validate a header from ``prefix`` (the file's first bytes: the 8-byte length and the JSON, or what the
    file holds of them) of a ``size``-byte file; return it with the exact header bytes.

    Raises:
        CheckpointError: the file is empty, truncated or its header is malformed (named in the message).
    """
    path = Path(path)
    if size < 8:
        raise _corrupt(path, f"it has {size} bytes, fewer than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > min(size - 8, MAX_HEADER_BYTES) or len(prefix) < 8 + length:
        raise _corrupt(path, f"its header claims {length} bytes but the file has {size} bytes")
    raw = prefix[8 : 8 + length]
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as err:
        raise _corrupt(path, f"its header is not valid JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise _corrupt(path, f"its __metadata__ {metadata!r} is not a string-to-string object")
    data_start = 8 + length
    entries = {name: _entry(path, name, info, size - data_start, data_start) for name, info in header.items()}
    _check_no_overlap(path, entries)
    return SafetensorsHeader(path=path, entries=entries, metadata=metadata, data_start=data_start), prefix[:data_start]
