"""The accelerator that the integer GPU indices of a device map refer to, and the runtime calls made on it.

No GPU vendor is named in the library: GPU ``k`` of a device map is ``torch.device(accelerator_type(), k)`` (``cuda``
on NVIDIA and AMD GPUs, ``xpu`` on Intel GPUs, ``simgpu`` inside ``lightning_bigmodel.simulate.simulated_gpus``), and
streams, events, the current device and memory queries go through that device type's module
(``torch.get_device_module``: ``torch.cuda``, ``torch.xpu``, ...), which offer the same names. On CUDA these are
exactly the ``torch.cuda`` calls the library made before.

Why the device module and not ``torch.accelerator``'s "current" functions: those follow the accelerator registered
first in the process, and a PrivateUse1 backend (such as the simulated GPUs), once registered, takes precedence over
CUDA there for the rest of the process, even while it reports itself unavailable. Asking the module of the tensor's own
device type is right in every case. Never touches CUDA at import.
"""

from __future__ import annotations

from typing import Any

import torch

_HOST_TYPES = ("cpu", "meta")


def accelerator_type() -> str:
    """The device type of GPU indices: the available accelerator's (``"cuda"``, ``"xpu"``, ``"simgpu"``...), or
    ``"cuda"`` when there is none (so messages and checks still speak of ``cuda:k``)."""
    current = torch.accelerator.current_accelerator(check_available=True)
    return current.type if current is not None else "cuda"


def gpu(index: int) -> torch.device:
    """GPU ``index`` of a device map as a ``torch.device`` on the current accelerator."""
    return torch.device(accelerator_type(), index)


def is_gpu(device: torch.device) -> bool:
    """Whether ``device`` is an accelerator device (not the host, not meta)."""
    return device.type not in _HOST_TYPES


def device_module(device: torch.device) -> Any:
    """``torch.cuda`` for a CUDA device, ``torch.xpu`` for an XPU, the simulated module for ``simgpu``..."""
    return torch.get_device_module(device.type)


def gpu_count() -> int:
    """How many GPUs of the accelerator this process sees (0 without one). Does not initialise CUDA."""
    current = torch.accelerator.current_accelerator(check_available=True)
    if current is not None:
        return torch.get_device_module(current.type).device_count()
    return torch.cuda.device_count()  # 0 without CUDA; also CUDA hidden behind an inactive PrivateUse1 backend


def memory_info(index: int) -> tuple[int, int]:
    """``(free, total)`` bytes of GPU ``index`` (creates the device's context on CUDA)."""
    module = device_module(gpu(index))
    if hasattr(module, "mem_get_info"):
        return module.mem_get_info(index)
    return torch.accelerator.get_memory_info(index)


def can_pin(device: torch.device) -> bool:
    """Whether host memory can be pinned (page-locked) to feed ``device``: only for an accelerator that supports it."""
    if not is_gpu(device):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    try:
        torch.empty(1, pin_memory=True)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def has_streams(device: torch.device) -> bool:
    """Whether ``device`` is a GPU whose module offers streams and events (CUDA, ROCm, XPU, simulated; not MPS)."""
    return is_gpu(device) and hasattr(device_module(device), "Stream")


def current_stream(device: torch.device) -> torch.Stream:
    return device_module(device).current_stream(device)


def new_stream(device: torch.device) -> torch.Stream:
    return device_module(device).Stream(device=device)


def new_event(device: torch.device) -> torch.Event:
    return device_module(device).Event()


def use_stream(stream: torch.Stream) -> Any:
    """Context manager making ``stream`` current on its device (``torch.cuda.stream(s)`` on CUDA)."""
    return device_module(stream.device).stream(stream)


def current_device(device_type: str) -> int:
    return device_module(torch.device(device_type)).current_device()


def set_device(device: torch.device) -> None:
    device_module(device).set_device(device)


def set_stream(stream: torch.Stream) -> None:
    device_module(stream.device).set_stream(stream)
