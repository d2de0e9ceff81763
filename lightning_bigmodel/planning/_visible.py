"""Checks that the GPUs a device map or a budget names are visible to this process (dispatch runs them; planning does
not need them)."""

from __future__ import annotations

from typing import Mapping, Optional, Union

from lightning_bigmodel._accelerator import gpu_count
from lightning_bigmodel.planning.budget import get_max_memory
from lightning_bigmodel.planning.devices import Device, normalize_device


def check_devices_exist(device_map: Mapping[str, Device]) -> None:
    """Raise ``ValueError`` naming each GPU of ``device_map`` that is not visible (the accelerator's device count).

    Dispatch calls this; planning does not (it may plan for GPUs this process cannot see).
    """
    count = gpu_count()
    absent: dict[int, list[str]] = {}
    for key, value in device_map.items():
        device = normalize_device(value)
        if isinstance(device, int) and device >= count:
            absent.setdefault(device, []).append(key)
    if absent:
        details = "; ".join(f"{keys!r} on GPU {gpu} of {count} visible" for gpu, keys in sorted(absent.items()))
        use = f"Use GPU indices below {count}" if count else "This process sees no GPU: use 'cpu' and 'disk' only"
        raise ValueError(
            f"`device_map` puts {details}. {use}, make the GPUs visible (CUDA_VISIBLE_DEVICES), or plan with "
            '`device_map="auto"` and a `max_memory` naming only visible GPUs.'
        )


def check_budget_devices_exist(max_memory: Optional[Mapping[Device, Union[int, str]]]) -> None:
    """Raise ``ValueError`` naming each ``max_memory[k]`` that budgets a GPU this process cannot see, before planning
    (a plan for it could not be dispatched here). ``None`` (detected budgets) passes."""
    if max_memory is None:
        return
    count = gpu_count()
    absent = [key for key in get_max_memory(max_memory) if isinstance(key, int) and key >= count]
    if absent:
        names = ", ".join(f"`max_memory[{key}]`" for key in absent)
        seen = f"{count} GPU(s) (indices 0 to {count - 1})" if count else "no GPU"
        raise ValueError(
            f"{names} budgets GPU(s) {absent}, but this process sees {seen}. Drop {'it' if len(absent) == 1 else 'them'} "
            "from `max_memory` (e.g. keep only 'cpu' and 'disk' on a CPU-only machine), or make the GPUs visible "
            "(CUDA_VISIBLE_DEVICES)."
        )
