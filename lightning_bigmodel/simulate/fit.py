"""Plans that fit at run time: re-plan with room reserved for what the memory simulation measures beside the weights.

:func:`fit_device_map` is what :func:`~lightning_bigmodel.infer_device_map` runs when it is given an input shape: plan,
simulate the plan's peak per device (activations, KV cache, staging of offloaded layers, see
:func:`~lightning_bigmodel.simulate.simulate_memory`), and while a device's peak exceeds its budget, plan again with
that excess reserved on it. A plan that already fits is returned unchanged, so small activations cost no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel.planning.devices import Device, DeviceMap
from lightning_bigmodel.planning.table import bytes_per_device, format_bytes
from lightning_bigmodel.simulate.memory import parse_input_shape, simulate_memory

_MAX_PLANS = 8

Memory = dict[Device, dict[str, int]]


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
) -> FittedPlan:
    """Plan with ``plan(budgets)``, then re-plan with each device's simulated excess reserved until every peak fits.

    Args:
        model: the (meta) model.
        plan: makes a device map under the budgets it is given (the planner of ``infer_device_map``).
        budgets: bytes per device (GPU indices, ``"cpu"``, ``"disk"``); infinite ones are not checked.
        input_shape: shape of a batch of token ids, e.g. ``"4x2048"``.
        max_new_tokens: decode steps to simulate after the forward.
        dtype: as for planning (weights counted in this dtype).
        offload_buffers: as for planning and dispatch.
        sizes: the planner's bytes per module when they differ from the tensors' (quantized weights): the weights
            of each device are then counted at these sizes, and the simulation adds only what it measures beside them.

    Raises:
        ValueError: when ``input_shape`` does not parse, or no plan fits after several tries (naming the devices,
            by how much they are over, and what to change).
    """
    inputs = token_ids(input_shape)
    reserved: dict[Device, int] = {}
    for count in range(1, _MAX_PLANS + 1):
        effective = {device: max(0, budget - reserved.get(device, 0)) for device, budget in budgets.items()}
        device_map = plan(effective)
        memory = simulate_memory(model, device_map, inputs, max_new_tokens, dtype, offload_buffers)
        if sizes is not None:
            memory = _at_planned_sizes(memory, device_map, sizes)
        over = excess(memory, budgets)
        if not over:
            return FittedPlan(device_map, memory, reserved, count)
        for device, extra in over.items():
            reserved[device] = reserved.get(device, 0) + extra
    raise ValueError(
        f"No device map keeps the simulated peak of a batch of {tuple(inputs.shape)} "
        f"(max_new_tokens={max_new_tokens}) within `max_memory` after {_MAX_PLANS} plans: "
        f"{describe_excess(over)}. Use a smaller batch or sequence, or raise `max_memory` (CPU and disk included)."
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
