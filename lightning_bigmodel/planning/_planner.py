"""Greedy device-map planner behind :func:`lightning_bigmodel.planning.device_map.infer_device_map`.

Pure: reads module names, tensor shapes and dtypes only (works on a meta model). :class:`_Planner` holds what
one model needs (sizes, tied groups, splittability) and repeats a :class:`_Pass` (one greedy walk of the module
tree, filling the devices in order; in :mod:`._walk`) to reserve room for offloaded layers on the execution device.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

from torch import nn

from lightning_bigmodel.planning._execution import (
    Choice,
    cpu_execution_line,
    fill_empty_gpus,
    fills_more_gpus,
    leaves_gpu_empty,
    two_slots_message,
)
from lightning_bigmodel.planning._groups import _Groups, _prefixes
from lightning_bigmodel.planning._pinned import _MAX_PASSES, plan_pinned
from lightning_bigmodel.planning._walk import _Pass
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS
from lightning_bigmodel.planning.sizes import _prefix_sizes, compute_module_sizes, find_tied_parameters

if TYPE_CHECKING:
    from lightning_bigmodel.planning.device_map import Device, DeviceMap

Prefetch = Union[bool, str]  # True, False or "auto"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _members(modules: Mapping[str, nn.Module], name: str) -> list[str]:
    """Direct parameters, direct buffers, then children of module ``name`` (``[]`` for a tensor name)."""
    module = modules.get(name)
    if module is None:
        return []
    # The registries themselves: `named_parameters(recurse=False)` walks a generator chain per call (slow at scale).
    groups = (module._parameters, module._buffers, module._modules)
    return [_join(name, member) for group in groups for member, value in group.items() if value is not None]


class _Planner(_Groups):
    """One greedy pass per call of :meth:`fill`; :meth:`plan` repeats it to reserve room on the execution device."""

    def __init__(
        self,
        model: nn.Module,
        no_split: Optional[Sequence[str]],
        dtype,
        offload_buffers: bool,
        quantization=None,
        stream_reserve: bool = False,
        prefetch: Prefetch = "auto",
        execution: str = "auto",
    ) -> None:
        self.prefetch = prefetch  # True: room for two offloaded layers, False: one, "auto": two where they fit
        self.execution = execution  # where offloaded layers compute: "gpu", "cpu", or "auto" (see `plan`)
        self.depth, self.need = 0, 0  # of the last plan: prefetch depth (0: nothing offloaded to a GPU) and reserve
        self.exec_device: Device = "cpu"  # of the last plan: where its offloaded layers execute
        self.has_gpu = self.cpu_exec = False  # cpu_exec: planning the CPU-execution plan (see `plan_cpu`)
        self.note: Optional[str] = None
        self.stream_reserve = stream_reserve  # CPU execution: keep room for the disk stream (detected budgets only)
        self.modules = dict(model.named_modules(remove_duplicate=False))
        method, skip = quantization or (None, None)
        # int4 has no CPU kernel (see integrations/quantization/torchao.py): its offloaded layers execute on a GPU
        self.cpu_kernels = getattr(method, "method", method) != "int4"
        self.sizes = compute_module_sizes(model, dtype, quantization=method, quantization_skip_modules=skip)
        self.buffer_sizes = _prefix_sizes(model.named_buffers(), dtype)
        self.no_split = set(no_split or ())
        unmatched = self.no_split - {type(module).__name__ for module in self.modules.values()}
        if unmatched:  # a typo would silently let those blocks be split across devices
            classes = sorted({type(module).__name__ for module in self.modules.values() if len(module._modules)})
            warnings.warn(
                f"`no_split_module_classes` {sorted(unmatched)} match(es) no module of {type(model).__name__}, so "
                f"nothing is kept whole for it. Classes with submodules in this model: {classes[:12]}.",
                stacklevel=4,
            )
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

    @property
    def gpu_exec(self) -> bool:
        """Whether offloaded ("cpu"/"disk") entries of the plan being made compute on a GPU."""
        return self.has_gpu and not self.cpu_exec

    def splittable(self, name: str) -> bool:
        module = self.modules.get(name)
        return module is not None and type(module).__name__ not in self.no_split and bool(self.members(name))

    def moved(self, name: str) -> int:
        """Bytes of ``name`` a hook brings to the execution device: without its buffers when they stay resident there."""
        return self.sizes.get(name, 0) - (0 if self.offload_buffers else self.buffer_sizes.get(name, 0))

    def unit(self, name: str) -> int:
        """Largest piece of ``name`` brought to the execution device at once: a no-split module or one module's direct
        tensors (see :meth:`moved`)."""
        if name not in self.units:
            if not self.splittable(name):
                self.units[name] = self.moved(name)
            else:
                members = self.members(name)
                direct = sum(self.moved(m) for m in members if m not in self.modules)
                self.units[name] = max([direct] + [self.unit(m) for m in members if m in self.modules])
        return self.units[name]

    def disk_unit(self, raw: DeviceMap) -> int:
        """Largest piece of the ``"disk"`` entries of ``raw`` brought in at once (:meth:`unit`; keys naming tensors of
        one module are one piece): what the CPU's disk stream reserve counts, ``1 + READ_AHEAD_LAYERS`` times."""
        units, direct = [0], {}
        for name, device in raw.items():
            if device != "disk":
                continue
            if name in self.modules:
                units.append(self.unit(name))
            else:
                owner = name.rpartition(".")[0]
                direct[owner] = direct.get(owner, 0) + self.moved(name)
        return max(units + list(direct.values()))

    def largest(self, name: str) -> tuple[int, str]:
        """``(bytes, name)`` of the largest piece under ``name`` brought in at once (see :meth:`unit`)."""
        if not self.splittable(name):
            return self.sizes.get(name, 0), name
        members = self.members(name)
        direct = sum(self.sizes.get(m, 0) for m in members if m not in self.modules)
        return max([(direct, name)] + [self.largest(m) for m in members if m in self.modules])

    def plan(self, budgets: dict[Device, float], balanced: bool, low_0: bool) -> DeviceMap:
        """The plan under ``budgets``, its prefetch depth (:attr:`depth`), reserve (:attr:`need`) and the device its
        offloaded layers execute on (:attr:`exec_device`).

        GPU execution (the lowest GPU of the plan; see :meth:`plan_gpu`) unless ``execution="cpu"``, or, under
        ``"auto"`` (with ``prefetch`` not ``True``, and not int4, which has no CPU kernel), it leaves a budgeted GPU
        without modules that the CPU-execution plan (:meth:`plan_cpu`: no reserve on any GPU) fills; :attr:`note` then
        says why, and the fix."""
        self.has_gpu = any(isinstance(device, int) and budget > 0 for device, budget in budgets.items())
        self.short: dict[int, tuple[Device, int]] = {}
        self.note: Optional[str] = None
        choice = None if self.has_gpu and self.execution == "cpu" else self.plan_gpu(budgets, balanced, low_0)
        if choice is None or (self.execution == "auto" and self.prefetch is not True and self.has_gpu
                              and self.cpu_kernels and leaves_gpu_empty(self, choice.raw, budgets)):  # fmt: skip
            cpu = self.plan_cpu(budgets, balanced, low_0)
            if choice is None or fills_more_gpus(cpu.raw, choice.raw):
                self.note = None if choice is None else cpu_execution_line(self, cpu.raw, choice.raw, budgets)
                choice = cpu
        if choice.short is not None:
            exec_device, need = choice.short
            warnings.warn(
                f"The device map leaves too little room on the execution device {exec_device!r} for the largest "
                f"offloaded layer and the offloaded buffers ({need} bytes): running it may go out of memory. Raise "
                "that device's `max_memory`, or list fewer/smaller classes in `no_split_module_classes`.",
                stacklevel=4,
            )
        self.depth, self.need, self.exec_device = choice.depth, choice.need, choice.device
        return choice.raw

    def plan_gpu(self, budgets: dict[Device, float], balanced: bool, low_0: bool) -> Choice:
        """The plan whose offloaded layers execute on its lowest GPU: with room for two of them there (compute one,
        prefetch the next) unless that costs the GPUs more than one offloaded layer against the plan with room for
        one (fetch, compute, free), or leaves a GPU empty that the one-slot plan uses. An explicit ``prefetch`` keeps
        that depth: False one layer; True two, raising when they leave a GPU empty that the one-slot plan uses."""
        two = self.plan_slots(budgets, balanced, low_0, 2) if self.prefetch is not False or not self.has_gpu else None
        nothing_offloaded = two is not None and not self._offloaded(two)  # then one slot changes nothing
        one = self.plan_slots(budgets, balanced, low_0, 1) if self.has_gpu and not nothing_offloaded else two
        if two is not None and (not self.has_gpu or not self._two_costs_the_gpus(two, one, self.prefetch is True)):
            raw, slots = two, 2
        elif self.prefetch is True:
            raise ValueError(two_slots_message(self, budgets, one))
        else:
            raw, slots = one, 1
        need, exec_device = self._reserve(raw, slots)
        on_gpu = any(isinstance(device, int) for device in raw.values())
        return Choice(raw, slots if self._offloaded(raw) and on_gpu else 0, need, exec_device, self.short.get(slots))

    def plan_cpu(self, budgets: dict[Device, float], balanced: bool, low_0: bool) -> Choice:
        """The plan whose offloaded layers execute on the CPU: "cpu" entries compute in place, "disk" ones are streamed
        to the CPU (as on a machine without GPUs), so the GPUs keep no reserve and hold modules up to their budgets;
        the CPU keeps the disk stream's room (``stream_reserve``) and the buffers of "disk" entries."""
        self.cpu_exec = True
        try:
            raw = fill_empty_gpus(self, self.plan_in_order(budgets, balanced, low_0, 0), budgets)
            need = self._reserve(raw, 0)[0]
        finally:
            self.cpu_exec = False
        return Choice(raw, 0, need, "cpu", self.short.get(0))

    def plan_slots(self, budgets: dict[Device, float], balanced: bool, low_0: bool, slots: int) -> DeviceMap:
        """The in-order plan with room for ``slots`` offloaded layers; when it leaves a budgeted GPU empty while it
        offloads weights, the best plan of :func:`~._pinned.plan_pinned` instead if that keeps more bytes on the GPUs."""
        raw = self.plan_in_order(budgets, balanced, low_0, slots)
        gpus = [device for device, budget in budgets.items() if isinstance(device, int) and budget > 0]
        used = {device for device in raw.values() if isinstance(device, int)}
        if self.has_gpu and set(gpus) - used and self._offloaded(raw):  # a GPU left empty while weights are offloaded
            pinned = plan_pinned(self, budgets, balanced, low_0, slots)
            if pinned is not None and sum(self.gpu_bytes(pinned).values()) > sum(self.gpu_bytes(raw).values()):
                return pinned
        return raw

    def gpu_bytes(self, raw: DeviceMap) -> dict[Device, int]:
        held: dict[Device, int] = {}
        for name, device in raw.items():
            if isinstance(device, int):
                held[device] = held.get(device, 0) + self.sizes.get(name, 0)
        return held

    def _two_costs_the_gpus(self, two: DeviceMap, one: DeviceMap, gpus_only: bool = False) -> bool:
        """Whether room for a second offloaded layer costs the GPUs a GPU that ``one`` uses (or does not fit at all),
        or (unless ``gpus_only``) more bytes than the largest offloaded layer of ``two`` (the slot it adds, with its
        buffers)."""
        held_two, held_one = self.gpu_bytes(two), self.gpu_bytes(one)
        if set(held_one) - set(held_two) or 2 in self.short:
            return True
        if gpus_only:
            return False
        layers = self._offloaded_units(two, whole=True)  # buffers included
        return sum(held_one.values()) - sum(held_two.values()) > max(layers, default=0)

    def plan_in_order(self, budgets: dict[Device, float], balanced: bool, low_0: bool, slots: int = 2) -> DeviceMap:
        """Greedy passes in module order, raising the reserve on the execution device until the plan keeps it."""
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
            need, exec_device = self._reserve(raw, slots)
            if need <= reserves.get(exec_device, 0):
                return raw
            reserves[exec_device] = need
        self.short[slots] = (exec_device, need)  # the plan does not keep its reserve: warned about if chosen
        return raw

    def cost(self, name: str, device: Device) -> int:
        """Bytes ``name`` takes on ``device``: buffers of offloaded modules stay on the execution device."""
        offloaded = device == "disk" or (device == "cpu" and self.gpu_exec)
        if offloaded and not self.offload_buffers:
            return self.sizes.get(name, 0) - self.buffer_sizes.get(name, 0)
        return self.sizes.get(name, 0)

    def _offloaded(self, raw: DeviceMap) -> list[str]:
        return [name for name, device in raw.items() if device == "disk" or (device == "cpu" and self.gpu_exec)]

    def _offloaded_units(self, raw: DeviceMap, whole: bool = False) -> list[int]:
        """The pieces of the offloaded entries brought in at once (:meth:`unit`; ``whole``: buffers included); keys
        naming tensors of one module are one piece (its hook brings them in together)."""
        units, direct = [], {}
        for name in self._offloaded(raw):
            if name in self.modules:
                units.append(self.largest(name)[0] if whole else self.unit(name))
            else:
                owner = name.rpartition(".")[0]
                direct[owner] = direct.get(owner, 0) + (self.sizes.get(name, 0) if whole else self.moved(name))
        return units + list(direct.values())

    def _reserve(self, raw: DeviceMap, slots: int = 2) -> tuple[int, Device]:
        """Bytes the execution device needs beside its own modules: on a GPU the ``slots`` largest offloaded layers (two:
        the prefetcher keeps the layer computing and the next one resident; one: fetch, compute, free); on the CPU, when
        the budget was detected (``stream_reserve``; also under CPU execution), the disk stream (the largest layer plus
        ``READ_AHEAD_LAYERS`` read ahead); and offloaded buffers, once (the layers are counted without them when buffers stay resident)."""
        gpus = [device for device in raw.values() if isinstance(device, int)] if self.gpu_exec else []
        exec_device: Device = min(gpus) if gpus else "cpu"
        offloaded = self._offloaded(raw)
        units = sorted(self._offloaded_units(raw), reverse=True)
        largest = units[0] if units else 0
        if gpus:
            need = sum(units[:slots])
        else:  # an explicit CPU budget is for resident weights; the disk stream comes on top of it
            need = (1 + READ_AHEAD_LAYERS) * largest if self.stream_reserve else 0
        if not self.offload_buffers:
            need += sum(self.buffer_sizes.get(name, 0) for name in offloaded)
        return need, exec_device
