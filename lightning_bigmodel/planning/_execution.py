"""Where a plan's offloaded layers execute: a GPU (room kept there for them) or the CPU (none kept on the GPUs), how the
planner chooses, and what it says about the choice. Helpers of :class:`~lightning_bigmodel.planning._planner._Planner`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from lightning_bigmodel.planning._groups import _prefixes
from lightning_bigmodel.planning.table import format_bytes

if TYPE_CHECKING:
    from lightning_bigmodel.planning._planner import _Planner
    from lightning_bigmodel.planning.devices import Device, DeviceMap

EXECUTION_CHOICES = ("auto", "gpu", "cpu")


def check_offload_execution(value: object, prefetch: object = "auto") -> None:
    """Raise ``ValueError`` for an ``offload_execution`` that is none of ``"auto"``, ``"gpu"``, ``"cpu"``, or
    ``"cpu"`` with ``prefetch=True`` (prefetching brings offloaded layers to a GPU, where none then computes)."""
    if not isinstance(value, str) or value not in EXECUTION_CHOICES:
        raise ValueError(f'`offload_execution={value!r}` is not an execution setting; pass "auto", "gpu" or "cpu".')
    if value == "cpu" and prefetch is True:
        raise ValueError(
            '`prefetch=True` prefetches offloaded layers onto the execution GPU, but `offload_execution="cpu"` computes '
            'them on the CPU. Pass one of the two, or `prefetch="auto"`.'
        )


@dataclass
class Choice:
    """One candidate plan: the map, its prefetch depth, the reserve on its execution device, that device, and
    ``(device, bytes)`` when the plan could not keep its reserve (warned about if chosen)."""

    raw: DeviceMap
    depth: int
    need: int
    device: Device
    short: Optional[tuple[Device, int]]


def _budgeted_gpus(budgets: Mapping[Device, float]) -> list[int]:
    return [device for device, budget in budgets.items() if isinstance(device, int) and budget > 0]


def _used_gpus(raw: Mapping[str, Device]) -> set[int]:
    return {device for device in raw.values() if isinstance(device, int)}


def _off_gpu(raw: Mapping[str, Device]) -> list[str]:
    return [key for key, device in raw.items() if device in ("cpu", "disk")]


def leaves_gpu_empty(planner: _Planner, raw: DeviceMap, budgets: Mapping[Device, float]) -> bool:
    """Whether ``raw`` offloads weights while a budgeted GPU holds no module."""
    return bool(set(_budgeted_gpus(budgets)) - _used_gpus(raw)) and bool(planner._offloaded(raw))


def fills_more_gpus(cpu: DeviceMap, gpu: DeviceMap) -> bool:
    """Whether the CPU-execution plan ``cpu`` puts modules on every GPU ``gpu`` uses, and on more."""
    return _used_gpus(cpu) > _used_gpus(gpu)


def cpu_execution_line(planner: _Planner, cpu: DeviceMap, gpu: DeviceMap, budgets: Mapping[Device, float]) -> str:
    """Why the offloaded layers of the chosen plan ``cpu`` run on the CPU rather than on a GPU (the plan ``gpu``), and
    the budget that would let its lowest GPU execute them beside the modules it holds."""
    held = planner.gpu_bytes(cpu)
    main = min(held)
    room, _ = planner._reserve(cpu, 1)  # under GPU execution: one offloaded layer and the offloaded buffers
    empty = sorted(set(_budgeted_gpus(budgets)) - _used_gpus(gpu))
    needed = held[main] + room
    return (
        f"Offloaded layers run on the CPU: executing them on GPU {main} needs room there for one offloaded layer and "
        f"the offloaded buffers ({format_bytes(room)}, {room} bytes) beside its modules, and that plan leaves GPU(s) "
        f"{empty} with no module. To run them on GPU {main}, raise `max_memory[{main}]` to at least {needed} bytes "
        f"(now {int(budgets[main])}: its modules in this plan, and that room)."
    )


def two_slots_message(planner: _Planner, budgets: Mapping[Device, float], one: DeviceMap) -> str:
    """Why two slots do not fit, from the plan with one slot (the one that uses the GPUs)."""
    held = planner.gpu_bytes(one)
    gpu = min(held) if held else min(_budgeted_gpus(budgets))
    units = sorted(planner._offloaded_units(one), reverse=True)[:2]
    offloaded = planner._offloaded(one)
    buffers = 0 if planner.offload_buffers else sum(planner.buffer_sizes.get(n, 0) for n in offloaded)
    need = sum(units) + buffers
    return (
        f"`prefetch=True` needs room for two offloaded layers on the execution GPU {gpu}: {need} bytes (layers of "
        f"{' and '.join(map(str, units))} bytes, offloaded buffers {buffers}), beside the {held.get(gpu, 0)} bytes of "
        f"modules it holds with room for one; `max_memory[{gpu}]` is {int(budgets[gpu])} bytes, and keeping the "
        "second layer's room leaves a GPU empty that the one-layer plan uses. Raise that budget, or pass "
        '`prefetch="auto"` (one layer where two do not fit) or `prefetch=False`.'
    )


def fill_empty_gpus(planner: _Planner, raw: DeviceMap, budgets: Mapping[Device, float]) -> DeviceMap:
    """Under CPU execution, each budgeted GPU that the in-order walk left without modules (its next module did not
    fit) takes the largest offloaded pieces that fit its budget: "cpu"/"disk" entries, or the modules (or one module's
    direct tensors) inside them, never splitting a no-split module or a tied group. The map is then out of module
    order: the activations go to that GPU and back. No GPU keeps room for offloaded layers here, so this costs no
    other device anything."""
    empty = [gpu for gpu in _budgeted_gpus(budgets) if gpu not in _used_gpus(raw)]
    if not empty or not _off_gpu(raw):
        return raw
    pieces = sorted(_pieces(planner, raw), key=lambda piece: (-piece[0], piece[1]))
    moved: list[str] = []
    for gpu in empty:
        room = budgets[gpu]
        for size, _, names in pieces:
            if 0 < size <= room and not any(_overlap(name, other) for name in names for other in moved):
                moved += names
                room -= size
                raw = _assign(planner, raw, names, gpu)
    return raw


def _overlap(a: str, b: str) -> bool:
    """Whether names ``a`` and ``b`` cover a common tensor (one is the other or a dotted prefix of it)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _pieces(planner: _Planner, raw: DeviceMap) -> list[tuple[int, int, list[str]]]:
    """``(bytes, order, names)`` of every piece of the offloaded entries of ``raw`` that could move alone: a module
    (one name), or the direct tensors of one module (their names). Pieces holding tied tensors are left out."""
    out: list[tuple[int, int, list[str]]] = []

    def visit(name: str) -> None:
        if name not in planner.tied_prefixes:
            out.append((planner.sizes.get(name, 0), len(out), [name]))
        if planner.splittable(name):
            members = planner.members(name)
            direct = [m for m in members if m not in planner.modules]
            if direct and not any(m in planner.partners for m in direct):
                out.append((sum(planner.sizes.get(m, 0) for m in direct), len(out), direct))
            for member in members:
                if member in planner.modules:
                    visit(member)

    for key in _off_gpu(raw):
        if key in planner.modules:
            visit(key)
    return out


def _assign(planner: _Planner, raw: DeviceMap, names: list[str], gpu: int) -> DeviceMap:
    """``raw`` with the entries covering ``names`` split down to them (each level's members keep the entry's device),
    and ``names`` on ``gpu``."""
    for name in names:
        while name not in raw:
            owner = next(prefix for prefix in _prefixes(name) if prefix in raw)
            device, out = raw[owner], {}
            for key, value in raw.items():
                if key == owner:
                    out.update({member: device for member in planner.members(owner)})
                else:
                    out[key] = value
            raw = out
        raw[name] = gpu
    return raw
