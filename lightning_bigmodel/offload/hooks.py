"""Forward hooks of a dispatched model: bring offloaded weights in just in time, move inputs and outputs.

All hooks are native (``register_forward_pre_hook`` / ``register_forward_hook`` with ``with_kwargs=True``);
``forward`` is never reassigned. A :class:`WeightHook` swaps device copies of a module's host tensors into
``module._parameters`` / ``module._buffers`` before its forward and puts the host tensors back afterwards (also when
the forward raises: ``always_call=True``), so between calls the model holds exactly what loading placed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from lightning_bigmodel._accelerator import is_gpu
from lightning_bigmodel.offload.subclass import copy_to, is_pinned


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor, through nested tuples (named ones too), lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        mapped = [map_tensors(item, fn) for item in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    if isinstance(obj, list):
        return [map_tensors(item, fn) for item in obj]
    if isinstance(obj, dict):
        return type(obj)((key, map_tensors(value, fn)) for key, value in obj.items())
    return obj


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (see :func:`map_tensors`)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == device:
            return tensor
        return tensor.to(device, non_blocking=is_gpu(device))  # never non_blocking towards the host

    return map_tensors(obj, move)


def first_tensor_device(obj: Any) -> Optional[torch.device]:
    """Device of the first tensor found in ``obj`` (depth first), or ``None``."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, (tuple, list)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for item in items:
        device = first_tensor_device(item)
        if device is not None:
            return device
    return None


@dataclass
class HostEntry:
    """One host tensor a :class:`WeightHook` brings in, and every slot (tied aliases) inside its module holding it."""

    host: torch.Tensor
    slots: list[tuple[nn.Module, str]]
    is_param: bool
    writeback: bool  # buffers: copy the value the forward leaves back into ``host``


class WeightHook:
    """Pre/post forward hooks of one device-map entry whose tensors live off its execution device.

    Args:
        name: the entry's module name (for messages).
        device: the execution device.
        entries: the host tensors to bring in.
        move_inputs: also move the forward's tensor arguments to ``device``.
        prefetcher: a :class:`~lightning_bigmodel.offload.prefetch.Prefetcher` (CUDA only), or ``None``.
    """

    def __init__(
        self, name: str, device: torch.device, entries: Sequence[HostEntry], move_inputs: bool, prefetcher=None
    ) -> None:
        self.name = name
        self.device = device
        self.entries = list(entries)
        self.move_inputs = move_inputs
        self.prefetcher = prefetcher
        self.prefetchable = [i for i, entry in enumerate(self.entries) if entry.is_param]

    def fetch(self, index: int) -> torch.Tensor:
        host = self.entries[index].host
        return copy_to(host, self.device, non_blocking=is_pinned(host))

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        ready = self.prefetcher.take(self) if self.prefetcher is not None else None
        ready = ready or {}
        for index, entry in enumerate(self.entries):
            copy = ready.get(index)
            _install(entry, self.fetch(index) if copy is None else copy)
        if self.prefetcher is not None:
            self.prefetcher.started(self)
        if self.move_inputs:
            return move_to(args, self.device), move_to(kwargs, self.device)
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for entry in self.entries:
            module_, attr = entry.slots[0]
            current = (module_._parameters if entry.is_param else module_._buffers)[attr]
            if entry.writeback and current is not None and current is not entry.host and not current.is_meta:
                with torch.no_grad():
                    entry.host.copy_(current)  # blocking: the host value is right as soon as forward returns
            _install(entry, entry.host)
        return None


def _install(entry: HostEntry, tensor: torch.Tensor) -> None:
    if entry.is_param:
        value = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
        for module, attr in entry.slots:
            module._parameters[attr] = value
    else:
        for module, attr in entry.slots:
            module._buffers[attr] = tensor


class InputHook:
    """Pre-forward hook moving a module's tensor arguments to its execution device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def pre(self, module: nn.Module, args: tuple, kwargs: dict):
        return move_to(args, self.device), move_to(kwargs, self.device)


class OutputHook:
    """Forward hook moving a module's tensor outputs to ``device`` (a key nested in a key of another device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return move_to(output, self.device)


class RootHook:
    """Hooks of the dispatched root: refuse training through offloaded weights, mark forward boundaries for the
    prefetcher, and return outputs to the device of the first input tensor (when the model spans devices).

    The input device is remembered per thread (micro-batches of a pipelined forward run in threads), and per call
    depth within a thread (a root called inside its own forward, e.g. a sub-network sharing the hooks).
    """

    def __init__(self, guarded: Mapping[str, torch.Tensor], prefetcher=None, restore_outputs: bool = False) -> None:
        self.guarded = dict(guarded)  # parameter name -> offloaded host tensor
        self.prefetcher = prefetcher
        self.restore_outputs = restore_outputs
        self._local = threading.local()

    def _devices(self) -> list:
        devices = getattr(self._local, "devices", None)
        if devices is None:
            devices = self._local.devices = []
        return devices

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.restore_outputs:  # first: `post` runs (and pops it) even when the check below raises
            self._devices().append(first_tensor_device((args, kwargs)))
        if torch.is_grad_enabled():
            trainable = [(name, p) for name, p in self.guarded.items() if p.requires_grad]
            if trainable:
                name, first = trainable[0]
                raise RuntimeError(
                    f"{len(trainable)} offloaded weight(s) require grad (e.g. {name!r}, shape {tuple(first.shape)}), but "
                    "a dispatched model runs inference only: offloaded weights are read-only host copies. Call "
                    "`requires_grad_(False)` and run under `torch.inference_mode()`, or `remove_dispatch(model)` and "
                    "train a model that fits in memory."
                )
        return None

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if self.prefetcher is not None:
            self.prefetcher.end_forward()
        devices = self._devices() if self.restore_outputs else None
        device = devices.pop() if devices else None
        if device is not None:
            return move_to(output, device)
        return None
