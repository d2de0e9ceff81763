"""Render a device map as a readable table: contiguous module ranges per device, bytes per device, budget used."""

from __future__ import annotations

import re
from typing import Mapping, Optional, Union

Device = Union[int, str]
_NUMBERED = re.compile(r"^(.*)\.(\d+)$")


def device_label(device: Device) -> str:
    """``0`` -> ``"cuda:0"``; ``"cpu"`` and ``"disk"`` stay as they are."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def format_bytes(n: Optional[int]) -> str:
    """``1288490188`` -> ``"1.2 GiB"`` (powers of 1024); ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB" and abs(n) < 1024**2:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _split(name: str) -> tuple[Optional[str], Optional[int]]:
    match = _NUMBERED.match(name)
    return (match.group(1), int(match.group(2))) if match else (None, None)


def module_ranges(device_map: Mapping[str, Device]) -> list[tuple[str, Device, list[str]]]:
    """Consecutive map entries on one device, with numbered siblings folded: ``("model.h.0-5", 0, [keys])``.

    Entries keep the map's (model) order; ``h.0 .. h.5`` fold into ``h.0-5`` only when they are consecutive both in
    the map and in number, and sit on one device.
    """
    rows: list[tuple[str, Device, list[str]]] = []
    run: list[str] = []
    run_device: Optional[Device] = None
    for key, device in device_map.items():
        parent, number = _split(key)
        if run and device == run_device and parent is not None:
            last_parent, last_number = _split(run[-1])
            if last_parent == parent and last_number == number - 1:
                run.append(key)
                continue
        if run:
            rows.append(_row(run, run_device))
        run, run_device = [key], device
    if run:
        rows.append(_row(run, run_device))
    return rows


def _row(keys: list[str], device: Device) -> tuple[str, Device, list[str]]:
    if len(keys) == 1:
        return keys[0] or "(whole model)", device, keys
    parent, first = _split(keys[0])
    _, last = _split(keys[-1])
    return f"{parent}.{first}-{last}", device, keys


def bytes_per_device(device_map: Mapping[str, Device], module_sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes placed on each device, keyed by :func:`device_label`, in first-use order."""
    totals: dict[str, int] = {}
    for key, device in device_map.items():
        label = device_label(device)
        totals[label] = totals.get(label, 0) + int(module_sizes.get(key, 0))
    return totals


def moved_buffers(device_map: Mapping[str, Device], buffer_sizes: Mapping[str, int]) -> dict[str, int]:
    """Bytes of buffers that run elsewhere than their map entry says, by :func:`device_label`: with
    ``offload_buffers=False`` the buffers of offloaded entries (``"disk"``, and ``"cpu"`` when GPUs are used) stay on
    the execution device (the one a planned map records, else the lowest GPU, else cpu): positive there, negative where
    the entries are. Under CPU execution only "disk" entries are offloaded."""
    gpus = [device for device in device_map.values() if isinstance(device, int)]
    execution = device_label(_execution_of(device_map))
    moved: dict[str, int] = {}
    for key, device in device_map.items():
        offloaded = device == "disk" or (device == "cpu" and execution != "cpu")
        nbytes = int(buffer_sizes.get(key, 0))
        if offloaded and nbytes and device_label(device) != execution:
            moved[device_label(device)] = moved.get(device_label(device), 0) - nbytes
            moved[execution] = moved.get(execution, 0) + nbytes
    return moved


def render_table(
    device_map: Mapping[str, Device],
    module_sizes: Mapping[str, int],
    budget: Optional[Mapping[Device, int]] = None,
    sources: Optional[Mapping[Device, str]] = None,
    buffer_sizes: Optional[Mapping[str, int]] = None,
) -> str:
    """The device map as text: one line per module range, then one per device with its bytes and budget used.

    ``sources`` says where each budget came from (e.g. ``"cgroup limit"``, ``"available RAM"``, ``"max_memory"``;
    see :func:`~lightning_bigmodel.planning.budget.budget_sources`), shown in a last column when given.
    ``buffer_sizes`` (buffer bytes per module prefix; pass it unless ``offload_buffers=True``) makes "placed" what each
    device holds at run time, with the buffers of offloaded modules on the execution device (as the memory simulation
    counts its weights), and a "buffers" column saying how much of that moved from the modules' own rows.
    """
    moved = moved_buffers(device_map, buffer_sizes) if buffer_sizes is not None else {}
    budget = {device_label(device): size for device, size in (budget or {}).items()}
    source = {device_label(device): text for device, text in (sources or {}).items()}
    ranges = [
        (name, device_label(device), format_bytes(sum(int(module_sizes.get(k, 0)) for k in keys)))
        for name, device, keys in module_ranges(device_map)
    ]
    width = max([len("module")] + [len(name) for name, _, _ in ranges])
    lines = [f"{'module':<{width}}  {'device':<7}  {'size':>10}"]
    lines += [f"{name:<{width}}  {label:<7}  {size:>10}" for name, label, size in ranges]
    lines.append("")
    head = f"{'device':<7}  {'placed':>10}" + (f"  {'buffers':>11}" if moved else "")
    lines.append(head + f"  {'budget':>10}  {'used':>6}" + ("  source" if source else ""))
    totals = bytes_per_device(device_map, module_sizes)
    for label in moved:
        totals.setdefault(label, 0)
    for label, placed in totals.items():
        placed += moved.get(label, 0)
        limit = budget.get(label)
        used = f"{100 * placed / limit:.1f}%" if limit else "-"
        shift = moved.get(label, 0)
        shown = ("+" if shift > 0 else "") + format_bytes(shift) if shift else "-"
        line = f"{label:<7}  {format_bytes(placed):>10}" + (f"  {shown:>11}" if moved else "")
        line += f"  {format_bytes(limit):>10}  {used:>6}"
        lines.append(line + (f"  {source.get(label, '-')}" if source else ""))
    lines.append(f"{'total':<7}  {format_bytes(sum(totals.values())):>10}")
    if moved:
        lines.append("placed: what each device holds at run time; buffers: buffers of offloaded modules, kept on the "
                     "execution device (offload_buffers=False)")
    return "\n".join(lines)


def _execution_of(device_map: Mapping[str, Device], execution: Optional[Device] = None) -> Device:
    """``execution``, else the execution device a planned map records (its ``execution_device``), else the lowest GPU
    of the map, else ``"cpu"``."""
    recorded = execution if execution is not None else getattr(device_map, "execution_device", None)
    if recorded is not None:
        return recorded
    gpus = [device for device in device_map.values() if isinstance(device, int)]
    return min(gpus) if gpus else "cpu"


def prefetch_line(
    depth: Optional[int], reserve: int, device_map: Mapping[str, Device], execution: Optional[Device] = None
) -> str:
    """Where the plan's offloaded layers compute (one ``execution:`` line, when something is offloaded), then its
    prefetch depth: how many offloaded layers the execution GPU holds at once, and the room kept for them.
    ``execution``: the plan's execution device (default: the one ``device_map`` records, else its lowest GPU)."""
    where = device_label(_execution_of(device_map, execution))
    kept = f", {format_bytes(reserve)} kept free on {where} for offloaded layers and buffers" if reserve else ""
    offloaded = any(device in ("cpu", "disk") for device in device_map.values())
    gpus = any(isinstance(device, int) for device in device_map.values())
    if offloaded and where == "cpu" and gpus:
        return (
            'execution: offloaded layers compute on the cpu ("cpu" entries in place, "disk" ones streamed to it); the '
            "GPUs keep no room for them\n" + f"prefetch: none (no offloaded layer computes on a GPU){kept}"
        )
    if offloaded and gpus:
        return f"execution: offloaded layers compute on {where}\n" + _depth_line(depth, where, kept)
    return _depth_line(depth, where, kept)


def _depth_line(depth: Optional[int], where: str, kept: str) -> str:
    if depth == 2:
        return f"prefetch: 2 offloaded layers on {where} (one computes while the next is copied in){kept}"
    if depth == 1:
        return f"prefetch: 1 offloaded layer on {where} at a time (fetch, compute, free; no look-ahead){kept}"
    if depth == 0:
        return f"prefetch: none (no offloaded layer computes on a GPU){kept}"
    return "prefetch: as the hand-made map's dispatch decides (prefetch='auto': two layers)"
