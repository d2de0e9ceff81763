"""Attach the hooks that run a model across GPUs, CPU and disk."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, Union[int, str]],
    main_device: Optional[Union[str, torch.device]] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
) -> nn.Module:
    raise NotImplementedError


def remove_dispatch(model: nn.Module) -> nn.Module:
    raise NotImplementedError


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: Union[str, Path],
    device_map: Union[str, Mapping[str, Union[int, str]]] = "auto",
    max_memory: Optional[Mapping[Union[int, str], Union[int, str]]] = None,
    no_split_module_classes: Optional[Sequence[str]] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
    dtype: Optional[torch.dtype] = None,
    strict: bool = False,
) -> nn.Module:
    raise NotImplementedError
