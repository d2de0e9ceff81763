"""Device-map values: the canonical device of a key, and where offloaded modules compute.

GPU ``k`` of a map is ``torch.device(accelerator_type(), k)``: ``cuda:k`` on NVIDIA and AMD GPUs, the device type of
whichever accelerator is available otherwise (``xpu``, the simulated ``simgpu``); see ``lightning_bigmodel._accelerator``.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

from lightning_bigmodel._accelerator import accelerator_type, gpu

Device = Union[int, str]  # GPU index, "cpu" or "disk" (also "cuda:1"-style strings are accepted on input)
DeviceKey = Device  # a key of a memory budget: a GPU index, "cpu" or "disk"
DeviceMap = dict[str, Device]

_ACCEPTED = 'an int >= 0, "cuda:N", "cpu", "disk" or a torch.device'


def normalize_device(value: Union[Device, torch.device]) -> Device:
    """Canonical form of a device-map value: a GPU index (int), ``"cpu"`` or ``"disk"``.

    Accepts ``1``, ``"1"``, ``"cuda:1"``, ``torch.device("cuda", 1)``, ``"cuda"`` (GPU 0), ``"cpu"``, ``"disk"``, and
    the same forms on the available accelerator's device type (e.g. ``"xpu:1"``, or ``"simgpu:1"`` when simulating).

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
        if value.type == "cuda" or value.type == accelerator_type():
            return 0 if value.index is None else value.index
        if value.type == "cpu":
            return "cpu"
        raise ValueError(f"Device {str(value)!r} cannot hold weights in a device map; use {_ACCEPTED}.")
    raise ValueError(f"Device {value!r} is not a device; use {_ACCEPTED}.")


def as_execution_device(value: Union[Device, torch.device]) -> torch.device:
    """A ``main_device`` as a user passes it, as a ``torch.device`` with an index for GPUs: ``0``, ``"cuda"`` and
    ``"cuda:0"`` are GPU 0 (as in device maps), ``1`` or ``"cuda:1"`` GPU 1 (on the available accelerator); other
    device types (``"cpu"``, ``"meta"``) are kept as they are.

    The index matters: ``torch.device("cuda") != torch.device("cuda", 0)``, so an unindexed execution device makes every
    tensor already on GPU 0 look misplaced (copied in and written back on every forward).

    Raises:
        ValueError: for a value that names no device (``"disk"`` included), naming it.
    """
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        return gpu(normalize_device(value))  # type: ignore[arg-type]
    try:
        device = torch.device(value.strip() if isinstance(value, str) else value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`main_device`={value!r} is not a device that computes; pass a GPU index, 'cuda:N' or 'cpu'.")
    if device.type == "cuda" or device.type == accelerator_type():
        return gpu(0 if device.index is None else device.index)
    return device


def execution_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where offloaded ("cpu"/"disk") modules compute: the device a planned map records (see
    :class:`PlannedDeviceMap`), else the lowest GPU in the map, else CPU."""
    recorded = execution_device_of(device_map)
    if recorded is not None:
        return torch.device("cpu") if recorded == "cpu" else gpu(recorded)  # type: ignore[arg-type]
    gpus = [device for device in map(normalize_device, device_map.values()) if isinstance(device, int)]
    return gpu(min(gpus)) if gpus else torch.device("cpu")


class PlannedDeviceMap(dict):
    """A device map made by the planner, with the facts of its plan beside the entries.

    Attributes:
        prefetch_depth: offloaded layers the execution GPU holds at once: ``2`` (compute one, prefetch the next on a
            side stream), ``1`` (fetch, compute, free: no look-ahead, where room for two would cost the GPUs their
            modules), ``0`` when no offloaded layer computes on a GPU. :func:`~lightning_bigmodel.dispatch_model`
            follows it.
        reserve: bytes kept free on the execution device beside its modules (offloaded layers, offloaded buffers, or
            the disk stream on a CPU execution device).
        execution_device: where the offloaded ("cpu"/"disk") entries compute: a GPU index (the lowest GPU of the
            map, which keeps the room for them), or ``"cpu"``: "cpu" entries compute in place and "disk" ones are
            streamed to the CPU, so the GPUs keep no room for offloaded layers (chosen where that room would leave a
            GPU without modules). ``None`` only on a map made by hand.
        activation_bytes: a plan fitted for a batch (``input_shape``) computing on the CPU: the bytes its simulated CPU
            peak holds beside the CPU's weights (the batch's activations and the disk stream's buffers), which the plan
            kept free by sending weights to disk. The disk stream keeps its weights in memory only where they fit beside
            this room (see :func:`~lightning_bigmodel.offload.resident.release_reason`). ``None`` when not fitted.
        stream_unit: bytes of the largest piece of the ``"disk"`` entries brought in at once (a no-split module, or one
            module's direct tensors): on a CPU execution device the disk stream's buffers take ``1 + READ_AHEAD_LAYERS``
            times it, as the planner's reserve counts. ``0`` without disk entries or on a map made by hand (the stream
            then takes its largest unit: one module's direct tensors).

    A plain ``dict(...)`` copy drops them; :func:`prefetch_depth_of` and :func:`execution_device_of` read them from any
    map (``None`` for a hand-made one).
    """

    prefetch_depth: int = 0
    reserve: int = 0
    execution_device: Optional[Device] = None
    activation_bytes: Optional[int] = None
    stream_unit: int = 0


def stream_unit_of(device_map: Mapping[str, Device]) -> int:
    """The disk unit a planned map records (see :class:`PlannedDeviceMap`), ``0`` for a map made by hand."""
    unit = getattr(device_map, "stream_unit", 0)
    return unit if isinstance(unit, int) and not isinstance(unit, bool) and unit > 0 else 0


def activation_bytes_of(device_map: Mapping[str, Device]) -> Optional[int]:
    """The CPU activation room a plan fitted for a batch records (see :class:`PlannedDeviceMap`), else ``None``."""
    room = getattr(device_map, "activation_bytes", None)
    return room if isinstance(room, int) and not isinstance(room, bool) else None


def prefetch_depth_of(device_map: Mapping[str, Device]) -> Optional[int]:
    """The prefetch depth a planned map records (see :class:`PlannedDeviceMap`), ``None`` for a map made by hand."""
    depth = getattr(device_map, "prefetch_depth", None)
    return depth if isinstance(depth, int) else None


def execution_device_of(device_map: Mapping[str, Device]) -> Optional[Device]:
    """The execution device a planned map records (a GPU index or ``"cpu"``; see :class:`PlannedDeviceMap`), ``None``
    for a map made by hand."""
    device = getattr(device_map, "execution_device", None)
    return device if device == "cpu" or (isinstance(device, int) and not isinstance(device, bool)) else None


def planned_copy(source: Mapping[str, Device], entries: Mapping[str, Device]) -> PlannedDeviceMap:
    """``entries`` as a :class:`PlannedDeviceMap` carrying the plan facts of ``source`` (its prefetch depth, reserve,
    execution device, activation room and disk unit), e.g. the same plan with its keys made absolute."""
    planned = PlannedDeviceMap(entries)
    planned.prefetch_depth = getattr(source, "prefetch_depth", 0)
    planned.reserve = getattr(source, "reserve", 0)
    planned.execution_device = execution_device_of(source)
    planned.activation_bytes = activation_bytes_of(source)
    planned.stream_unit = stream_unit_of(source)
    return planned


def planned_from_json(payload: Mapping[str, object]) -> PlannedDeviceMap:
    """The plan a ``device_map.json`` holds (written by :class:`~lightning_bigmodel.DeviceMapCallback`), with its
    prefetch depth, reserve, execution device, activation room (``activation_bytes``) and disk unit
    (``stream_unit_bytes``) where written, so that dispatching it runs as planned.

    Raises:
        ValueError: when ``payload`` has no ``device_map`` object, or an ``execution_device`` that is neither a GPU
            index nor ``"cpu"``.
    """
    entries = payload.get("device_map")
    if not isinstance(entries, Mapping):
        raise ValueError("The device-map JSON has no `device_map` object; pass the contents of a device_map.json.")
    planned = PlannedDeviceMap((key, normalize_device(value)) for key, value in entries.items())
    planned.prefetch_depth = int(payload.get("prefetch_depth") or 0)  # type: ignore[arg-type]
    planned.reserve = int(payload.get("reserve_bytes") or 0)  # type: ignore[arg-type]
    room = payload.get("activation_bytes")
    planned.activation_bytes = None if room is None else int(room)  # type: ignore[arg-type]
    planned.stream_unit = int(payload.get("stream_unit_bytes") or 0)  # type: ignore[arg-type]
    where = payload.get("execution_device")
    if where is not None:
        device = normalize_device(where)  # type: ignore[arg-type]
        if device == "disk":
            raise ValueError(f"`execution_device` {where!r} in the device-map JSON is not a device that computes.")
        planned.execution_device = device
    return planned


def with_execution(device_map: Mapping[str, Device], setting: str, prefetch: object = "auto") -> Mapping[str, Device]:
    """An explicit ``device_map`` whose offloaded entries compute where ``setting`` says: ``"cpu"``, ``"gpu"`` (its
    lowest GPU), or ``"auto"`` (as the map says: the ``map`` itself is returned).

    Raises:
        ValueError: for a ``setting`` that is none of the three, or ``"cpu"`` with ``prefetch=True``.
    """
    from lightning_bigmodel.planning._execution import check_offload_execution

    check_offload_execution(setting, prefetch)
    if setting == "auto":
        return device_map
    planned = planned_copy(device_map, device_map)
    gpus = [device for device in map(normalize_device, device_map.values()) if isinstance(device, int)]
    planned.execution_device = "cpu" if setting == "cpu" or not gpus else min(gpus)
    planned.prefetch_depth = 0 if planned.execution_device == "cpu" else 1 if prefetch is False else 2
    return planned
