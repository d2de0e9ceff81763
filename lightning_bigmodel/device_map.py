"""Device-map planning (policies), checking and cleaning. Pure: reads shapes and dtypes only."""

from __future__ import annotations

from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

Device = Union[int, str]  # GPU index, "cpu" or "disk" (also "cuda:1"-style strings are accepted on input)
DeviceMap = dict[str, Device]
Policy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")


def infer_device_map(
    model: nn.Module,
    max_memory: Optional[Mapping[Device, Union[int, str]]] = None,
    no_split_module_classes: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    policy: Policy = "auto",
    offload_buffers: bool = False,
) -> DeviceMap:
    """Plan ``{module_name: gpu_index | "cpu" | "disk"}`` for ``model`` under ``max_memory``."""
    raise NotImplementedError


def check_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> None:
    """Raise ``ValueError`` naming every parameter/buffer the map leaves out, every key naming no module, and bad devices."""
    raise NotImplementedError


def tensor_devices(model: nn.Module, device_map: Mapping[str, Device]) -> dict[str, Device]:
    """Device of every parameter and buffer name (``named_parameters/buffers(remove_duplicate=False)``), by longest prefix."""
    raise NotImplementedError


def execution_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where offloaded ("cpu"/"disk") modules compute: the lowest GPU in the map, else CPU."""
    raise NotImplementedError
