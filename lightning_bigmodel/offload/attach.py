"""Which hooks a dispatched model gets, and on which modules.

Hooks go on the modules the device map names, except that a module without its own ``forward`` (``ModuleList``,
``ModuleDict``: never called) hands its hooks down to its children, recursively. A map entry whose tensors all live on
its execution device gets no weight hook; inputs are moved only when the model spans devices.

A key nested in a key of another execution device (``{"": 0, "model.layers.1": 1}``) computes elsewhere than the
modules around it, which the outer key covers without hooks of their own (``model.norm``, the other layers), and than
its parent's own forward (a residual sum): its outputs go back to the outer key's device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
from torch import nn

from lightning_bigmodel._accelerator import has_streams
from lightning_bigmodel.offload.hooks import HostEntry, InputHook, OutputHook, RootHook, WeightHook
from lightning_bigmodel.offload.placement import TensorGroup, execution_target, is_disk, owner_key
from lightning_bigmodel.offload.prefetch import Prefetcher
from lightning_bigmodel.offload.readahead import ReadAhead, should_release
from lightning_bigmodel.offload.resident import release_reason
from lightning_bigmodel.offload.stream import CopiesOnFirstUse
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS
from lightning_bigmodel.planning.table import format_bytes

_log = logging.getLogger("lightning_bigmodel.offload")


@dataclass
class DispatchState:
    """What :func:`attach_hooks` attached, kept on the dispatched model as ``model._bigmodel_dispatch``.

    Attributes:
        handles: the hook handles (``remove_dispatch`` removes them all; more may be appended).
        prefetcher: the prefetcher (GPU streams), or on a CPU execution device the disk read-ahead
            (:class:`~lightning_bigmodel.offload.readahead.ReadAhead`), to close; else ``None``.
        main_device: where ``"cpu"`` and ``"disk"`` entries execute (read it with
            :func:`~lightning_bigmodel.offload.placement.main_device_of`).
    """

    handles: list = field(default_factory=list)
    prefetcher: Optional[Union[Prefetcher, ReadAhead]] = None
    main_device: Optional[torch.device] = None


def _callable_units(model: nn.Module, key: str) -> dict[str, nn.Module]:
    """Modules under ``key`` whose forward runs: the key's module, or its children when it has no forward."""
    try:
        name, module = key, model.get_submodule(key)
    except AttributeError:  # the key names a parameter or buffer: its module holds the hook
        name = key.rpartition(".")[0]
        name, module = name, model.get_submodule(name)
    if type(module).forward is not nn.Module.forward:
        return {name: module}
    units: dict[str, nn.Module] = {}
    for child_name, _ in module.named_children():
        units.update(_callable_units(model, f"{name}.{child_name}" if name else child_name))
    return units


def _return_devices(model: nn.Module, normalized: Mapping[str, object], main: torch.device) -> dict[str, torch.device]:
    """Hook unit -> the device its outputs go back to, for the units of keys nested in a key computing elsewhere."""
    out: dict[str, torch.device] = {}
    for key, device in normalized.items():
        outer = owner_key(key.rpartition(".")[0], normalized) if key else None
        if outer is None or execution_target(normalized[outer], main) == execution_target(device, main):
            continue
        for name in _callable_units(model, key):
            out[name] = execution_target(normalized[outer], main)
    return out


def _entries_by_unit(
    model: nn.Module, groups: list[TensorGroup], normalized: Mapping[str, object], main: torch.device
) -> tuple[dict[str, tuple[nn.Module, torch.device]], dict[str, dict[int, HostEntry]]]:
    """Every hook unit (name -> module, execution device), and the host tensors each must bring in."""
    units: dict[str, tuple[nn.Module, torch.device]] = {}
    per_key: dict[str, dict[str, nn.Module]] = {}
    for key, device in normalized.items():
        per_key[key] = _callable_units(model, key)
        units.update({name: (module, execution_target(device, main)) for name, module in per_key[key].items()})
    by_unit: dict[str, dict[int, HostEntry]] = {}
    for index, group in enumerate(groups):
        for name, slot in zip(group.names, group.slots):
            key = owner_key(name, normalized)
            if group.tensor.device == execution_target(normalized[key], main):
                continue
            unit = owner_key(name, per_key[key])
            if unit is None:
                raise ValueError(
                    f"`device_map` key {key!r} names a container whose own tensor {name!r} must be moved to "
                    f"{execution_target(normalized[key], main)}, but no forward of it runs. Map its parent instead."
                )
            entries = by_unit.setdefault(unit, {})
            if index not in entries:
                entries[index] = HostEntry(group.tensor, [], group.is_param, writeback=not group.is_param)
            entries[index].slots.append(slot)
    return units, by_unit


def _disk_units(model: nn.Module, groups: list[TensorGroup]) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    """The modules whose own parameters are disk views used in place (CPU execution), with those views.

    The finest modules holding them (a ``Linear``, not its block), so that reading ahead and releasing follow compute
    closely; a module whose forward never runs (a container) is left out: its pages fault in when used.
    """
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    out: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {}
    for group in groups:
        if not (group.is_param and is_disk(group.tensor)):
            continue
        for module, _ in group.slots:
            if type(module).forward is nn.Module.forward:
                continue
            _, tensors = out.setdefault(names[id(module)], (module, []))
            if all(tensor is not group.tensor for tensor in tensors):
                tensors.append(group.tensor)
    return out


def stream_bytes(disk_units: Mapping[str, tuple[nn.Module, list[torch.Tensor]]], unit: int = 0) -> int:
    """Bytes of the disk stream's buffers: ``1 + READ_AHEAD_LAYERS`` times the largest piece brought in at once, as the
    planner's reserve counts it: a planned map's disk unit ``unit`` (a no-split module, or one module's direct
    tensors), else the largest of ``disk_units`` (what the stream reads at once). Not the largest device-map key: a key
    covering a whole container (``""``) would size the stream by all of it."""
    largest = max((sum(t.numel() * t.element_size() for t in tensors) for _, tensors in disk_units.values()), default=0)
    return (1 + READ_AHEAD_LAYERS) * max(unit, largest)


def _release_disk(disk_bytes: int, activations: Optional[int]) -> bool:
    """Whether the disk weights stream each forward (released after use) rather than being read once and kept; logs
    which, and why. ``activations``: the room a plan fitted for a batch kept for them on the CPU (``None``: none)."""
    if not disk_bytes:
        return False
    if activations is None:
        release = should_release(disk_bytes)
        mode = "stream each forward" if release else "are kept after their first read"
        _log.info(f"Disk weights ({format_bytes(disk_bytes)}) {mode}: they take {'more' if release else 'no more'} "
                  "than half of the memory this process can still use (the plan was not fitted for a batch).")
        return release
    reason = release_reason(disk_bytes, activations)
    if reason is None:
        _log.info(f"Disk weights ({format_bytes(disk_bytes)}) are kept after their first read: they fit beside the "
                  f"plan's room for the batch's activations ({format_bytes(activations)}) and the headroom.")
        return False
    _log.info(f"Disk weights stream each forward: {reason}.")
    return True


def attach_hooks(
    model: nn.Module,
    groups: list[TensorGroup],
    normalized: Mapping[str, object],
    main: torch.device,
    prefetch: bool = True,
    activations: Optional[int] = None,
    stream_unit: int = 0,
) -> DispatchState:
    """Attach root, weight and input hooks to ``model`` placed as ``groups`` say; return their handles.

    ``prefetch=False`` (a plan with room for one offloaded layer on the GPU: prefetch depth 1) attaches no prefetcher:
    each offloaded layer is fetched when its forward starts and freed when it ends, so the GPU never holds two.
    ``activations``: the CPU room a plan fitted for a batch kept for its activations
    (:func:`~lightning_bigmodel.planning.devices.activation_bytes_of`): disk weights are kept in memory only beside it.
    ``stream_unit``: a planned map's disk unit, which sizes the disk stream (:func:`stream_bytes`)."""
    state = DispatchState(main_device=main)
    units, by_unit = _entries_by_unit(model, groups, normalized, main)
    move_io = len({device for _, device in units.values()}) > 1 or bool(by_unit)
    disk_bytes = sum(g.tensor.numel() * g.tensor.element_size() for g in groups if is_disk(g.tensor))
    release = _release_disk(disk_bytes, activations if main.type == "cpu" else None)
    if not prefetch and any(has_streams(units[name][1]) for name in by_unit):
        pass  # the plan's prefetch depth is 1: fetch, compute, free (WeightHook alone)
    elif any(has_streams(units[name][1]) for name in by_unit):
        state.prefetcher = Prefetcher()
        state.prefetcher.release_disk = release
    elif main.type == "cpu":
        disk_units = _disk_units(model, groups)
        if disk_units:  # disk weights streamed into reusable buffers behind the compute (never read through the map)
            state.prefetcher = ReadAhead(release=release, stream_bytes=stream_bytes(disk_units, stream_unit))
            for name, (module, tensors) in disk_units.items():
                state.handles += state.prefetcher.attach(name, module, tensors)
    copies = CopiesOnFirstUse(groups, release=release)
    if copies:  # "cpu" weights loaded as file views: copied at the first forward, then independent of the file
        state.handles.append(copies.attach(model))
    guarded = {
        id(e.host): (groups[index].name, e.host)
        for entries in by_unit.values()
        for index, e in entries.items()
        if e.is_param
    }
    guarded.update({id(g.tensor): (g.name, g.tensor) for g in groups if g.is_param and is_disk(g.tensor)})
    if move_io or guarded:
        root = RootHook(dict(guarded.values()), state.prefetcher, restore_outputs=move_io)
        state.handles.append(model.register_forward_pre_hook(root.pre, with_kwargs=True))
        state.handles.append(model.register_forward_hook(root.post, with_kwargs=True, always_call=True))
    for name, (module, device) in units.items():
        if name in by_unit:
            hook = WeightHook(name, device, list(by_unit[name].values()), move_io, state.prefetcher)
            state.handles.append(module.register_forward_pre_hook(hook.pre, with_kwargs=True))
            state.handles.append(module.register_forward_hook(hook.post, with_kwargs=True, always_call=True))
        elif move_io:
            state.handles.append(module.register_forward_pre_hook(InputHook(device).pre, with_kwargs=True))
    for name, device in _return_devices(model, normalized, main).items():
        post = OutputHook(device).post  # after the unit's own hooks: registered last
        state.handles.append(units[name][0].register_forward_hook(post, with_kwargs=True))
    return state
