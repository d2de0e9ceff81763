"""``simulated_gpus``: run multi-GPU code paths with real values on a CPU-only machine.

Inside ``with simulated_gpus(4):`` the process has four simulated GPUs, ``simgpu:0`` to ``simgpu:3``, registered as
a PyTorch accelerator (``torch.accelerator.current_accelerator(check_available=True)`` reports it, and the library
maps the integer GPU indices of a device map onto it). Their tensors compute on the CPU with real values and raise,
like CUDA, when an op mixes devices; ``torch.cuda`` queries, the literal ``"cuda"`` device, pinned memory, streams and
events are stood in for (see ``_standins`` and ``_runtime``). Outputs are therefore the plain model's, and the
device flow (where each tensor goes, which stream copies it) is the one a machine with four GPUs would run.

The backend stays registered for the rest of the process (PyTorch allows one PrivateUse1 backend per process and no
unregistering); outside the ``with`` block it reports itself unavailable, and the library then ignores it. PyTorch's
own accelerator choice (``torch.accelerator`` without ``check_available``, the pinned-memory allocator) may keep
preferring it over CUDA, so on a machine with CUDA run simulations in a process of their own.

What is not simulated: speed and asynchrony (every op is synchronous CPU work; streams and events are recorded, not
waited on), CUDA-only kernels (fused attention falls back to the math kernel), and the literal-``"cuda"`` stand-in
in threads the code under test starts itself (the library re-enters the caller's torch-function modes in its own
worker threads; other threads must use devices taken from tensors).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Union

import torch

from lightning_bigmodel.simulate import _backend, _runtime
from lightning_bigmodel.simulate._backend import BACKEND, STATE
from lightning_bigmodel.simulate._standins import STAND_INS, CudaLiteralMode, SimulatedDeviceModule

__all__ = ["SimulatedGPUs", "simulated_gpus"]

_MISSING = object()


class SimulatedGPUs:
    """What ``with simulated_gpus(...) as gpus`` gives: the devices, their memory counters and the runtime log."""

    def __init__(self, count: int, memory_per_gpu: int) -> None:
        self.count = count
        self.memory_per_gpu = memory_per_gpu
        self.devices = [torch.device(BACKEND, index) for index in range(count)]

    @property
    def log(self) -> list[_runtime.Record]:
        """Copies, stream and event calls so far, in order (see :class:`~lightning_bigmodel.simulate._runtime.Record`)."""
        return list(STATE.log)

    def clear_log(self) -> None:
        STATE.log.clear()

    @staticmethod
    def mark(label: str) -> None:
        """Append a ``Record("mark", -1, -1, <thread>, label)`` to the log: a test's own milestone among the records."""
        _runtime._log("mark", -1, -1, label)

    def memory_allocated(self, index: int) -> int:
        """Bytes the tensors on simulated GPU ``index`` hold now."""
        return SimulatedDeviceModule.memory_allocated(index)

    def max_memory_allocated(self, index: int) -> int:
        """The most bytes simulated GPU ``index`` held at once since entering (or the last reset)."""
        return SimulatedDeviceModule.max_memory_allocated(index)

    def reset_peak_memory_stats(self) -> None:
        for index in range(self.count):
            SimulatedDeviceModule.reset_peak_memory_stats(index)

    @staticmethod
    def pinned_bytes() -> int:
        """Bytes of pinned host memory alive (pinned through the stand-in)."""
        return _runtime.pinned_bytes()


def _check_arguments(count: object, memory_per_gpu: Union[int, str]) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(
            f"`count`={count!r} is not a number of GPUs to simulate; pass a positive int, e.g. `simulated_gpus(2)`."
        )
    from lightning_bigmodel.planning.sizes import parse_size  # noqa: PLC0415

    try:
        return parse_size(memory_per_gpu)
    except ValueError as err:
        raise ValueError(f"`memory_per_gpu`={memory_per_gpu!r}: {err}") from None


@contextmanager
def simulated_gpus(count: int, memory_per_gpu: Union[int, str] = "80GiB") -> Iterator[SimulatedGPUs]:
    """Simulate ``count`` GPUs with ``memory_per_gpu`` each (real values, computed on the CPU).

    Inside, ``infer_device_map``, ``load_checkpoint_and_dispatch``, ``dispatch_model`` and forward passes work with
    integer GPU devices as on a machine with ``count`` GPUs: tensors on GPU ``k`` report ``simgpu:k``. Allocations past
    ``memory_per_gpu`` on one simulated GPU raise ``torch.OutOfMemoryError``. Everything stood in for is put back on
    exit, also when the body raises. Not re-entrant: one simulation at a time per process.

    Args:
        count: how many GPUs (``>= 1``).
        memory_per_gpu: the memory of each, as ``parse_size`` reads it (``"80GiB"``, ``"24GB"``, bytes).

    Raises:
        ValueError: ``count`` is not a positive int, or ``memory_per_gpu`` does not parse.
        RuntimeError: already simulating, or PyTorch's PrivateUse1 backend is taken by another backend.
    """
    capacity = _check_arguments(count, memory_per_gpu)
    if STATE.active:
        raise RuntimeError("`simulated_gpus` is already active in this process; leave it before entering it again.")
    first = torch._C._get_privateuse1_backend_name() != BACKEND
    _backend.set_op_log(_runtime.log_copy, _runtime.log_record_stream)  # `_backend` does not import `_runtime`
    _backend.ensure_registered(SimulatedDeviceModule())
    if first and torch.cuda.is_available():
        warnings.warn(
            "`simulated_gpus` registered a PyTorch backend that may shadow CUDA in this process from now on (pinned "
            "memory, `torch.accelerator`). Run simulations in a process that does not use CUDA.",
            stacklevel=3,
        )
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in STAND_INS]
    STATE.reset(count, capacity)
    STATE.active = True
    mode = CudaLiteralMode()
    try:
        for owner, name, stand_in in STAND_INS:
            setattr(owner, name, stand_in)
        with mode:
            yield SimulatedGPUs(count, capacity)
    finally:
        for owner, name, original in saved:
            if original is not _MISSING:
                setattr(owner, name, original)
            elif name in owner.__dict__:
                delattr(owner, name)
        STATE.active = False
        _runtime.clear_pinned()
