"""Turn what a user passes as ``checkpoint`` into a list of files and a weight map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union


@dataclass(frozen=True)
class ResolvedCheckpoint:
    root: Path  # folder that holds every file (shard paths may not escape it)
    files: tuple[Path, ...]  # absolute shard paths, in index order
    weight_map: Optional[dict[str, Path]]  # tensor name -> file, when an index gave one (else None: read headers)
    index: Optional[Path] = None  # the index JSON, if any


def resolve_checkpoint(checkpoint: Union[str, Path]) -> ResolvedCheckpoint:
    """Accept a ``.safetensors``/``.bin``/``.pt``/``.ckpt`` file, a folder (one file or a sharded set with its index),
    an index JSON in HF (``{"metadata", "weight_map"}``) or plain (``{name: file}``) format, or a Hub repo id
    (``huggingface_hub.snapshot_download``, honouring ``HF_HUB_OFFLINE`` and the cache).
    """
    raise NotImplementedError
