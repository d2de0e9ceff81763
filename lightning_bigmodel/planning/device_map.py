"""Device-map planning (policies), checking and cleaning. Pure: reads shapes and dtypes only."""

from __future__ import annotations

import logging
import math
import weakref
from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel._keywords import keyword_only
from lightning_bigmodel.planning._execution import EXECUTION_CHOICES, check_offload_execution
from lightning_bigmodel.planning._planner import Prefetch, _Planner
from lightning_bigmodel.planning._interleave import interleave_resident
from lightning_bigmodel.planning.mapping import _device_of, _tensor_names, clean_device_map, tensor_devices
from lightning_bigmodel.planning._report import empty_gpu_lines
from lightning_bigmodel.planning._visible import check_budget_devices_exist, check_devices_exist
from lightning_bigmodel.planning.budget import check_layer_fits, get_max_memory
from lightning_bigmodel.planning.devices import (
    _ACCEPTED,
    Device,
    DeviceMap,
    PlannedDeviceMap,
    activation_bytes_of,
    execution_device,
    execution_device_of,
    normalize_device,
    prefetch_depth_of,
    stream_unit_of,
)

__all__ = [
    "EXECUTION_CHOICES",
    "POLICIES",
    "PREFETCH_CHOICES",
    "CheckedDeviceMap",
    "DeviceMapPlanner",
    "PlannedDeviceMap",
    "planning_budgets",
    "Policy",
    "check_budget_devices_exist",
    "check_device_map",
    "checked_device_map",
    "check_devices_exist",
    "clean_device_map",
    "execution_device",
    "infer_device_map",
    "largest_layer",
    "normalize_device",
    "tensor_devices",
]

Policy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")
PREFETCH_CHOICES = (True, False, "auto")
_log = logging.getLogger("lightning_bigmodel.planning")


# accelerate's `infer_device_map` arguments after `max_memory`, in its order (ours, or None where we have no such one):
# a positional call written for accelerate is refused naming our keywords (see `_keywords.keyword_only`).
ACCELERATE_INFER_ORDER = (
    ("no_split_module_classes", "no_split_module_classes"), ("dtype", "dtype"), ("special_dtypes", None),
    ("verbose", None), ("clean_result", None), ("offload_buffers", "offload_buffers"), ("fallback_allocation", None),
)  # fmt: skip


@keyword_only(ACCELERATE_INFER_ORDER)
def infer_device_map(
    model: nn.Module,
    max_memory: Optional[Mapping[Device, Union[int, str]]] = None,
    *,
    no_split_module_classes: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    policy: Policy = "auto",
    offload_buffers: bool = False,
    quantization: Optional[str] = None,
    quantization_skip_modules: Optional[Sequence[str]] = None,
    stream_reserve: Optional[bool] = None,
    prefetch: Prefetch = "auto",
    offload_execution: str = "auto",
) -> PlannedDeviceMap:
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
    are charged to the execution device (the lowest GPU in the map, else cpu), once. A module's own tensors (its
    parameters and buffers, not its children's) always share one device.

    Prefetch depth: when something is offloaded while GPUs are used, room for the largest offloaded layers (a no-split
    module, or the direct tensors of one module, without buffers that stay resident) is reserved on the execution GPU
    by planning again with that reserve. ``prefetch="auto"`` reserves two layers (compute one, prefetch the next on a
    side stream) unless that room costs the GPUs a GPU the one-layer plan uses, or more bytes than one offloaded layer;
    then it reserves one (fetch, compute, free: no look-ahead). ``True`` keeps two and raises when they cost the GPUs
    their modules; ``False`` keeps one. The depth is recorded on the result (``.prefetch_depth``: 2, 1, or 0 when no
    offloaded layer computes on a GPU) and :func:`~lightning_bigmodel.dispatch_model` follows it. When the in-order walk
    leaves a budgeted GPU empty while it offloads weights (e.g. no GPU holds its first modules beside the reserve),
    each GPU in turn is also tried as the execution device, with what does not fit there sent to the later devices;
    that plan wins, out of module order, when it keeps more bytes on the GPUs. A budgeted GPU left empty while weights
    are offloaded is logged (one line: its budget, what did not fit, the fix).

    Execution device (``offload_execution``): where the offloaded ("cpu"/"disk") layers compute, recorded on the result
    (``.execution_device``: a GPU index, or ``"cpu"``) and followed by dispatch. ``"gpu"``: the lowest GPU of the plan,
    with the room above. ``"cpu"``: "cpu" entries compute in place and "disk" ones stream to the CPU (as without GPUs),
    so no GPU keeps room for offloaded layers; a budgeted GPU the in-order walk passed over (its next module did not
    fit) then takes the largest offloaded pieces that fit it, out of module order. ``"auto"`` (default): ``"gpu"``
    unless that plan leaves a budgeted GPU without modules that the ``"cpu"`` plan fills (logged, with the budget that
    would keep the layers on the GPU); ``prefetch=True`` and int4 quantization (no CPU kernel) keep ``"gpu"``.

    Under CPU execution, the "cpu" members of a run of identical sibling blocks (one class and size under one parent,
    e.g. a ``ModuleList`` of decoder layers) are spread evenly among its "disk" members, with the same bytes per device:
    the disk stream then reads while each resident block computes, instead of standing idle through a run of them
    (:mod:`~lightning_bigmodel.planning._interleave`). Blocks holding a tied weight keep their place.

    With no GPU and a detected budget (``max_memory=None``), the CPU reserves ``1 + READ_AHEAD_LAYERS`` times the
    largest disk layer for streaming disk weights (the layer computing and the ones read ahead); an explicit CPU budget
    is for resident weights and the stream comes on top of it (``stream_reserve`` overrides that choice: pass ``True``
    with a budget that was detected elsewhere, as the Lightning callback does). Linear in the number of modules and
    tensors.

    ``quantization`` (``"int8"``/``"int4"``) sizes the weights it will quantize at their quantized bytes (about a
    quarter of float32 for int8, plus scales; see :func:`~lightning_bigmodel.planning.sizes.compute_module_sizes`), so
    more layers fit on each device; ``quantization_skip_modules`` as for loading.

    Planning for an input shape (activations, KV cache) is :func:`lightning_bigmodel.infer_device_map` (``input_shape=``),
    which re-plans with what the memory simulation measures; this function is the pure planner under it.

    Raises:
        ValueError: for an unknown ``policy`` or ``prefetch``, a malformed ``max_memory``, a budgeted disk that is used
            up, ``prefetch=True`` when two offloaded layers do not fit beside the GPU's modules (naming the room needed
            and the budget); with ``max_memory=None``, when the process's memory cgroup leaves less room than the
            largest layer.
    """
    planner = DeviceMapPlanner(
        model, no_split_module_classes=no_split_module_classes, dtype=dtype, policy=policy,
        offload_buffers=offload_buffers, quantization=quantization, quantization_skip_modules=quantization_skip_modules,
        stream_reserve=max_memory is None if stream_reserve is None else stream_reserve, prefetch=prefetch,
        offload_execution=offload_execution,
    )  # fmt: skip
    budgets = planning_budgets(max_memory)
    if max_memory is None:  # detected budgets: this process runs the model, so its cgroup limit must hold a layer
        check_layer_fits(*planner.largest())
    device_map = planner(budgets)
    planner.report_empty_gpus(device_map, budgets)
    return device_map


def planning_budgets(
    max_memory: Optional[Mapping[Device, Union[int, str]]], simulated_activations: bool = False
) -> dict[Device, float]:
    """``get_max_memory(max_memory)`` with an unlimited ``"disk"`` unless budgeted (the planner's budgets)."""
    budgets: dict[Device, float] = dict(get_max_memory(max_memory, simulated_activations=simulated_activations))
    budgets.setdefault("disk", math.inf)  # get_max_memory orders "disk" last; setdefault appends it last
    return budgets


class DeviceMapPlanner:
    """The planner of one model and its settings (as :func:`infer_device_map`): call it with budgets in bytes (see
    :func:`planning_budgets`) for a :class:`PlannedDeviceMap`; call it again under other budgets to re-plan (the
    fit-to-peak loop of :func:`lightning_bigmodel.infer_device_map` does).

    Attributes:
        sizes: bytes per module prefix as planned (quantized weights at their quantized size).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        no_split_module_classes: Optional[Sequence[str]] = None,
        dtype: Optional[torch.dtype] = None,
        policy: Policy = "auto",
        offload_buffers: bool = False,
        quantization: Optional[str] = None,
        quantization_skip_modules: Optional[Sequence[str]] = None,
        stream_reserve: bool = False,
        prefetch: Prefetch = "auto",
        offload_execution: str = "auto",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"`policy={policy!r}` is not a device-map policy; choose one of {list(POLICIES)}.")
        if prefetch not in PREFETCH_CHOICES or isinstance(prefetch, int) and not isinstance(prefetch, bool):
            raise ValueError(f"`prefetch={prefetch!r}` is not a prefetch setting; pass True, False or \"auto\".")
        check_offload_execution(offload_execution, prefetch)
        self.model, self.policy = model, policy
        quantized = (quantization, quantization_skip_modules)
        self._planner = _Planner(model, no_split_module_classes, dtype, offload_buffers, quantized,
                                 stream_reserve=stream_reserve, prefetch=prefetch,
                                 execution=offload_execution)  # fmt: skip
        self.sizes = self._planner.sizes

    def largest(self) -> tuple[int, str]:
        """``(bytes, name)`` of the largest piece brought in at once (see :func:`largest_layer`)."""
        return self._planner.largest("")

    def __call__(self, budgets: Mapping[Device, float]) -> PlannedDeviceMap:
        policy = self.policy
        raw = self._planner.plan(dict(budgets), balanced=policy != "sequential", low_0=policy == "balanced_low_0")
        if self._planner.exec_device == "cpu":  # the disk stream reads during resident blocks (see `_interleave`)
            raw = interleave_resident(raw, self._planner)
        planned = PlannedDeviceMap(clean_device_map(self.model, raw))
        planned.prefetch_depth, planned.reserve = self._planner.depth, self._planner.need
        planned.execution_device = self._planner.exec_device
        planned.stream_unit = self._planner.disk_unit(raw)
        return planned

    def report_empty_gpus(self, device_map: Mapping[str, Device], budgets: Mapping[Device, float]) -> None:
        """Log one line per budgeted GPU that ``device_map`` leaves empty while it offloads weights, and one saying why
        the offloaded layers run on the CPU when the plan chose that (the last plan made)."""
        on_cpu = execution_device_of(device_map) == "cpu"
        if on_cpu and self._planner.note:
            _log.warning(self._planner.note)
        reserve = 0 if on_cpu else getattr(device_map, "reserve", 0)  # a CPU execution keeps no room on a GPU
        for line in empty_gpu_lines(self._planner, device_map, budgets, reserve):
            _log.warning(line)


def largest_layer(
    model: nn.Module,
    no_split_module_classes: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    quantization_skip_modules: Optional[Sequence[str]] = None,
) -> tuple[int, str]:
    """``(bytes, name)`` of the largest piece of ``model`` that must be in memory at once: a no-split module, or the
    direct tensors of one module (the unit a device map cannot split further)."""
    planner = _Planner(model, no_split_module_classes, dtype, False, (quantization, quantization_skip_modules))
    return planner.largest("")


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


class CheckedDeviceMap(dict):
    """A device map already checked against one model: values normalised, every tensor covered, GPUs visible.

    Made by :func:`checked_device_map` where a map enters the library; the functions it is passed down to see the
    type and skip the checks, so a map is validated once per call chain.
    """

    __slots__ = ("_model", "prefetch_depth", "execution_device", "activation_bytes", "stream_unit")  # a plan's facts


def checked_device_map(model: nn.Module, device_map: Mapping[str, Device]) -> CheckedDeviceMap:
    """``device_map`` checked against ``model`` (:func:`check_device_map`, :func:`check_devices_exist`), values normalised.

    A :class:`CheckedDeviceMap` already checked for this very model is returned as it is.

    Raises:
        ValueError: as :func:`check_device_map` and :func:`check_devices_exist`.
    """
    if isinstance(device_map, CheckedDeviceMap) and device_map._model() is model:
        return device_map
    check_device_map(model, device_map)
    check_devices_exist(device_map)
    checked = CheckedDeviceMap((key, normalize_device(value)) for key, value in device_map.items())
    checked._model = weakref.ref(model)
    depth, where = prefetch_depth_of(device_map), execution_device_of(device_map)
    if depth is not None:
        checked.prefetch_depth = depth
    if where is not None:
        checked.execution_device = where
    if activation_bytes_of(device_map) is not None:  # a plan fitted for a batch: the disk stream keeps clear of it
        checked.activation_bytes = activation_bytes_of(device_map)
    if stream_unit_of(device_map):  # the planner's disk unit: what the stream's buffers are sized by
        checked.stream_unit = stream_unit_of(device_map)
    return checked
