"""Turn what a user passes as ``checkpoint`` into a list of files and a weight map."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Optional, Union

from lightning_bigmodel.checkpoint.errors import CheckpointError, CheckpointNotFoundError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# What a folder is searched for, best first (Hugging Face names, then the plain accelerate-docs index).
FOLDER_PREFERENCE = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "index.json",
)
_HUB_PATTERNS = (
    ["*.safetensors", "*.safetensors.index.json", "config.json"],
    ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "index.json", "config.json"],
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MAX_INDEX_BYTES = 512 * 2**20


@dataclass(frozen=True)
class ResolvedCheckpoint:
    root: Path  # folder that holds every file (shard paths may not escape it)
    files: tuple[Path, ...]  # absolute shard paths, in index order
    weight_map: Optional[dict[str, Path]]  # tensor name -> file, when an index gave one (else None: read headers)
    index: Optional[Path] = None  # the index JSON, if any
    metadata: Optional[dict[str, Any]] = None  # the index's "metadata" object (HF format), if any


def is_safetensors(path: Union[str, Path]) -> bool:
    """Whether ``path`` names a safetensors file (by its suffix; every other weight suffix is a pickle)."""
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def resolve_checkpoint(checkpoint: Union[str, Path, ResolvedCheckpoint]) -> ResolvedCheckpoint:
    """Accept a ``.safetensors``/``.bin``/``.pt``/``.ckpt`` file, a folder (one file or a sharded set with its index),
    an index JSON in HF (``{"metadata", "weight_map"}``) or plain (``{name: file}``) format, or a Hub repo id
    (``huggingface_hub.snapshot_download``, honouring ``HF_HUB_OFFLINE`` and the cache).

    Every shard an index names must stay inside the index's folder (after following symlinks).

    Raises:
        CheckpointNotFoundError: (a ``FileNotFoundError``) the path, a shard, or the Hub repo cannot be found.
        CheckpointError: (a ``ValueError``) an ambiguous folder, a malformed index or a shard path escaping the folder.
    """
    if isinstance(checkpoint, ResolvedCheckpoint):
        return checkpoint
    text = str(checkpoint)
    path = Path(text).expanduser()
    if path.is_file():
        return _resolve_file(path.absolute())
    if path.is_dir():
        return _resolve_folder(path.absolute())
    if isinstance(checkpoint, str) and not _can_only_be_local(text) and _looks_like_repo_id(text):
        return _resolve_hub(text)
    raise CheckpointNotFoundError(
        f"`checkpoint` {text!r} does not exist (looked for {str(path.absolute())!r}). Pass a weights file "
        "(.safetensors, .bin, .pt, .pth, .ckpt), a folder holding one or a sharded set with its index, an index JSON, or a Hugging "
        "Face Hub repo id ('org/name')."
    )


def _single(path: Path) -> ResolvedCheckpoint:
    return ResolvedCheckpoint(root=path.parent, files=(path,), weight_map=None)


def _resolve_file(path: Path) -> ResolvedCheckpoint:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _resolve_index(path)
    if suffix in WEIGHT_SUFFIXES:
        return _single(path)
    raise CheckpointError(
        f"`checkpoint` {str(path)!r} has an unknown extension {suffix!r}. Expected one of {list(WEIGHT_SUFFIXES)} "
        "or an index '.json'."
    )


def _resolve_folder(folder: Path) -> ResolvedCheckpoint:
    for name in FOLDER_PREFERENCE:
        if (folder / name).is_file():
            return _resolve_file(folder / name)
    indexes = sorted(p for p in folder.glob("*.index.json") if p.is_file())
    if len(indexes) == 1:
        return _resolve_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(
            f"Folder {str(folder)!r} holds several indexes {[p.name for p in indexes]}; pass the one to use as `checkpoint`."
        )
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    safetensors = [p for p in weights if is_safetensors(p)]
    candidates = safetensors or weights  # a safetensors file wins over pickles of the same weights
    if len(candidates) == 1:
        return _single(candidates[0])
    if not candidates:
        raise CheckpointNotFoundError(
            f"Folder {str(folder)!r} holds no checkpoint: no index JSON and no {list(WEIGHT_SUFFIXES)} file."
        )
    raise CheckpointError(
        f"Folder {str(folder)!r} holds several weight files {[p.name for p in candidates]} and no index. Pass the "
        "index JSON that maps tensor names to these files, or pass one file as `checkpoint`."
    )


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_INDEX_BYTES:
            raise CheckpointError(f"Index {str(path)!r} is larger than {_MAX_INDEX_BYTES} bytes; it is not an index.")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"Index {str(path)!r} is not valid JSON ({err}); it is corrupt or truncated. Re-download it."
        ) from err


def _parse_index(index: Path) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    data = _read_json(index)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"Index {str(index)!r} holds a JSON {type(data).__name__}, expected an object: "
            '{"metadata": {...}, "weight_map": {name: file}} or {name: file}.'
        )
    if "weight_map" not in data:
        return data, None
    weight_map, metadata = data["weight_map"], data.get("metadata")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"Index {str(index)!r}: 'weight_map' is a {type(weight_map).__name__}, expected an object.")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"Index {str(index)!r}: 'metadata' is a {type(metadata).__name__}, expected an object.")
    return weight_map, metadata


def _allowed_root(folder: Path) -> Path:
    """The folder shard paths must resolve into: the index's folder, or for a Hub cache snapshot the repo's cache folder
    (snapshot files are symlinks into its ``blobs/``)."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return parent.parent.resolve()
    return folder.resolve()


def _shard_path(index: Path, allowed: Path, name: str, file: Any) -> Path:
    where = f"Index {str(index)!r} entry {name!r}"
    if not isinstance(file, str) or not file or "\x00" in file:
        raise CheckpointError(f"{where} maps to {file!r}; expected the relative path of a shard file.")
    rel = PurePosixPath(file)
    if rel.is_absolute() or PureWindowsPath(file).is_absolute() or PureWindowsPath(file).drive or ".." in rel.parts:
        raise CheckpointError(
            f"{where} names shard {file!r} outside the checkpoint folder. Shard paths must be relative and stay inside "
            f"{str(index.parent)!r}; refusing to open it."
        )
    if rel.suffix.lower() not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{where} names shard {file!r} with an unknown extension; expected {list(WEIGHT_SUFFIXES)}.")
    candidate = index.parent / rel
    try:
        resolved = candidate.resolve()
        inside = resolved.is_relative_to(allowed)
        exists = inside and resolved.is_file()
    except (OSError, RuntimeError) as err:  # name too long, symlink loop
        raise CheckpointError(f"{where} names shard {file!r} that cannot be resolved ({err}).") from err
    if not inside:
        raise CheckpointError(
            f"{where} names shard {file!r}, which resolves to {str(resolved)!r} outside the checkpoint folder "
            f"{str(index.parent)!r} (a symlink pointing out?); refusing to open it."
        )
    if not exists:
        raise CheckpointNotFoundError(
            f"{where} names shard {file!r}, but {str(candidate)!r} does not exist. The checkpoint is incomplete: "
            "re-download the missing shard or fix the index."
        )
    return candidate


def _resolve_index(index: Path) -> ResolvedCheckpoint:
    weight_map, metadata = _parse_index(index)
    if not weight_map:
        raise CheckpointError(f"Index {str(index)!r} names no tensors; it is empty or not a weight index.")
    allowed = _allowed_root(index.parent)
    shards: dict[str, Path] = {}
    resolved_map: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or file not in shards:
            shards[file] = _shard_path(index, allowed, name, file)
        resolved_map[name] = shards[file]
    files = tuple(sorted(set(shards.values()), key=lambda p: p.name))
    return ResolvedCheckpoint(root=index.parent, files=files, weight_map=resolved_map, index=index, metadata=metadata)


def _can_only_be_local(text: str) -> bool:
    """A path no Hub repo id can be: it starts with ``.``, ``/``, ``~`` or ``\\``, has more than one ``/``, or ends in a
    checkpoint suffix. A missing one is "not found" without asking the Hub."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).suffix.lower() in WEIGHT_SUFFIXES + (".json",)
    )


def _looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and Path(text).suffix.lower() not in WEIGHT_SUFFIXES + (".json",)


def _resolve_hub(repo_id: str) -> ResolvedCheckpoint:
    from lightning_bigmodel._hub import hub_snapshot  # one path for every Hub lookup: offline once, one-line errors

    last: Optional[CheckpointNotFoundError] = None
    for patterns in _HUB_PATTERNS:
        folder = hub_snapshot(repo_id, patterns, "`checkpoint`")
        try:
            return _resolve_folder(folder)
        except CheckpointNotFoundError as err:  # no weights of this kind in the repo: try the next kind
            last = err
    assert last is not None
    raise CheckpointNotFoundError(f"Hub repo {repo_id!r} holds no weights: {last}")
