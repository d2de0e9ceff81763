"""Write a model or state dict as shards plus an index."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping, Union

import torch
from torch import nn


def save_sharded_checkpoint(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    folder: Union[str, Path],
    max_shard_size: Union[int, str] = "5GB",
    safe_serialization: bool = True,
    index_format: Literal["hf", "plain"] = "hf",
) -> Path:
    """Write shards and an index into ``folder``; return the index path (or the single file when one shard)."""
    raise NotImplementedError
