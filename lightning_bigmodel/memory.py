"""Size strings, memory budgets, module sizes and tied-parameter groups. Pure: never moves a tensor."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

DeviceKey = Union[int, str]  # a GPU index, "cpu" or "disk"

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED_SIZES = (
    'a non-negative int of bytes, or a number with a unit: B, KB/MB/GB/TB (powers of 1000) or '
    'KiB/MiB/GiB/TiB (powers of 1024), e.g. "10GiB", "500MB", "1.5 GiB"'
)

# Free GPU memory kept back when budgets are detected: the CUDA context, cuBLAS/cuDNN workspaces, the caching
# allocator's fragmentation and the activations of a forward pass need room beside the weights.
_MIN_GPU_HEADROOM = 2**30  # 1 GiB
_GPU_HEADROOM_FRACTION = 0.10  # of the device's total memory


def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string like ``"10GiB"`` (2**30), ``"10GB"`` (10**9), ``"500MB"``, ``"1.5GiB"``.

    Units are case-insensitive and may be separated from the number by spaces; a bare number means bytes.
    Fractional byte counts are rounded down.

    Raises:
        ValueError: for malformed or negative sizes, naming the value and the accepted forms.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise ValueError(f"Memory size {size!r} is not a size; use {_ACCEPTED_SIZES}.")
    if isinstance(size, (int, float)):
        if size < 0 or size != size or size == float("inf"):
            raise ValueError(f"Memory size {size!r} must be finite and non-negative; use {_ACCEPTED_SIZES}.")
        return int(size)
    if size.strip().startswith("-"):
        raise ValueError(f"Memory size {size!r} is negative; use {_ACCEPTED_SIZES}.")
    match = _SIZE.match(size)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Memory size {size!r} is malformed; use {_ACCEPTED_SIZES}.")
    number, unit = match.groups()
    return int(Decimal(number) * _UNITS[unit.lower()])  # exact: 0.29GB is 290000000


def _normalize_key(key: object) -> DeviceKey:
    from lightning_bigmodel.device_map import normalize_device  # device_map imports this module

    if isinstance(key, str) and key.strip().lower() == "disk":
        return "disk"
    try:
        return normalize_device(key)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(
            f"`max_memory` has an unknown key {key!r}. Use GPU indices (0, 1 or 'cuda:1'), 'cpu' and 'disk'."
        ) from None


def _order(budget: Mapping[DeviceKey, int]) -> dict[DeviceKey, int]:
    gpus = sorted(key for key in budget if isinstance(key, int))
    return {key: budget[key] for key in [*gpus, "cpu", "disk"] if key in budget}


def get_max_memory(max_memory: Optional[Mapping[DeviceKey, Union[int, str]]] = None) -> dict[DeviceKey, int]:
    """Normalise a budget ``{0: "10GiB", "cpu": "30GB", "disk": ...}`` to bytes, GPUs first (ascending), then "cpu", "disk".

    Keys may be GPU indices (``1``, ``"1"``, ``"cuda:1"``, ``torch.device("cuda", 1)``), ``"cpu"`` and ``"disk"``;
    values are anything :func:`parse_size` accepts. A device left out of a given budget gets nothing, except disk,
    which the planner treats as unlimited unless budgeted.

    With a budget given, CUDA is never touched (GPU ids are taken as written; ``check_devices_exist`` in
    ``device_map`` checks them against the visible GPUs). With ``None``, every visible GPU gets its free memory
    minus a headroom of ``max(1 GiB, 10% of its total memory)`` for the CUDA context, workspaces and activations,
    and "cpu" gets the available RAM (``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf``).

    Raises:
        ValueError: for an unknown or repeated key, or a malformed size.
    """
    if max_memory is None:
        return _detect_max_memory()
    budget: dict[DeviceKey, int] = {}
    for key, value in max_memory.items():
        device = _normalize_key(key)
        if device in budget:
            raise ValueError(f"`max_memory` names device {device!r} twice (key {key!r}); give each device once.")
        try:
            budget[device] = parse_size(value)
        except ValueError as err:
            raise ValueError(f"`max_memory[{key!r}]`: {err}") from None
    return _order(budget)


def _detect_max_memory() -> dict[DeviceKey, int]:
    budget: dict[DeviceKey, int] = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            headroom = max(_MIN_GPU_HEADROOM, int(total * _GPU_HEADROOM_FRACTION))
            budget[index] = max(0, free - headroom)
    budget["cpu"] = _available_cpu_memory()
    return budget


def _available_cpu_memory() -> int:
    """Available RAM in bytes: ``MemAvailable`` from ``/proc/meminfo``, else free pages from ``os.sysconf``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def _tensor_bytes(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    itemsize = tensor.element_size()
    if dtype is not None and tensor.is_floating_point():
        itemsize = min(itemsize, dtype.itemsize)
    return tensor.numel() * itemsize


def _prefix_sizes(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype]) -> dict[str, int]:
    """Add each tensor's bytes to its own name and every dotted ancestor prefix, ``""`` included; first name wins."""
    sizes: dict[str, int] = {"": 0}
    seen: set[int] = set()
    for name, tensor in named_tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = _tensor_bytes(tensor, dtype)
        prefix = name
        while prefix:
            sizes[prefix] = sizes.get(prefix, 0) + nbytes
            cut = prefix.rfind(".")
            prefix = prefix[:cut] if cut >= 0 else ""
        sizes[""] += nbytes
    return sizes


def compute_module_sizes(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes of parameters and buffers under every module prefix (``""`` is the whole model).

    Keys are every module prefix holding tensors and every tensor name. One pass over ``named_parameters()`` then
    ``named_buffers()``, adding each tensor to all its ancestors, so the cost is linear in the number of tensors.
    A tensor reachable under several names (tied weights, shared modules) is counted once, under the first name
    in that order; its other names do not appear. ``dtype`` models loading in a smaller dtype: a floating-point
    tensor counts ``min(its itemsize, dtype.itemsize)`` bytes per element (it never grows; integer and bool
    tensors keep their size). Works on meta models.
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return _prefix_sizes(named, dtype)


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups (of two or more) of parameter names that share one tensor.

    Names in a group follow ``named_parameters(remove_duplicate=False)`` order, so ``group[0]`` is the name that
    owns the tensor in :func:`compute_module_sizes` and in ``state_dict``; groups are ordered by their first name.
    Works on meta models (ties are found by ``Parameter`` identity).
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
