"""Device-map planning (policies), checking and cleaning. Pure: reads shapes and dtypes only."""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel.memory import _prefix_sizes, compute_module_sizes, find_tied_parameters, get_max_memory

Device = Union[int, str]  # GPU index, "cpu" or "disk" (also "cuda:1"-style strings are accepted on input)
DeviceMap = dict[str, Device]
Policy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")

_ACCEPTED = 'an int >= 0, "cuda:N", "cpu", "disk" or a torch.device'


def normalize_device(value: Union[Device, torch.device]) -> Device:
    """Canonical form of a device-map value: a GPU index (int), ``"cpu"`` or ``"disk"``.

    Accepts ``1``, ``"1"``, ``"cuda:1"``, ``torch.device("cuda", 1)``, ``"cuda"`` (GPU 0), ``"cpu"``, ``"disk"``.

    Raises:
        ValueError: for anything else (``"meta"``, negative indices, other device types), naming the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"Device {value!r} is not a device; use {_ACCEPTED}.")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"Device {value!r} is a negative GPU index; use {_ACCEPTED}.")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("cpu", "disk"):
            return text
        if text.isdigit():
            return int(text)
        try:
            value = torch.device(text)
        except (RuntimeError, ValueError):
            raise ValueError(f"Device {value!r} is not a device; use {_ACCEPTED}.") from None
    if isinstance(value, torch.device):
        if value.type == "cuda":
            return 0 if value.index is None else value.index
        if value.type == "cpu":
            return "cpu"
        raise ValueError(f"Device {str(value)!r} cannot hold weights in a device map; use {_ACCEPTED}.")
    raise ValueError(f"Device {value!r} is not a device; use {_ACCEPTED}.")


def _device_of(name: str, normalized: Mapping[str, Device]) -> Optional[Device]:
    """Device of the longest key of ``normalized`` that is ``name`` or a dotted prefix of it ("" matches all)."""
    prefix = name
    while True:
        if prefix in normalized:
            return normalized[prefix]
        if not prefix:
            return None
        cut = prefix.rfind(".")
        prefix = prefix[:cut] if cut >= 0 else ""


def _tensor_names(model: nn.Module) -> list[str]:
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    names += [name for name, _ in model.named_buffers(remove_duplicate=False)]
    return names


def tensor_devices(model: nn.Module, device_map: Mapping[str, Device]) -> dict[str, Device]:
    """Device of every parameter and buffer name (``named_parameters/buffers(remove_duplicate=False)``), by longest prefix.

    Values are normalised (see :func:`normalize_device`): a GPU index, ``"cpu"`` or ``"disk"``.

    Raises:
        ValueError: if a tensor is covered by no key of ``device_map`` (run :func:`check_device_map` for details).
    """
    normalized = {key: normalize_device(value) for key, value in device_map.items()}
    devices: dict[str, Device] = {}
    missing = []
    for name in _tensor_names(model):
        device = _device_of(name, normalized)
        if device is None:
            missing.append(name)
        else:
            devices[name] = device
    if missing:
        raise ValueError(
            f"`device_map` leaves {missing!r} unassigned. Add a key for them (or their module), or pass "
            '`device_map="auto"`.'
        )
    return devices


def execution_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where offloaded ("cpu"/"disk") modules compute: the lowest GPU in the map, else CPU."""
    gpus = [device for device in map(normalize_device, device_map.values()) if isinstance(device, int)]
    return torch.device("cuda", min(gpus)) if gpus else torch.device("cpu")


def infer_device_map(
    model: nn.Module,
    max_memory: Optional[Mapping[Device, Union[int, str]]] = None,
    no_split_module_classes: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    policy: Policy = "auto",
    offload_buffers: bool = False,
) -> DeviceMap:
    """Plan ``{module_name: gpu_index | "cpu" | "disk"}`` for ``model`` under ``max_memory``.

    Pure: reads names, shapes and dtypes only (works on a meta model) and never touches CUDA when ``max_memory``
    is given. Modules are taken in order and placed greedily; one that does not fit is split into its direct
    tensors (keys ``"prefix.name"``) and children, unless its class name is in ``no_split_module_classes``; what
    cannot be split moves on to the next device: GPUs ascending, then "cpu", then "disk" (unlimited unless
    budgeted). A device left out of ``max_memory`` gets nothing (disk excepted). The result is cleaned with
    :func:`clean_device_map` (``{"": 0}`` when everything fits on GPU 0).

    Policies: ``"sequential"`` fills each GPU up to its budget. ``"balanced"`` aims each GPU at an even share of
    what is left (water-filling under the budgets; an atomic layer may overshoot the share when that lands
    closer to it, and the last GPU takes up to its whole budget). ``"auto"`` is ``"balanced"`` (the same as
    ``"sequential"`` with one GPU). ``"balanced_low_0"`` balances over GPUs 1.. and gives GPU 0 only what the
    others cannot hold.

    Parameters shared by several modules (tied weights) land on one device: placing a module pulls in the pending
    modules holding its partners. With ``offload_buffers=False``, the buffers of modules offloaded to cpu/disk
    are charged to the execution device (the lowest GPU in the map, else cpu). When something is offloaded
    while GPUs are used, room for the largest offloaded layer (a no-split module, or the direct tensors of one
    module) is reserved there too, by planning again with that reserve; with no GPU nothing is reserved for
    layers (disk weights are memory-mapped). Linear in the number of modules and tensors.

    Raises:
        ValueError: for an unknown ``policy``, a malformed ``max_memory``, or a budgeted disk that is used up.
    """
    if policy not in POLICIES:
        raise ValueError(f"`policy={policy!r}` is not a device-map policy; choose one of {list(POLICIES)}.")
    budgets: dict[Device, float] = dict(get_max_memory(max_memory))
    budgets.setdefault("disk", math.inf)  # get_max_memory orders "disk" last; setdefault appends it last
    planner = _Planner(model, no_split_module_classes, dtype, offload_buffers)
    raw = planner.plan(budgets, balanced=policy != "sequential", low_0=policy == "balanced_low_0")
    return clean_device_map(model, raw)


_MAX_PASSES = 6


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _prefixes(name: str) -> list[str]:
    """``name``, then each dotted ancestor, then ``""``."""
    out = [name]
    while name:
        cut = name.rfind(".")
        name = name[:cut] if cut >= 0 else ""
        out.append(name)
    return out


def _members(modules: Mapping[str, nn.Module], name: str) -> list[str]:
    """Direct parameters, direct buffers, then children of module ``name`` (``[]`` for a tensor name)."""
    module = modules.get(name)
    if module is None:
        return []
    # The registries themselves: `named_parameters(recurse=False)` walks a generator chain per call (slow at scale).
    groups = (module._parameters, module._buffers, module._modules)
    return [_join(name, member) for group in groups for member, value in group.items() if value is not None]


def _water_level(remaining: float, budgets: list[float]) -> float:
    """The level ``L`` with ``sum(min(b, L) for b in budgets) == remaining`` (or infinity when all are full)."""
    for index, budget in enumerate(sorted(budgets)):
        share = math.ceil(remaining / (len(budgets) - index))
        if budget >= share:
            return share
        remaining -= budget
    return math.inf


class _Planner:
    """One greedy pass per call of :meth:`fill`; :meth:`plan` repeats it to reserve room on the execution device."""

    def __init__(self, model: nn.Module, no_split: Optional[Sequence[str]], dtype, offload_buffers: bool) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.sizes = compute_module_sizes(model, dtype)
        self.buffer_sizes = _prefix_sizes(model.named_buffers(), dtype)
        self.no_split = set(no_split or ())
        self.offload_buffers = offload_buffers
        self.partners: dict[str, list[str]] = {}
        for group in find_tied_parameters(model):
            for name in group:
                self.partners[name] = [other for other in group if other != name]
        self.tied_prefixes = {prefix for name in self.partners for prefix in _prefixes(name)}
        self.units: dict[str, int] = {}
        self.member_cache: dict[str, list[str]] = {}

    def members(self, name: str) -> list[str]:
        if name not in self.member_cache:
            self.member_cache[name] = _members(self.modules, name)
        return self.member_cache[name]

    def splittable(self, name: str) -> bool:
        module = self.modules.get(name)
        return module is not None and type(module).__name__ not in self.no_split and bool(self.members(name))

    def unit(self, name: str) -> int:
        """Largest piece of ``name`` brought to the execution device at once: a no-split module or one module's direct tensors."""
        if name not in self.units:
            if not self.splittable(name):
                self.units[name] = self.sizes.get(name, 0)
            else:
                members = self.members(name)
                direct = sum(self.sizes.get(m, 0) for m in members if m not in self.modules)
                self.units[name] = max([direct] + [self.unit(m) for m in members if m in self.modules])
        return self.units[name]

    def group(self, name: str, pending: set[str], placed: Mapping[str, Device]) -> list[str]:
        """``name`` plus the pending items holding the tied partners of tensors under ``name``."""
        group = [name]
        if name not in self.tied_prefixes:
            return group
        inside = f"{name}." if name else ""

        def under(tensor: str) -> bool:
            return tensor == name or tensor.startswith(inside)

        for tensor in self.partners:
            if not under(tensor):
                continue
            for partner in self.partners[tensor]:
                if under(partner):
                    continue
                for prefix in _prefixes(partner):  # the finest pending item holding `partner`
                    if prefix in placed:
                        break  # cannot happen: partners are always placed together
                    if prefix in pending and prefix not in group:
                        group.append(prefix)
                        break
                    if prefix in pending:
                        break
        return group

    def plan(self, budgets: dict[Device, float], balanced: bool, low_0: bool) -> DeviceMap:
        """Fill once; if something was offloaded, fill again with room reserved on the execution device."""
        self.has_gpu = any(isinstance(device, int) and budget > 0 for device, budget in budgets.items())
        reserves: dict[Device, int] = {}  # kept where set: a reserve that empties its device moves the execution
        low_0_extra, gpu_0_fill = 0, -1.0  # balanced_low_0: GPU 0 takes more when the others spilled past the GPUs
        for _ in range(_MAX_PASSES):
            effective = {device: max(0, budget - reserves.get(device, 0)) for device, budget in budgets.items()}
            one_pass = _Pass(self, effective, balanced, low_0, low_0_extra)
            raw = one_pass.run()
            spilled, fill = one_pass.spilled_with_room_on_gpu_0()
            if spilled and fill > gpu_0_fill:  # stop once a bigger share for GPU 0 no longer changes the plan
                low_0_extra, gpu_0_fill = low_0_extra + spilled, fill
                continue
            need, exec_device = self._reserve(raw)
            if need <= reserves.get(exec_device, 0):
                return raw
            reserves[exec_device] = need
        warnings.warn(
            f"The device map leaves too little room on the execution device {exec_device!r} for the largest "
            f"offloaded layer and the offloaded buffers ({need} bytes): running it may go out of memory. Raise "
            "that device's `max_memory`, or list fewer/smaller classes in `no_split_module_classes`.",
            stacklevel=3,
        )
        return raw

    def cost(self, name: str, device: Device) -> int:
        """Bytes ``name`` takes on ``device``: buffers of offloaded modules stay on the execution device."""
        offloaded = device == "disk" or (device == "cpu" and self.has_gpu)
        if offloaded and not self.offload_buffers:
            return self.sizes.get(name, 0) - self.buffer_sizes.get(name, 0)
        return self.sizes.get(name, 0)

    def _reserve(self, raw: DeviceMap) -> tuple[int, Device]:
        """Bytes the execution device needs beside its own modules: the largest offloaded layer, offloaded buffers."""
        gpus = [device for device in raw.values() if isinstance(device, int)]
        exec_device: Device = min(gpus) if gpus else "cpu"
        offloaded = [name for name, device in raw.items() if device == "disk" or (device == "cpu" and self.has_gpu)]
        need = max((self.unit(name) for name in offloaded), default=0) if gpus else 0
        if not self.offload_buffers:
            need += sum(self.buffer_sizes.get(name, 0) for name in offloaded)
        return need, exec_device


class _Pass:
    """One greedy walk over the module tree, filling the devices in order."""

    def __init__(
        self, planner: _Planner, budgets: dict[Device, float], balanced: bool, low_0: bool, low_0_extra: int = 0
    ) -> None:
        self.planner, self.budgets, self.balanced, self.low_0 = planner, budgets, balanced, low_0
        self.low_0_extra = low_0_extra
        gpus = [device for device in budgets if isinstance(device, int) and budgets[device] > 0]
        others = [device for device in budgets if device not in gpus]
        # balanced_low_0: GPU 0 holds only what GPUs 1.. cannot (its target is that overflow), and the others share
        # the rest evenly. Devices are still filled in index order, so the map stays sequential (0, 1, ..., cpu).
        self.spread = gpus[1:] if low_0 and len(gpus) > 1 else gpus
        self.devices = gpus + others
        self.fills = {device: 0 for device in self.devices}
        self.raw: DeviceMap = {}
        self.queue, self.pending, self.expanded = deque([""]), {""}, set()
        self.index, self.target, self.placed = -1, 0.0, 0

    def run(self) -> DeviceMap:
        planner, queue = self.planner, self.queue
        while queue:
            name = queue[0]
            if name not in self.pending or name in self.expanded:
                queue.popleft()
                if name in self.expanded and name in self.pending:
                    self.pending.discard(name)
                    queue.extendleft(reversed([m for m in planner.members(name) if m in self.pending]))
                continue
            if self.index < 0:
                self.advance(name)
            device = self.devices[self.index]
            group = planner.group(name, self.pending, self.raw)
            need = sum(planner.cost(member, device) for member in group)
            candidates = [member for member in group if planner.splittable(member)]
            fill, target = self.fills[device], self.target
            closer = fill + need <= self.budgets[device] and fill + need - target < target - fill
            if fill + need <= target or (not candidates and closer):
                self.place(group, device)
            elif candidates:
                self.split(max(candidates, key=lambda member: planner.sizes.get(member, 0)))
            elif not (self.balanced and need > self.budgets[device] and self.skip_ahead(group)):
                self.advance(name)
        return self.raw

    def spilled_with_room_on_gpu_0(self) -> tuple[int, float]:
        """balanced_low_0: bytes sent past the GPUs while GPU 0 had budget left, and GPU 0's fill (``(0, 0)`` if n/a)."""
        gpu_0 = next((device for device in self.devices if isinstance(device, int)), None)
        if not self.low_0 or gpu_0 is None or gpu_0 in self.spread:
            return 0, 0.0
        spilled = sum(fill for device, fill in self.fills.items() if not isinstance(device, int))
        room = self.budgets[gpu_0] - self.fills[gpu_0]
        return (int(min(spilled, room)) if room > 0 else 0), self.fills[gpu_0]

    def place(self, group: list[str], device: Device) -> None:
        for member in group:
            self.raw[member] = device
            self.pending.discard(member)
            self.placed += self.planner.sizes.get(member, 0)
            self.fills[device] += self.planner.cost(member, device)

    def split(self, name: str) -> None:
        children = self.planner.members(name)
        self.pending.update(children)
        if name == self.queue[0]:
            self.queue.popleft()
            self.pending.discard(name)
            self.queue.extendleft(reversed(children))
        else:
            self.expanded.add(name)  # a tied partner: its children take its place when it reaches the front

    def skip_ahead(self, group: list[str]) -> bool:
        """Place an atom too big for the whole current device on the first later device with room, if any."""
        for device in self.devices[self.index + 1 :]:
            need = sum(self.planner.cost(member, device) for member in group)
            if self.fills[device] + need <= self.budgets[device]:
                self.place(group, device)
                return True
        return False

    def advance(self, name: str) -> None:
        """Move on to the next device with a positive target; raise when none is left."""
        while True:
            self.index += 1
            if self.index >= len(self.devices):
                raise ValueError(
                    f"`max_memory` is too small for the model: {name!r} ({self.planner.sizes.get(name, 0)} bytes) "
                    f"fits on no device after the budgets {self.budgets} are used up. Raise the budgets or leave "
                    "'disk' unbudgeted."
                )
            self.target = self.target_of(self.devices[self.index])
            if self.target > self.fills[self.devices[self.index]] or self.index == len(self.devices) - 1:
                return

    def target_of(self, device: Device) -> float:
        """Bytes to put on ``device``: its budget, or for balanced GPUs an even share of what is left."""
        budgets, spread = self.budgets, self.spread
        if self.low_0 and isinstance(device, int) and device not in spread:
            overflow = self.planner.sizes[""] - self.placed - sum(budgets[gpu] for gpu in spread)
            return min(budgets[device], max(0, overflow) + self.low_0_extra)
        if not self.balanced or device not in spread or device == spread[-1]:
            return budgets[device]
        later = spread[spread.index(device) :]
        remaining = self.planner.sizes[""] - self.placed + sum(self.fills[gpu] for gpu in later)
        return min(budgets[device], _water_level(remaining, [budgets[gpu] for gpu in later]))


def clean_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> DeviceMap:
    """The same placement with the fewest keys: a module whose tensors all share one device becomes one key.

    Values are normalised (:func:`normalize_device`); keys come in module order (direct tensors first, then
    children); modules without tensors are dropped. ``{"": device}`` when the whole model is on one device.
    """
    devices = tensor_devices(model, device_map)
    mixed = object()
    state: dict[str, object] = {}
    for name, device in devices.items():
        for prefix in _prefixes(name):
            state[prefix] = device if state.get(prefix, device) == device else mixed
    if not state:
        return {"": normalize_device(next(iter(device_map.values()), "cpu"))}
    modules = dict(model.named_modules(remove_duplicate=False))
    out: DeviceMap = {}
    stack = [""]
    while stack:
        name = stack.pop()
        value = state.get(name)
        if value is mixed:
            stack.extend(reversed(_members(modules, name)))
        elif value is not None:
            out[name] = value  # type: ignore[assignment]
    return out


def check_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> None:
    """Raise ``ValueError`` naming every parameter/buffer the map leaves out, every key naming no module, and bad devices.

    A key covers the module or tensor it names and everything under it (``""`` covers the whole model); a
    tensor goes where its longest covering key says. GPU indices are not checked against the visible GPUs here
    (planning stays pure): see :func:`check_devices_exist`.
    """
    problems = []
    bad_values = {}
    for key, value in device_map.items():
        try:
            normalize_device(value)
        except ValueError:
            bad_values[key] = value
    if bad_values:
        problems.append(f"values that are not devices: {bad_values!r}; use {_ACCEPTED}")
    names = _tensor_names(model)
    known = set(names) | {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = [key for key in device_map if key not in known]
    if unknown:
        problems.append(f"keys that name no module, parameter or buffer of the model: {unknown!r}; check the spelling")
    keys = {key: 0 for key in device_map}
    missing = [name for name in names if _device_of(name, keys) is None]
    if missing:
        problems.append(f"leaves {missing!r} unassigned; add keys for them or their modules, or pass `device_map=\"auto\"`")
    if problems:
        raise ValueError("`device_map` has " + "\n- and ".join(problems) + ".")


def check_devices_exist(device_map: Mapping[str, Device]) -> None:
    """Raise ``ValueError`` naming each GPU of ``device_map`` that is not visible (``torch.cuda.device_count()``).

    Dispatch calls this; planning does not (it may plan for GPUs this process cannot see).
    """
    count = torch.cuda.device_count()
    absent: dict[int, list[str]] = {}
    for key, value in device_map.items():
        device = normalize_device(value)
        if isinstance(device, int) and device >= count:
            absent.setdefault(device, []).append(key)
    if absent:
        details = "; ".join(f"{keys!r} on GPU {gpu} of {count} visible" for gpu, keys in sorted(absent.items()))
        raise ValueError(
            f"`device_map` puts {details}. Use GPU indices below {count}, make the GPUs visible "
            '(CUDA_VISIBLE_DEVICES), or plan with `device_map="auto"`.'
        )
