"""What code written for CUDA meets inside ``simulated_gpus``: the ``torch.simgpu`` device module, the functions of
``torch.cuda`` and ``torch.accelerator`` that query or switch devices, streams and events, and a torch-function mode
that maps a literal ``"cuda"`` device and ``pin_memory`` onto the simulation.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode

from lightning_bigmodel.simulate import _runtime
from lightning_bigmodel.simulate._backend import BACKEND, STATE, SimTensor, _check_index


def _index(device: _runtime.DeviceLike) -> int:
    return _runtime._index(device)


class SimulatedDeviceModule:
    """``torch.simgpu`` (what ``torch.get_device_module("simgpu")`` returns): stands in for ``torch.cuda``'s device
    count, current device, memory queries, streams and events on the simulated GPUs."""

    Stream = _runtime.SimStream
    Event = _runtime.SimEvent

    @staticmethod
    def is_available() -> bool:
        return STATE.active

    @staticmethod
    def is_initialized() -> bool:
        return STATE.active

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def _lazy_init() -> None:
        pass

    @staticmethod
    def device_count() -> int:
        return STATE.count if STATE.active else 0

    current_device = staticmethod(_runtime.current_device_index)
    set_device = staticmethod(_runtime.set_device_index)
    current_stream = staticmethod(_runtime.current_stream)
    default_stream = staticmethod(_runtime.default_stream)
    set_stream = staticmethod(_runtime.set_stream)
    synchronize = staticmethod(_runtime.synchronize)
    device = _runtime.device_index

    stream = _runtime.StreamContext

    @staticmethod
    def mem_get_info(device: _runtime.DeviceLike = None) -> tuple[int, int]:
        """``(free, total)`` bytes of a simulated GPU: ``memory_per_gpu`` less what its tensors hold."""
        index = _check_index(torch.device(BACKEND, _index(device)))
        return STATE.capacity - STATE.allocated[index], STATE.capacity

    @staticmethod
    def memory_allocated(device: _runtime.DeviceLike = None) -> int:
        return STATE.allocated[_check_index(torch.device(BACKEND, _index(device)))]

    @staticmethod
    def max_memory_allocated(device: _runtime.DeviceLike = None) -> int:
        return STATE.peak[_check_index(torch.device(BACKEND, _index(device)))]

    @staticmethod
    def reset_peak_memory_stats(device: _runtime.DeviceLike = None) -> None:
        index = _check_index(torch.device(BACKEND, _index(device)))
        STATE.peak[index] = STATE.allocated[index]

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def get_device_name(device: _runtime.DeviceLike = None) -> str:
        return f"Simulated GPU {_index(device)}"

    @staticmethod
    def get_device_capability(device: _runtime.DeviceLike = None) -> tuple[int, int]:
        return (8, 0)  # what an A100 reports: bf16 and TF32 capable

    @staticmethod
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @staticmethod
    def manual_seed(seed: int) -> None:
        pass

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass


_M = SimulatedDeviceModule

# (object, attribute, stand-in): the functions replaced while simulating, put back on exit.
STAND_INS: list[tuple[Any, str, Any]] = [
    # The generic accelerator API, which the library itself uses.
    (torch, "Stream", _runtime.SimStream),
    (torch, "Event", _runtime.SimEvent),
    *[(torch.accelerator, name, getattr(_M, attr)) for name, attr in [
        ("current_device_index", "current_device"), ("current_device_idx", "current_device"),
        ("set_device_index", "set_device"), ("set_device_idx", "set_device"), ("device_index", "device"),
        ("current_stream", "current_stream"), ("set_stream", "set_stream"), ("synchronize", "synchronize"),
        ("memory_allocated", "memory_allocated"), ("max_memory_allocated", "max_memory_allocated"),
        ("reset_peak_memory_stats", "reset_peak_memory_stats"), ("empty_cache", "empty_cache"),
    ]],  # fmt: skip
    (torch.accelerator, "get_memory_info", _M.mem_get_info),
    # What model code and Lightning's CUDA accelerator call on `torch.cuda`.
    *[(torch.cuda, name, getattr(_M, name)) for name in [
        "is_available", "is_initialized", "_lazy_init", "device_count", "current_device", "set_device",
        "current_stream", "default_stream", "set_stream", "synchronize", "stream", "device", "mem_get_info",
        "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "empty_cache", "get_device_name",
        "get_device_capability", "is_bf16_supported", "manual_seed", "manual_seed_all", "Stream", "Event",
    ]],  # fmt: skip
]

_DEVICE_ARG = {torch.Tensor.to, torch.Tensor.cuda}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


def to_simulated(device: Any) -> Any:
    """``"cuda"``, ``"cuda:k"``, ``torch.device("cuda", k)`` and a bare GPU index -> ``simgpu:k``; else unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device(BACKEND, device)
    if isinstance(device, (str, torch.device)):
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            return device
        if parsed.type == "cuda":
            index = _runtime.current_device_index() if parsed.index is None else parsed.index
            return torch.device(BACKEND, index)
    return device


class CudaLiteralMode(TorchFunctionMode):
    """Stands in for CUDA where code names it literally, in the threads this mode is active in.

    ``device="cuda:k"`` in factory calls (masks, position ids and caches built inside model code), ``.to("cuda")``,
    ``.to(k)`` and ``.cuda()`` go to ``simgpu:k``. ``pin_memory=True``, ``Tensor.pin_memory()`` and
    ``Tensor.is_pinned()`` use the pinned-memory stand-in (a CPU build has no pinned allocator for the backend).
    ``torch.tensor(data, device="simgpu:k")`` is built on the CPU and then moved (its direct path has no kernel).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.tolist and type(args[0]) is SimTensor:
            return args[0].raw.tolist()  # torch refuses `tolist` on tensor subclasses; CUDA tensors allow it
        if func is torch.Tensor.is_pinned:
            return _runtime.is_pinned(args[0])
        if func is torch.Tensor.pin_memory:
            return args[0] if _runtime.is_pinned(args[0]) else _runtime.pin(args[0].clone())
        if func is torch.Tensor.cuda:
            device = to_simulated(args[1] if len(args) > 1 else kwargs.pop("device", "cuda"))
            return args[0].to(device, non_blocking=kwargs.get("non_blocking", False))
        pinned = kwargs.pop("pin_memory", False) is True
        if "device" in kwargs:
            kwargs["device"] = to_simulated(kwargs["device"])
        if func in _DEVICE_ARG and len(args) > 1:
            args = (args[0], to_simulated(args[1]), *args[2:])
        if func in _FROM_DATA and _is_simulated(kwargs.get("device")):
            device = kwargs.pop("device")
            return func(*args, **kwargs).to(device)
        out = func(*args, **kwargs)
        return _runtime.pin(out) if pinned else out


def _is_simulated(device: Any) -> bool:
    return device is not None and torch.device(device).type == BACKEND
