"""Stream a checkpoint into a (meta) model, tensor by tensor, straight to each tensor's device."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: Union[str, Path],
    device_map: Optional[Mapping[str, Union[int, str]]] = None,
    dtype: Optional[torch.dtype] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    strict: bool = False,
    offload_buffers: bool = False,
    key_prefix: str = "",
) -> tuple[list[str], list[str]]:
    """Return ``(missing_keys, unexpected_keys)``; ``strict=True`` raises listing them."""
    raise NotImplementedError
