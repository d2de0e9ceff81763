"""Plans of a LightningModule that fit at run time: the memory simulation runs the network the batch goes through.

A LightningModule usually holds the network as one child (``self.model``) and has no ``forward`` of its own (its
``predict_step`` calls the child), so the simulation runs that child, with the map's keys taken relative to it.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
from torch import nn

from lightning_bigmodel.planning.devices import Device, DeviceMap, planned_copy

Memory = dict[Device, dict[str, int]]


def network_of(module: nn.Module) -> tuple[nn.Module, str]:
    """``(network, prefix)``: ``module`` itself when it defines ``forward``, else its one child holding every tensor.

    Raises:
        ValueError: a LightningModule without ``forward`` whose tensors are not all under one child.
    """
    if not isinstance(module, pl.LightningModule) or type(module).forward is not pl.LightningModule.forward:
        return module, ""
    holders = [name for name, child in module.named_children() if any(True for _ in child.parameters())]
    direct = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    if len(holders) != 1 or direct:
        raise ValueError(
            f"`input_shape` needs a module to run: {type(module).__name__} has no `forward` and its weights are not "
            f"all in one child (children with weights: {holders}). Define `forward(input_ids)` on it, or drop "
            "`input_shape`."
        )
    return module.get_submodule(holders[0]), holders[0]


def _relative(device_map: DeviceMap, prefix: str) -> DeviceMap:
    if not prefix:
        return dict(device_map)
    inside = {key[len(prefix) + 1 :]: value for key, value in device_map.items() if key.startswith(prefix + ".")}
    if prefix in device_map:
        inside[""] = device_map[prefix]
    if "" in device_map and not inside:
        inside[""] = device_map[""]
    return inside


def _absolute(device_map: DeviceMap, prefix: str) -> DeviceMap:
    if not prefix:
        return dict(device_map)
    return {(f"{prefix}.{key}" if key else prefix): value for key, value in device_map.items()}


def fitted_plan(
    module: nn.Module, input_shape: Union[str, Sequence[int]], max_new_tokens: int, **planning: Any
) -> tuple[DeviceMap, Memory]:
    """``infer_device_map(module, input_shape=..., **planning)`` run on :func:`network_of` ``module`` (keys made
    absolute again), and the plan's simulated memory."""
    from lightning_bigmodel.fitting import infer_device_map

    network, prefix = network_of(module)
    device_map = infer_device_map(network, input_shape=input_shape, max_new_tokens=max_new_tokens, **planning)
    stream = planning.get("stream_reserve")
    memory = simulated_memory(
        network, device_map, input_shape, max_new_tokens, planning.get("dtype"), planning.get("offload_buffers", False),
        relative=False, stream_pool=planning.get("max_memory") is None if stream is None else stream,
    )  # fmt: skip
    return planned_copy(device_map, _absolute(device_map, prefix)), memory  # the plan's depth, reserve, execution


def simulated_memory(
    module: nn.Module,
    device_map: DeviceMap,
    input_shape: Union[str, Sequence[int]],
    max_new_tokens: int = 0,
    dtype: Optional[Any] = None,
    offload_buffers: bool = False,
    relative: bool = True,
    stream_pool: bool = False,
) -> Memory:
    """Simulated weights and peak per device of ``module`` (or its network) placed as ``device_map`` (``stream_pool``:
    the CPU budget holds the disk stream, as a detected one does; see ``simulate_memory``)."""
    from lightning_bigmodel.fitting import token_ids
    from lightning_bigmodel.simulate.memory import simulate_memory

    network, prefix = network_of(module) if relative else (module, "")
    local = _relative(device_map, prefix)
    return simulate_memory(network, local, token_ids(input_shape), max_new_tokens, dtype, offload_buffers, stream_pool)
