"""What a plan says about a budgeted GPU it leaves empty (one line each), for the planner's log."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from lightning_bigmodel.planning.table import format_bytes

if TYPE_CHECKING:
    from lightning_bigmodel.planning._planner import _Planner
    from lightning_bigmodel.planning.devices import Device


def empty_gpu_lines(
    planner: _Planner, device_map: Mapping[str, Device], budgets: Mapping[Device, float], reserve: int
) -> list[str]:
    """One line per GPU with a budget that ``device_map`` leaves empty while it offloads weights to cpu/disk: the GPU,
    its budget, the smallest offloaded module (and the reserve, on the GPU that would execute the offloaded layers)
    that did not fit, and the fix. ``[]`` when nothing is offloaded (an empty GPU is then not needed)."""
    offloaded = [key for key, device in device_map.items() if device in ("cpu", "disk")]
    gpus = [device for device, budget in budgets.items() if isinstance(device, int) and budget > 0]
    used = {device for device in device_map.values() if isinstance(device, int)}
    if not offloaded or not gpus:
        return []
    exec_gpu = min(used) if used else gpus[0]
    lines = []
    for gpu in gpus:
        if gpu in used:
            continue
        what, name = _first_past(device_map, gpu, planner.sizes)
        size = planner.sizes.get(name, 0)
        budget = int(budgets[gpu])
        beside = ""
        if gpu <= exec_gpu and reserve:
            beside = f" beside the {format_bytes(reserve)} kept there for the offloaded layers it would execute"
        lines.append(
            f"GPU {gpu} gets no module (`max_memory[{gpu}]` = {format_bytes(budget)}, {budget} bytes): {what}, "
            f"{name or '(whole model)'!r} ({format_bytes(size)}), does not fit{beside}. Raise "
            f"`max_memory[{gpu}]` to at least {size + (reserve if beside else 0)} bytes, take its class out of "
            "`no_split_module_classes` so it can split, or drop the GPU from `max_memory`."
        )
    return lines


def _rank(device: Device) -> tuple[int, int]:
    return (0, device) if isinstance(device, int) else (1, 0) if device == "cpu" else (2, 0)


def _first_past(device_map: Mapping[str, Device], gpu: int, sizes: Mapping[str, int]) -> tuple[str, str]:
    """``(what, key)``: in a map in module order, the first key placed on a device after ``gpu`` (the module that
    reached it and went on); in a map out of module order, the smallest module placed after it."""
    ranks = [_rank(device) for device in device_map.values()]
    later = [key for key, device in device_map.items() if _rank(device) > (0, gpu)] or list(device_map)[:1] or [""]
    if ranks == sorted(ranks):
        return "the next module in order", later[0]
    return "the smallest module placed after it", min(later, key=lambda key: sizes.get(key, 0))
