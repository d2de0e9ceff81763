"""The dispatch hooks, over fake tensors: the real hook classes, with a stand-in for the CUDA prefetcher.

:class:`~lightning_bigmodel.offload.hooks.WeightHook`, ``InputHook`` and ``RootHook`` run unchanged (their copies are
fake, so they cost nothing); :class:`SimPrefetcher` stands in for
:class:`~lightning_bigmodel.offload.prefetch.Prefetcher` (which needs CUDA streams and a thread): it holds the same
copies in flight (the successor's parameters on the execution device, disk reads staged in host RAM on the way), with
no stream. It follows the map's order from the first forward on, where the real one learns that order during the
first forward: the steady state (every later forward, every decode step) is what the peak must cover.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from lightning_bigmodel.offload.attach import _disk_units, stream_bytes  # the real dispatch's choices
from lightning_bigmodel.offload.hooks import HostEntry, InputHook, RootHook, WeightHook
from lightning_bigmodel.offload.readahead import _MAX_BUFFERS
from lightning_bigmodel.offload.stream import ALIGN, DIRECT
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS
from lightning_bigmodel.offload.placement import is_disk


class SimPrefetcher:
    """Memory model of the prefetcher: when a weight hook starts, its successor's parameters are copied in."""

    def __init__(self) -> None:
        self.next: dict[WeightHook, WeightHook] = {}
        self._pending: Optional[tuple[WeightHook, dict[int, torch.Tensor]]] = None

    def set_order(self, hooks: list[WeightHook]) -> None:
        """Each hook is followed by the next one; the last by the first (the next forward)."""
        self.next = {hook: hooks[(i + 1) % len(hooks)] for i, hook in enumerate(hooks)}

    def take(self, hook: WeightHook) -> Optional[dict[int, torch.Tensor]]:
        if self._pending is None or self._pending[0] is not hook:
            return None
        copies = self._pending[1]
        self._pending = None
        return copies

    def started(self, hook: WeightHook) -> None:
        successor = self.next.get(hook)
        if successor is None or (self._pending is not None and self._pending[0] is successor):
            return
        self._pending = None
        self._pending = (successor, _copy_in(successor))

    def end_forward(self) -> None:
        """Nothing to learn: the order is set up front."""


def _copy_in(hook: WeightHook) -> dict[int, torch.Tensor]:
    """The prefetchable tensors of ``hook`` on its device. Disk views are read into page-locked RAM first (the
    prefetcher's staging buffer, sized to the module in flight), so their bytes count in host RAM meanwhile."""
    staged, copies = [], {}
    for index in hook.prefetchable:
        host = hook.entries[index].host
        if is_disk(host):
            staged.append(torch.empty(host.shape, dtype=host.dtype, device="cpu"))
            host = staged[-1]
        copies[index] = host.to(hook.device, copy=True)
    return copies


class SimReadAhead:
    """Memory model of :class:`~lightning_bigmodel.offload.readahead.ReadAhead` (disk weights streamed on a CPU
    execution device) outside the budget: a module's disk bytes are in RAM from just before it runs (or from when the
    module ``depth`` places before it started, read ahead) until it has run; the last module reads the first ahead.
    What an explicit CPU budget is charged (the rest of the stream comes on top of it, see ``infer_device_map``)."""

    def __init__(self, disk_units: Mapping[str, tuple[nn.Module, list[torch.Tensor]]], depth: int) -> None:
        self.tensors = {name: tensors for name, (_, tensors) in disk_units.items()}
        self.order = list(disk_units)
        self.depth = depth
        self.resident: dict[str, list[torch.Tensor]] = {}

    def attach(self, disk_units: Mapping[str, tuple[nn.Module, list[torch.Tensor]]]) -> list:
        handles = []
        for name, (module, _) in disk_units.items():
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.pre(n)))
            handles.append(module.register_forward_hook(lambda *_, n=name: self.post(n), always_call=True))
        return handles

    def _read(self, name: str) -> None:
        if name not in self.resident:
            self.resident[name] = [torch.empty(t.shape, dtype=t.dtype, device="cpu") for t in self.tensors[name]]

    def pre(self, name: str) -> None:
        self._read(name)
        at = self.order.index(name)
        for step in range(1, self.depth + 1):
            self._read(self.order[(at + step) % len(self.order)])

    def post(self, name: str) -> None:
        self.resident.pop(name, None)


class SimStreamPool:
    """Memory model of the same stream in its steady state (every forward after the first, memory short), as a budget
    that holds it (a detected one) is charged: a pool of ``slots`` buffers, each the size of the largest disk unit
    (with the most alignment padding the real buffers can have), held from the first disk unit on until the run ends.
    ``slots`` is the real stream's: its reserve (``1 + READ_AHEAD_LAYERS`` times the largest piece brought in at once,
    what the planner keeps free for it, see :func:`~lightning_bigmodel.offload.attach.stream_bytes`) in buffers
    of the largest unit, at least 2, at most :data:`~lightning_bigmodel.offload.readahead._MAX_BUFFERS` and the number
    of units. A layer of several units fills several buffers at once: the pool, not the unit computing and the one
    read ahead (:class:`SimReadAhead`), is what the process holds."""

    def __init__(self, disk_units: Mapping[str, tuple[nn.Module, list[torch.Tensor]]], stream_bytes: int) -> None:
        units = [[t.numel() * t.element_size() for t in tensors] for _, tensors in disk_units.values()]
        # A real buffer holds its unit's tensors at ALIGN-aligned places, each run of them read at DIRECT-aligned file
        # offsets, in an allocation DIRECT bytes larger: where the files put the tensors is unknown here, so the count
        # comes from the bare bytes and the size from the most padding (an upper bound of the real pool).
        ahead = stream_bytes // max(1, max(map(sum, units), default=0))
        self.slots = max(2, min(len(units), _MAX_BUFFERS, ahead))
        padded = [sum(_up(n, ALIGN) + 2 * DIRECT for n in sizes) + DIRECT for sizes in units]
        self.slot_bytes = max(padded, default=0)
        self.pool: list[torch.Tensor] = []

    def attach(self, disk_units: Mapping[str, tuple[nn.Module, list[torch.Tensor]]]) -> list:
        return [module.register_forward_pre_hook(lambda *_: self.pre()) for module, _ in disk_units.values()]

    def pre(self) -> None:
        if not self.pool:  # allocated under the live-bytes count, on the CPU: the stream's buffers are host memory
            self.pool = [torch.empty(self.slot_bytes, dtype=torch.uint8, device="cpu") for _ in range(self.slots)]


def _up(value: int, step: int) -> int:
    return -(-value // step) * step


def attach_memory_hooks(
    model: nn.Module,
    units: Mapping[str, tuple[nn.Module, torch.device]],
    by_unit: Mapping[str, Mapping[int, HostEntry]],
    groups: list,
    main: torch.device,
    normalized: Mapping[str, object],
    stream_pool: bool = False,
    stream_unit: int = 0,
) -> list:
    """Attach the hooks ``dispatch_model`` would (see ``offload.attach.attach_hooks``) for ``model`` placed as
    ``groups`` by the (normalized) device map ``normalized``; return their handles. ``stream_pool``: a CPU execution
    device's disk stream counts its whole buffer pool (:class:`SimStreamPool`), else the units in RAM at once
    (:class:`SimReadAhead`). ``stream_unit``: a planned map's disk unit, which sizes the pool as it sizes the real one
    (:func:`~lightning_bigmodel.offload.attach.stream_bytes`)."""
    handles = []
    move_io = len({device for _, device in units.values()}) > 1 or bool(by_unit)
    prefetcher = SimPrefetcher() if any(units[name][1].type != "cpu" for name in by_unit) else None
    if prefetcher is None and main.type == "cpu":
        disk_units = _disk_units(model, groups)
        if disk_units:
            if stream_pool:
                pool = SimStreamPool(disk_units, stream_bytes(disk_units, stream_unit))  # as dispatch sizes it
                handles += pool.attach(disk_units)
            else:
                handles += SimReadAhead(disk_units, READ_AHEAD_LAYERS).attach(disk_units)
    if move_io:
        root = RootHook({}, prefetcher, restore_outputs=True)
        handles.append(model.register_forward_pre_hook(root.pre, with_kwargs=True))
        handles.append(model.register_forward_hook(root.post, with_kwargs=True, always_call=True))
    weight_hooks = []
    for name, (module, device) in units.items():
        if name in by_unit:
            hook = WeightHook(name, device, list(by_unit[name].values()), move_io, prefetcher)
            weight_hooks.append(hook)
            handles.append(module.register_forward_pre_hook(hook.pre, with_kwargs=True))
            handles.append(module.register_forward_hook(hook.post, with_kwargs=True, always_call=True))
        elif move_io:
            handles.append(module.register_forward_pre_hook(InputHook(device).pre, with_kwargs=True))
    if prefetcher is not None:
        prefetcher.set_order(weight_hooks)
    return handles
