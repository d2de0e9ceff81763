"""Where each tensor of a model lives, and how it is installed there: shared by loading and dispatching.

A *target* is a ``torch.device`` (a GPU, or ``cpu`` = RAM) or the string ``"disk"`` (a CPU tensor that is a
memory-mapped view of a safetensors file). Parameters of ``"cpu"``/``"disk"`` map entries are host tensors; their
buffers stay on the execution device unless ``offload_buffers=True``, and then live in (pinned) RAM, never on disk
(they are small and may be written back after each forward).
"""

from __future__ import annotations

from contextlib import contextmanager

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Union

import torch
from torch import nn

from lightning_bigmodel._accelerator import can_pin, gpu
from lightning_bigmodel.offload.pinned import pinned_copy
from lightning_bigmodel.offload.subclass import is_pinned, is_wrapped, map_inner
from lightning_bigmodel.planning.device_map import CheckedDeviceMap, checked_device_map, normalize_device

Target = Union[torch.device, str]
DISK = "disk"
_CPU = torch.device("cpu")
_DISK_FLAG = "_bigmodel_on_disk"
DISPATCH_STATE = "_bigmodel_dispatch"  # module attribute holding the hooks of a dispatched model


@dataclass
class TensorGroup:
    """One tensor object and every ``(module, attribute)`` slot holding it (more than one when tied)."""

    names: list[str]
    slots: list[tuple[nn.Module, str]]
    is_param: bool
    persistent: bool
    tensor: torch.Tensor
    target: Optional[Target] = None
    map_devices: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]


def tensor_groups(model: nn.Module) -> list[TensorGroup]:
    """Every parameter and buffer of ``model``, ties grouped (``named_modules(remove_duplicate=False)`` order)."""
    groups: dict[int, TensorGroup] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for kind, store in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, tensor in store.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{attr}" if prefix else attr
                group = groups.get(id(tensor))
                if group is None:
                    persistent = kind == "param" or attr not in module._non_persistent_buffers_set
                    group = groups[id(tensor)] = TensorGroup([], [], kind == "param", persistent, tensor)
                group.names.append(name)
                group.slots.append((module, attr))
    return list(groups.values())


def owner_key(name: str, keys: Mapping[str, object]) -> Optional[str]:
    """The longest key of ``keys`` that is ``name`` or a dotted prefix of it (``""`` matches everything)."""
    prefix = name
    while True:
        if prefix in keys:
            return prefix
        if not prefix:
            return None
        cut = prefix.rfind(".")
        prefix = prefix[:cut] if cut >= 0 else ""


def execution_target(device, main_device: torch.device) -> torch.device:
    """Where a map entry computes: its GPU, else the main execution device."""
    return gpu(device) if isinstance(device, int) else main_device


def validate_device_map(model: nn.Module, device_map: Mapping[str, object]) -> CheckedDeviceMap:
    """The map checked once (misses tensors, unknown modules or devices, absent GPUs raise ``ValueError``).

    An already :class:`~lightning_bigmodel.planning.device_map.CheckedDeviceMap` for ``model`` passes through as is.
    """
    return checked_device_map(model, device_map)


def _rank(device) -> tuple[int, int]:
    if isinstance(device, int):
        return (0, device)
    return (1, 0) if device == "cpu" else (2, 0)


def assign_targets(
    groups: list[TensorGroup],
    device_map: Optional[Mapping[str, object]],
    main_device: torch.device,
    offload_buffers: bool,
) -> None:
    """Set ``group.target`` for every group. A tied group goes to the fastest entry among its aliases' (GPU < cpu <
    disk): aliases mapped elsewhere then find it resident, or copy it in through their hooks.
    ``device_map=None`` keeps real tensors where they are and sends meta ones to CPU.
    """
    normalized = None if device_map is None else {k: normalize_device(v) for k, v in device_map.items()}
    for group in groups:
        if normalized is None:
            group.target = _CPU if group.tensor.device.type == "meta" else group.tensor.device
            continue
        devices = [normalized[owner_key(name, normalized)] for name in group.names]
        group.map_devices = devices
        best = min(devices, key=_rank)
        if isinstance(best, int):
            group.target = gpu(best)
        elif not group.is_param:
            group.target = _CPU if offload_buffers else main_device
        else:
            group.target = DISK if best == DISK else _CPU


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` or one of its submodules carries the hooks of ``dispatch_model``."""
    return any(DISPATCH_STATE in module.__dict__ for module in model.modules())


def dispatched_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of ``model`` and every submodule that ``dispatch_model`` dispatched (outermost first)."""
    return [(name, module) for name, module in model.named_modules() if DISPATCH_STATE in module.__dict__]


def main_device_of(model: nn.Module) -> Optional[torch.device]:
    """Where the ``"cpu"``/``"disk"`` entries of ``model`` execute: the ``main_device`` of ``model``'s dispatch, else
    of its first dispatched submodule (e.g. ``self.model`` of a LightningModule); ``None`` when nothing is dispatched.
    """
    for _, module in dispatched_modules(model):
        return getattr(module.__dict__[DISPATCH_STATE], "main_device", None)
    return None


def pin_host(main_device: torch.device) -> Optional[torch.device]:
    """The GPU host copies feed when they should be pinned (its accelerator supports pinned memory), else ``None``.

    Pass the result as ``pin`` to :func:`is_at` and :func:`to_host` (only its truth matters to the first)."""
    return main_device if can_pin(main_device) else None


def mark_disk(tensor: torch.Tensor) -> torch.Tensor:
    """Record that ``tensor`` is a file-backed view (so dispatch neither copies nor pins it)."""
    setattr(tensor, _DISK_FLAG, True)
    return tensor


def is_disk(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, _DISK_FLAG, False))


def is_at(tensor: torch.Tensor, target: Target, pin: Union[bool, torch.device, None]) -> bool:
    """Whether ``tensor`` already sits at ``target`` (RAM tensors must also be pinned when ``pin``)."""
    if target == DISK:
        return is_disk(tensor)
    if tensor.device != target:
        return False
    if target.type == "cpu":
        return not is_disk(tensor) and (not pin or is_pinned(tensor))
    return True


def to_host(tensor: torch.Tensor, pin: Union[bool, torch.device, None]) -> torch.Tensor:
    """A RAM copy of ``tensor`` (pinned when ``pin``); a CPU tensor that is not file-backed is reused when possible.

    ``pin`` is the GPU the copy feeds (from :func:`pin_host`): the copy is page-locked at its own size
    (:mod:`~lightning_bigmodel.offload.pinned`, no power-of-two rounding, given back to the OS when freed). A tensor
    subclass holding inner tensors (a quantized weight) is copied part by part and keeps its class.
    """
    if tensor.device.type == "cpu" and not is_disk(tensor) and (not pin or is_pinned(tensor)):
        return tensor
    if is_wrapped(tensor):
        return map_inner(tensor, lambda part: to_host(part, pin))
    if isinstance(pin, torch.device):
        return pinned_copy(tensor, pin)
    if pin:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.to("cpu", copy=True)


def install(group: TensorGroup, tensor: torch.Tensor) -> torch.Tensor:
    """Put ``tensor`` in every slot of ``group`` (one shared ``Parameter`` for tied parameters); return what was set."""
    if group.is_param:
        value = nn.Parameter(tensor, requires_grad=False)
        if is_disk(tensor):
            mark_disk(value)
        for module, attr in group.slots:
            module._parameters[attr] = value
    else:
        value = tensor
        for module, attr in group.slots:
            module._buffers[attr] = value
    group.tensor = value
    return value


class SavedSlots:
    """Every parameter and buffer slot of a model as it was (see :func:`restored_on_error`)."""

    def __init__(self, model: nn.Module) -> None:
        self.stores = [
            (store, dict(store))
            for module in model.modules()
            for store in (module._parameters, module._buffers)
        ]
        self._slots: dict[int, list[tuple[dict, str]]] = {}
        for _, before in self.stores:
            for key, value in before.items():
                if value is not None:
                    self._slots.setdefault(id(value), []).append((before, key))

    def replace(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """``new`` holds ``old``'s values in the same place (a pinned copy of a RAM tensor): a restore puts ``new``
        back instead, so ``old`` is not kept alive here. Dispatching a model already in RAM then frees each original
        as soon as its pinned copy is installed, instead of holding the whole model twice."""
        for before, key in self._slots.pop(id(old), []):
            before[key] = new

    def restore(self) -> None:
        for store, before in self.stores:
            store.clear()
            store.update(before)


@contextmanager
def restored_on_error(model: nn.Module) -> Iterator[SavedSlots]:
    """Put every parameter and buffer slot of ``model`` back as it was if the body raises (no partial placement)."""
    saved = SavedSlots(model)
    try:
        yield saved
    except BaseException:
        saved.restore()
        raise
