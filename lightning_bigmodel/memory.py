"""Size strings, memory budgets, module sizes and tied-parameter groups. Pure: never moves a tensor."""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import nn

DeviceKey = Union[int, str]  # a GPU index, "cpu" or "disk"


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string like ``"10GiB"`` (2**30), ``"10GB"`` (10**9), ``"500MB"``, ``"1.5GiB"``.

    Raises ``ValueError`` naming the string and the accepted units for malformed or negative sizes.
    """
    raise NotImplementedError


def get_max_memory(max_memory: Optional[Mapping[DeviceKey, Union[int, str]]] = None) -> dict[DeviceKey, int]:
    """Normalise a budget ``{0: "10GiB", "cpu": "30GB", "disk": ...}`` to bytes, GPUs first (ascending), then "cpu", "disk".

    With a budget given, CUDA is never touched (GPU ids are taken as written). With ``None``, detect free memory
    of every visible GPU (minus headroom for the CUDA context) and available CPU RAM.
    """
    raise NotImplementedError


def compute_module_sizes(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes of parameters and buffers under every module prefix (``""`` is the whole model).

    Tied tensors are counted once; ``dtype`` shrinks floating-point tensors only. Works on meta models.
    """
    raise NotImplementedError


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups (of two or more) of parameter names that share one tensor, each group sorted, in model order."""
    raise NotImplementedError
