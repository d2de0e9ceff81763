"""Memory budgets: normalise a user's ``max_memory`` and detect free memory per device. Never moves a tensor."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

from lightning_bigmodel.planning.devices import DeviceKey, normalize_device
from lightning_bigmodel.planning.sizes import parse_size

# Free GPU memory kept back when budgets are detected: the CUDA context, cuBLAS/cuDNN workspaces, the caching
# allocator's fragmentation and the activations of a forward pass need room beside the weights.
_MIN_GPU_HEADROOM = 2**30  # 1 GiB
_GPU_HEADROOM_FRACTION = 0.10  # of the device's total memory


def _normalize_key(key: object) -> DeviceKey:
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


