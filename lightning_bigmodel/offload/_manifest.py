"""The offload folder's manifest schema and the check of a reused file's header against its entry.

An entry is ``{"file", "shape", "dtype", "key", "size", "crc32", "layout"}`` (plus ``"form"`` and ``"meta"`` for a
tensor stored in another form): ``layout`` is ``{part: [dtype code, shape]}`` of the file's safetensors header.
A manifest with any entry of another shape is invalid as a whole, like a torn one: the folder is rebuilt.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # what `OffloadFolder` names its files
_HEX = re.compile(r"^[0-9a-f]{8}$")


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(type(d) is int and d >= 0 for d in value)


def _layout_problem(layout: Any) -> Optional[str]:
    if not isinstance(layout, dict) or not layout:
        return f"layout {layout!r} is not a non-empty object"
    for part, spec in layout.items():
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and _is_shape(spec[1])):
            return f"layout of part {part!r} is {spec!r}, expected [dtype, shape]"
    return None


def entry_problem(name: Any, entry: Any) -> Optional[str]:
    """Why manifest ``entry`` for tensor ``name`` is malformed, or ``None`` when its schema is valid."""
    if not isinstance(name, str) or not isinstance(entry, dict):
        return f"entry {name!r} is a {type(entry).__name__}, expected an object"
    file = entry.get("file")
    if not isinstance(file, str) or not SAFE_NAME.match(file) or not file.endswith(".safetensors"):
        return f"entry {name!r} names file {file!r}, not a plain file name of this folder"
    if not _is_shape(entry.get("shape")):
        return f"entry {name!r} has shape {entry.get('shape')!r}"
    if not isinstance(entry.get("dtype"), str) or not str(entry["dtype"]).startswith("torch."):
        return f"entry {name!r} has dtype {entry.get('dtype')!r}"
    if entry.get("key") is not None and not isinstance(entry["key"], str):
        return f"entry {name!r} has source key {entry['key']!r}"
    if type(entry.get("size")) is not int or entry["size"] < 8:
        return f"entry {name!r} has size {entry.get('size')!r}"
    if not isinstance(entry.get("crc32"), str) or not _HEX.match(entry["crc32"]):
        return f"entry {name!r} has checksum {entry.get('crc32')!r}"
    if ("form" in entry or "meta" in entry) and not isinstance(entry.get("meta", {}), dict):
        return f"entry {name!r} has meta {entry.get('meta')!r}"
    return _layout_problem(entry.get("layout"))


def layout_of(header) -> dict[str, list]:
    """``{part: [dtype code, shape]}`` of a parsed safetensors header (JSON, as stored in the manifest)."""
    from lightning_bigmodel.checkpoint.safetensors_view import DTYPE_CODES

    return {name: [DTYPE_CODES[e.dtype], list(e.shape)] for name, e in header.entries.items()}


def header_problem(entry: dict[str, Any], header) -> Optional[str]:
    """Why a reused file's parsed ``header`` does not hold what ``entry`` says, or ``None``.

    A plain tensor's single part must have the entry's shape and dtype; every file's parts must match its layout."""
    found = layout_of(header)
    if found != entry["layout"]:
        return f"its header holds {found}, the manifest recorded {entry['layout']}"
    if "form" not in entry:
        part = found.get("tensor")
        expected = [str(entry["dtype"]).removeprefix("torch."), entry["shape"]]
        if part is None or [_torch_name(part[0]), part[1]] != expected:
            return f"its header holds {found}, expected one tensor of shape {entry['shape']} and {entry['dtype']}"
    return None


def _torch_name(code: str) -> str:
    from lightning_bigmodel.checkpoint.safetensors_view import DTYPES

    dtype = DTYPES.get(code)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else code
