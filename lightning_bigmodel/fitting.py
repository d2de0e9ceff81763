"""Plans that fit at run time: the plan -> simulate -> re-plan loop, above both ``planning`` and ``simulate``.

:func:`infer_device_map` is the public planner: without an input shape it is the pure planner of
:mod:`lightning_bigmodel.planning.device_map`; with one it runs :func:`fit_device_map`: plan, simulate the plan's peak
per device on fake tensors (activations, KV cache, staging of offloaded layers, see
:func:`~lightning_bigmodel.simulate.simulate_memory`), and while a device's peak exceeds its budget, plan again with that
excess reserved on it. A plan that already fits is returned unchanged, so small activations cost no weights.

The loop lives here so that ``planning`` (pure: shapes and budgets) imports nothing of ``simulate`` or ``offload``;
``simulate`` places its fake weights through ``offload``, which reads ``planning``: dependencies point one way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel._keywords import keyword_only
from lightning_bigmodel.planning.budget import check_layer_fits, detect_cpu_memory
from lightning_bigmodel.planning.device_map import ACCELERATE_INFER_ORDER, DeviceMapPlanner, Policy, planning_budgets
from lightning_bigmodel.planning.device_map import infer_device_map as plan_device_map
from lightning_bigmodel.planning.devices import Device, DeviceMap, PlannedDeviceMap, execution_device
from lightning_bigmodel.planning._planner import Prefetch
from lightning_bigmodel.planning.sizes import compute_module_sizes
from lightning_bigmodel.planning.table import bytes_per_device, format_bytes

__all__ = [
    "FittedPlan", "describe_excess", "excess", "fit_device_map", "infer_device_map", "note_unsized_activations",
    "token_ids",
]  # fmt: skip

_MAX_PLANS = 8
_log = logging.getLogger("lightning_bigmodel.planning")

Memory = dict[Device, dict[str, int]]


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
    input_shape: Optional[Union[str, Sequence[int]]] = None,
    max_new_tokens: int = 0,
    stream_reserve: Optional[bool] = None,
    prefetch: Prefetch = "auto",
    offload_execution: str = "auto",
) -> PlannedDeviceMap:
    """Plan ``{module_name: gpu_index | "cpu" | "disk"}`` for ``model`` under ``max_memory``; see
    :func:`lightning_bigmodel.planning.device_map.infer_device_map` for the planner, its policies, ``prefetch`` and
    ``offload_execution``.

    ``input_shape`` (a batch of token ids, ``"4x2048"`` or ``(4, 2048)``) and ``max_new_tokens`` make the plan fit at
    run time (:func:`fit_device_map`): the plan's memory is simulated on fake tensors, and while a device's peak exceeds
    its budget, the model is planned again with that excess reserved there. A plan whose peaks already fit is returned
    as without ``input_shape``. Still pure (fake tensors; no GPU is touched when ``max_memory`` is given). With
    ``max_memory=None``, the detected GPU budgets then keep back only 1 GiB for the CUDA context instead of 10% of the
    card for the activations: the simulation reserves what they need. The CPU counts the same way when it executes
    (no GPU, or a plan computing its offloaded layers there): its peak (weights, the disk stream's buffers and the
    batch's activations) must fit its budget, so under the detected budget (a container's memory limit) the
    activations get room beside the weights, on top of the detected budget's headroom for the process; the detected
    budget holds the disk stream's buffers too (an explicit one has the stream on top, and is charged the disk layer
    computing and the one read ahead).

    Without ``input_shape`` under the detected budget, a plan for the CPU that leaves the activations little room
    (it spills weights to disk, or leaves less than twice the headroom free) is logged once with the fix: the
    activations then get only the fixed headroom of
    :func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`, ``max(256 MiB, 5%)``, shared with the process.

    Raises:
        ValueError: as the planner; for an ``input_shape`` that does not parse, or whose simulated peak fits no plan
            (raised once lowering the budgets moves nothing more, at most after 8 plans); for ``max_new_tokens``
            without ``input_shape``.
    """
    settings = dict(
        no_split_module_classes=no_split_module_classes, dtype=dtype, policy=policy, offload_buffers=offload_buffers,
        quantization=quantization, quantization_skip_modules=quantization_skip_modules, prefetch=prefetch,
        offload_execution=offload_execution,
    )  # fmt: skip
    reserve = max_memory is None if stream_reserve is None else stream_reserve
    if input_shape is None:
        if max_new_tokens:
            raise ValueError(f"`max_new_tokens={max_new_tokens!r}` needs `input_shape` (e.g. '4x2048') to plan for.")
        device_map = plan_device_map(model, max_memory, stream_reserve=reserve, **settings)
        if max_memory is None:
            sizes = compute_module_sizes(model, dtype, quantization=quantization,
                                         quantization_skip_modules=quantization_skip_modules)  # fmt: skip
            note_unsized_activations(device_map, sizes)
        return device_map
    planner = DeviceMapPlanner(model, stream_reserve=reserve, **settings)
    budgets = planning_budgets(max_memory, simulated_activations=True)
    if max_memory is None:  # detected budgets: this process runs the model, so its cgroup limit must hold a layer
        check_layer_fits(*planner.largest())
    sizes = planner.sizes if quantization is not None else None
    fitted = fit_device_map(model, planner, budgets, input_shape, max_new_tokens, dtype, offload_buffers, sizes,
                            stream_pool=reserve)  # a budget holding the stream is charged its whole buffer pool
    planner.report_empty_gpus(fitted.device_map, budgets)
    return fitted.device_map


@dataclass
class FittedPlan:
    """A device map with its simulated memory.

    Attributes:
        device_map: the plan.
        memory: ``{device: {"weights", "peak"}}`` of the plan (as :func:`simulate_memory`; weights at planned size).
        reserved: bytes kept free beside the weights on each device where the first plan did not fit.
        plans: how many plans were made (1 when the first one fit).
    """

    device_map: DeviceMap
    memory: Memory
    reserved: dict[Device, int]
    plans: int


def token_ids(input_shape: Union[str, Sequence[int]]) -> torch.Tensor:
    """A meta batch of token ids (int64) of ``input_shape`` (``"4x2048"`` or ``(4, 2048)``), as example inputs."""
    from lightning_bigmodel.simulate.memory import parse_input_shape  # lazy: fake tensors load when a shape is given

    return torch.empty(parse_input_shape(input_shape), dtype=torch.long, device="meta")


def fit_device_map(
    model: nn.Module,
    plan: Callable[[Mapping[Device, float]], DeviceMap],
    budgets: Mapping[Device, float],
    input_shape: Union[str, Sequence[int]],
    max_new_tokens: int = 0,
    dtype: Optional[torch.dtype] = None,
    offload_buffers: bool = False,
    sizes: Optional[Mapping[str, int]] = None,
    stream_pool: bool = False,
) -> FittedPlan:
    """Plan with ``plan(budgets)``, then re-plan until every simulated peak fits: each device over its budget gets, for
    the next plan, a budget of what this plan holds there (weights, and the planner's reserve on the execution
    device) less the excess, so the excess really moves off it, also where the weights sat below the budget (a CPU
    whose weights all fit, with activations beyond the rest). Stops when a plan repeats (nothing more can move).

    Args:
        model: the (meta) model.
        plan: makes a device map under the budgets it is given (a
            :class:`~lightning_bigmodel.planning.device_map.DeviceMapPlanner`).
        budgets: bytes per device (GPU indices, ``"cpu"``, ``"disk"``); infinite ones are not checked.
        input_shape: shape of a batch of token ids, e.g. ``"4x2048"``.
        max_new_tokens: decode steps to simulate after the forward.
        dtype: as for planning (weights counted in this dtype).
        offload_buffers: as for planning and dispatch.
        sizes: the planner's bytes per module when they differ from the tensors' (quantized weights): the weights
            of each device are then counted at these sizes, and the simulation adds only what it measures beside them.
        stream_pool: the CPU budget holds the disk stream (a detected budget, ``stream_reserve``): a CPU execution
            device is charged the stream's whole buffer pool (see :func:`simulate_memory`).

    Raises:
        ValueError: when ``input_shape`` does not parse, or no plan fits after several tries (naming the devices,
            by how much they are over, and what to change).
    """
    from lightning_bigmodel.simulate.memory import simulate_memory  # lazy: fake tensors load when a shape is given

    inputs = token_ids(input_shape)
    effective, previous = dict(budgets), None
    for count in range(1, _MAX_PLANS + 1):
        device_map = plan(effective)
        if device_map == previous:
            break  # lowering the budgets moved nothing more (e.g. every weight is on disk): no plan will fit
        previous = device_map
        memory = simulate_memory(model, device_map, inputs, max_new_tokens, dtype, offload_buffers, stream_pool)
        if sizes is not None:
            memory = _at_planned_sizes(memory, device_map, sizes)
        over = excess(memory, budgets)
        if not over:
            reserved = {device: int(budgets[device] - effective[device]) for device in budgets
                        if effective[device] < budgets[device]}  # fmt: skip
            _record_activations(device_map, memory)
            return FittedPlan(device_map, memory, reserved, count)
        for device, extra in over.items():
            # The next plan must hold `extra` bytes less on `device` than this one did. Its budget minus `extra` is not
            # enough where the plan left part of the budget unused (a CPU plan whose weights all fit, with activations
            # beyond the rest): cap it below what this plan holds there (weights and the planner's reserve).
            effective[device] = max(0, min(effective[device], _held(device_map, memory, device)) - extra)
    raise ValueError(
        f"No device map keeps the simulated peak of a batch of {tuple(inputs.shape)} "
        f"(max_new_tokens={max_new_tokens}) within `max_memory` after {count} plans: "
        f"{describe_excess(over)}. Use a smaller batch or sequence, or raise `max_memory` (CPU and disk included; "
        "with `max_memory=None`, the memory limit of the container or job, or free memory)."
    )


def _record_activations(device_map: DeviceMap, memory: Memory) -> None:
    """On a plan computing on the CPU, record what its simulated CPU peak holds beside the CPU's weights (activations
    and the disk stream's buffers): the room the plan kept free for the batch, which the disk stream must not fill with
    the weights the plan sent to disk (see :class:`~lightning_bigmodel.planning.devices.PlannedDeviceMap`)."""
    if isinstance(device_map, PlannedDeviceMap) and execution_device(device_map).type == "cpu" and "cpu" in memory:
        device_map.activation_bytes = max(0, memory["cpu"]["peak"] - memory["cpu"]["weights"])


def _held(device_map: DeviceMap, memory: Memory, device: Device) -> int:
    """Bytes ``device_map`` keeps on ``device``: its simulated weights, plus the planner's reserve on the execution
    device (room for offloaded layers on a GPU, or the disk stream on the CPU)."""
    where = execution_device(device_map)
    label: Device = "cpu" if where.type == "cpu" else (where.index or 0)
    reserve = getattr(device_map, "reserve", 0) if label == device else 0
    return memory.get(device, {}).get("weights", 0) + reserve


def note_unsized_activations(device_map: DeviceMap, sizes: Mapping[str, int]) -> None:
    """Log one line when a plan for the CPU under the detected budget, made without ``input_shape``, leaves the
    activations little room: spilling weights to disk, or keeping less than twice the headroom free. The detected
    budget then keeps only its fixed headroom (:func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`) for the
    process and the activations of a forward; a larger batch gets the process OOM-killed under a memory limit."""
    if execution_device(device_map).type != "cpu":
        return
    cpu = detect_cpu_memory()
    held = bytes_per_device(device_map, sizes).get("cpu", 0) + getattr(device_map, "reserve", 0)
    spilled = any(device == "disk" for device in device_map.values())
    if not spilled and cpu.free - held >= 2 * cpu.headroom:
        return
    _log.warning(
        f"Planned for the CPU under the detected budget ({cpu.describe()}) without `input_shape`: the plan keeps "
        f"{format_bytes(held)} for weights and the disk stream, which leaves {format_bytes(max(0, cpu.free - held))} "
        f"for the process and the activations of a forward (the fixed headroom is {format_bytes(cpu.headroom)}); a "
        "larger batch gets the process OOM-killed under a memory limit. Pass `input_shape=` (your largest batch, e.g. "
        "'4x128') to `load_checkpoint_and_dispatch`, `infer_device_map` or the strategy, so that the plan keeps room "
        "for its simulated activations, or give `max_memory={'cpu': ...}` that leaves it."
    )


def excess(memory: Mapping[Device, Mapping[str, int]], budgets: Mapping[Device, float]) -> dict[Device, int]:
    """Bytes by which each device's simulated peak exceeds its (finite) budget; devices that fit are left out."""
    over = {}
    for device, usage in memory.items():
        budget = budgets.get(device)
        if device != "disk" and budget is not None and budget != float("inf") and usage["peak"] > budget:
            over[device] = int(usage["peak"] - budget)
    return over


def describe_excess(over: Mapping[Device, int]) -> str:
    """``"cuda:0 by 1.2 GiB, cpu by 10.0 MiB"``."""
    return ", ".join(f"{f'cuda:{d}' if isinstance(d, int) else d} by {format_bytes(n)}" for d, n in over.items())


def _at_planned_sizes(memory: Memory, device_map: DeviceMap, sizes: Mapping[str, int]) -> Memory:
    planned = bytes_per_device(device_map, sizes)
    out: Memory = {}
    for device, usage in memory.items():
        label = f"cuda:{device}" if isinstance(device, int) else device
        weights = planned.get(label, 0)
        out[device] = {"weights": weights, "peak": usage["peak"] - usage["weights"] + weights}
    return out
