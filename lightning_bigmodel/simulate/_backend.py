"""The ``simgpu`` device: a PrivateUse1 backend registered from Python whose tensors compute on the CPU.

What it stands in for: the kernels, the memory and the device checks of ``count`` GPUs. A tensor on ``simgpu:k`` is a
:class:`SimTensor`, a wrapper (``torch.Tensor._make_wrapper_subclass``) that reports the device ``simgpu:k`` and holds
a plain CPU tensor with the real values. Every ATen op reaching it is run on the CPU tensors and the result wrapped
again on the same simulated device, after the check CUDA makes: an op mixing two devices (or a GPU and a CPU tensor of
one or more dimensions) raises "Expected all tensors to be on the same device". Factory ops naming ``simgpu:k`` reach
the PrivateUse1 dispatch key, where a Python fallback builds them on the CPU.

Why PrivateUse1 and not a subclass reporting ``cuda:k``: on a CPU build the Python bindings take a CUDA device guard
before any dispatch (indexing such a tensor fails with "not linked with support for cuda devices"); a registered
backend brings its own (no-op) device guard, so indexing, ``nn.Module.to`` and the like work.

CUDA-only kernels the CPU lacks are stood in for where model code reaches them: the fused attention kernels (the
backend reports the math kernel as its choice) and ``histc`` of integers (MoE routers count tokens per expert so).

Memory: each simulated GPU counts the bytes of the CPU storages it holds (released when the storage dies) and raises
``torch.OutOfMemoryError`` past its capacity, as the CUDA caching allocator would.

The backend is registered once per process (PyTorch allows one PrivateUse1 name per process); it reports itself
available, with ``count`` devices, only while :func:`~lightning_bigmodel.simulate.simulated_gpus` is active.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch

BACKEND = "simgpu"

# Ops that may mix devices on CUDA too: copies between devices, and indexing with CPU index tensors.
_CROSS_DEVICE = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from", "aten::index", "aten::index_put_",
                 "aten::index_put", "aten::_index_put_impl_", "aten::record_stream"}  # fmt: skip


class _State:
    """Process-wide state of the simulated GPUs (one harness at a time)."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        self.capacity = 0
        self.allocated: list[int] = []
        self.peak: list[int] = []
        self.log: list = []  # records of copies, streams and events; see `_runtime.Record`
        self.lock = threading.RLock()  # re-entrant: a garbage collection inside may run `_release` in this thread
        self.tracked: set[int] = set()  # id() of the CPU storages charged to a simulated GPU
        self.local = threading.local()  # per thread: current device index, current streams
        self.default_streams: dict = {}

    def reset(self, count: int, capacity: int) -> None:
        with self.lock:
            self.count, self.capacity = count, capacity
            self.allocated, self.peak = [0] * count, [0] * count
            self.log = []
            self.local = threading.local()
            self.default_streams = {}

    def charge(self, index: int, storage: torch.UntypedStorage) -> None:
        """Count ``storage`` against GPU ``index`` until it dies; ``torch.OutOfMemoryError`` past the capacity."""
        key, nbytes = id(storage), storage.nbytes()
        with self.lock:
            if key in self.tracked or index >= len(self.allocated):
                return
            if self.allocated[index] + nbytes > self.capacity:
                raise torch.OutOfMemoryError(
                    f"Simulated GPU {BACKEND}:{index} out of memory: tried to allocate {nbytes} bytes with "
                    f"{self.allocated[index]} of {self.capacity} bytes (`memory_per_gpu`) in use."
                )
            self.tracked.add(key)
            self.allocated[index] += nbytes
            self.peak[index] = max(self.peak[index], self.allocated[index])
            allocated = self.allocated
        weakref.finalize(storage, self._release, index, key, nbytes, allocated)

    def _release(self, index: int, key: int, nbytes: int, allocated: list[int]) -> None:
        with self.lock:
            self.tracked.discard(key)
            if allocated is self.allocated:  # not from an earlier harness
                allocated[index] -= nbytes


STATE = _State()


def _check_index(device: torch.device) -> int:
    index = 0 if device.index is None else device.index
    if not STATE.active:
        raise RuntimeError(
            f"Device {device} exists only inside `lightning_bigmodel.simulate.simulated_gpus(...)`; enter it first."
        )
    if index >= STATE.count:
        raise RuntimeError(
            f"Device {BACKEND}:{index} does not exist: `simulated_gpus` simulates {STATE.count} GPU(s) "
            f"({BACKEND}:0 to {BACKEND}:{STATE.count - 1})."
        )
    return index


class SimTensor(torch.Tensor):
    """A tensor on a simulated GPU: reports ``simgpu:k``, holds its real values in the CPU tensor ``raw``."""

    raw: torch.Tensor

    @staticmethod
    def __new__(cls, raw: torch.Tensor, device: torch.device) -> "SimTensor":
        out = torch.Tensor._make_wrapper_subclass(
            cls, raw.shape, strides=raw.stride(), storage_offset=raw.storage_offset(), dtype=raw.dtype,
            layout=raw.layout, device=device, requires_grad=raw.requires_grad,
        )  # fmt: skip
        out.raw = raw
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"SimTensor({self.raw!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


def wrap(raw: torch.Tensor, device: torch.device) -> SimTensor:
    """``raw`` (a CPU tensor) as a tensor on the simulated ``device``, its storage charged to that GPU."""
    STATE.charge(device.index or 0, raw.untyped_storage())
    return SimTensor(raw, device)


def _same_device_check(func, flat: list) -> Optional[torch.device]:
    """The simulated device of the op's tensors; raise like CUDA when they mix devices."""
    devices = {x.device for x in flat if type(x) is SimTensor}
    if func._schema.name in _CROSS_DEVICE:
        return next(iter(devices), None)
    others = {x.device for x in flat if type(x) is not SimTensor and x.dim() > 0}
    mixed = sorted(map(str, devices | (others if devices else set())))
    if len(mixed) > 1:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {mixed[0]} and "
            f"{mixed[1]}! (simulated GPUs, op {func._schema.name})"
        )
    return next(iter(devices), None)


def _target_device(args: tuple, kwargs: dict) -> tuple[tuple, Optional[torch.device], Optional[torch.device]]:
    """The op's device argument (``device=``, or positional as in ``aten::to.device``): ``(args, device or None,
    simulated target or None)``, with a simulated target rewritten to the CPU in ``args``/``kwargs``."""
    position = next((i for i, arg in enumerate(args) if isinstance(arg, torch.device)), None)
    device = kwargs.get("device") if position is None else args[position]
    if device is None:
        return args, None, None
    device = torch.device(device)
    if device.type != BACKEND:
        return args, device, None
    _check_index(device)
    if position is None:
        kwargs["device"] = torch.device("cpu")
    else:
        args = (*args[:position], torch.device("cpu"), *args[position + 1 :])
    kwargs.pop("pin_memory", None)
    index = getattr(STATE.local, "device", 0) if device.index is None else device.index  # no index: the current GPU
    return args, device, torch.device(BACKEND, index)


def _map(fn, obj):
    """``obj`` with ``fn`` applied to every leaf of its (nested) lists, tuples and dicts: the shapes an ATen op's
    arguments and results take (``torch.utils._pytree`` does the same, several times slower per op)."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {key: _map(fn, value) for key, value in obj.items()}
    return fn(obj)


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _no_op_log(*args, **kwargs) -> None:
    raise RuntimeError("Simulated GPUs compute only inside `lightning_bigmodel.simulate.simulated_gpus(...)`.")


# Where `run_op` records copies and `record_stream` calls: `_runtime.log_copy` and `_runtime.log_record_stream`, passed
# in by `simulated_gpus` (see `set_op_log`) because `_runtime` imports this module.
_OP_LOG = {"copy": _no_op_log, "record_stream": _no_op_log}


def set_op_log(copy: Callable[..., None], record_stream: Callable[..., Any]) -> None:
    """Have :func:`run_op` record an op's copies with ``copy(func, args, kwargs, source, destination)`` and answer
    ``tensor.record_stream(stream)`` with ``record_stream(tensor, stream)``."""
    _OP_LOG["copy"], _OP_LOG["record_stream"] = copy, record_stream


def run_op(func, args: tuple, kwargs: dict):
    """Run ``func`` on the CPU tensors behind ``args``; wrap new tensors on the simulated device they belong to."""
    flat = _tensors(kwargs, _tensors(args, []))
    source = _same_device_check(func, flat)
    wrappers = {id(x.raw): x for x in flat if type(x) is SimTensor}
    kwargs = dict(kwargs)
    args, destination, target = _target_device(args, kwargs)
    has_target = destination is not None
    out_device = target if has_target else source
    if func._schema.name == "aten::_fused_sdp_choice":
        return 0  # the math kernel: fused attention kernels are CUDA-only ops without a CPU kernel
    if func._schema.name == "aten::histc" and not args[0].is_floating_point():
        # CUDA counts integer inputs, the CPU kernel floats only (MoE routers count tokens per expert this way)
        counts = func(args[0].raw.double(), *args[1:], **kwargs).to(args[0].dtype)
        return wrap(counts, out_device)
    if func._schema.name == "aten::record_stream":
        return _OP_LOG["record_stream"](args[0], args[1])
    _OP_LOG["copy"](func, args, kwargs, source, target or destination)
    out = func(*_map(_unwrap, args), **_map(_unwrap, kwargs))

    def rewrap(value):
        if not isinstance(value, torch.Tensor) or type(value) is SimTensor:
            return value
        wrapper = wrappers.get(id(value))
        if wrapper is not None:
            if not has_target or wrapper.device == target:  # in-place and out= ops, a `to` that changes nothing
                return wrapper
            value = value.clone()  # a `to` to another device, which the CPU op answered with its input
        return wrap(value, out_device) if out_device is not None and value.device.type == "cpu" else value

    # A view of a normal tensor must be a normal tensor also under inference mode (autograd shares its version
    # counter with the base's afterwards): create the wrapper with inference mode off, as a C++ kernel's view would be.
    normal_base = func.is_view and any(not x.is_inference() for x in wrappers.values())
    with torch.inference_mode(False) if normal_base else nullcontext():
        return _map(rewrap, out)


def _unwrap(value):
    return value.raw if isinstance(value, SimTensor) else value


def _factory_fallback(op, *args, **kwargs):
    """PrivateUse1 fallback: ops reaching the ``simgpu`` key with no simulated tensor argument (factories)."""
    return run_op(op, args, kwargs)


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    """What the C++ side asks of a PrivateUse1 backend: available (only while simulating) and built."""

    def is_available(self) -> bool:
        return STATE.active

    def has_primary_context(self, dev_id) -> bool:
        return STATE.active

    def is_built(self) -> bool:
        return True


class _Guard(torch._C._acc.DeviceGuard):
    """The C++ device guard of the backend (device switching is simulated in Python, see ``_runtime``)."""

    def type_(self):
        return torch._C._autograd.DeviceType.PrivateUse1


_LIBRARY: list = []  # keeps the fallback registration alive


def ensure_registered(module: object) -> None:
    """Register the ``simgpu`` backend once per process with ``module`` as ``torch.simgpu``."""
    name = torch._C._get_privateuse1_backend_name()
    if name == BACKEND:
        return
    if name != "privateuseone":
        raise RuntimeError(
            f"Simulated GPUs need PyTorch's PrivateUse1 backend, but this process registered it as {name!r}. "
            "Run the simulation in a process without that backend."
        )
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend  # noqa: PLC0415

    # Experimental PyTorch API (torch 2.13): a backend whose kernels are Python.
    _setup_privateuseone_for_python_backend(BACKEND, backend_module=module, hook=_Hooks(), device_guard=_Guard())
    library = torch.library.Library("_", "IMPL")  # noqa: TOR901 (a fallback needs the global namespace)
    library.fallback(_factory_fallback, "PrivateUse1")
    _LIBRARY.append(library)
