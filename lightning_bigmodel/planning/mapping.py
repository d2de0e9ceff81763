"""Device-map values per tensor and the cleaned map: which device each parameter and buffer lands on (longest key),
and the same placement with the fewest keys. Pure: reads names only."""

from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from lightning_bigmodel.planning._planner import _members, _prefixes
from lightning_bigmodel.planning.devices import Device, DeviceMap, normalize_device

__all__ = ["clean_device_map", "tensor_devices"]


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
