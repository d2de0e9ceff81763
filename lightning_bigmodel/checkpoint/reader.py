"""Per-tensor readers: safetensors through ``safe_open``/mmap views, pickles through ``torch.load(mmap=True, weights_only=True)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch

from lightning_bigmodel.checkpoint.resolve import ResolvedCheckpoint


@dataclass(frozen=True)
class TensorSpec:
    shape: torch.Size
    dtype: torch.dtype
    file: Path
    is_safetensors: bool


class CheckpointReader:
    """Lazy view over a (sharded) checkpoint. Use as a context manager; at most one pickle shard is mapped at a time."""

    def __init__(self, checkpoint: Union[str, Path, ResolvedCheckpoint]) -> None:
        raise NotImplementedError

    def keys(self) -> list[str]:
        """Every tensor name, grouped by file in index order."""
        raise NotImplementedError

    def spec(self, key: str) -> TensorSpec:
        raise NotImplementedError

    def read(self, key: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A fresh tensor that owns its memory (safe to keep after ``close``)."""
        raise NotImplementedError

    def mmap_view(self, key: str) -> torch.Tensor:
        """Zero-copy CPU tensor backed by the safetensors file itself (page cache). Safetensors only."""
        raise NotImplementedError

    def iter_tensors(self, keys=None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` file by file, tensor by tensor (only one tensor materialised at a time)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
