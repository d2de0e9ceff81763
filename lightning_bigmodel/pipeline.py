"""Micro-batch pipelining: keep every device of a dispatched model busy.

A model dispatched over several GPUs runs them one after the other: while GPU 1 computes, GPU 0
waits. :class:`MicroBatchPipeline` splits each batch into micro-batches and runs each one's forward
in its own worker thread. Forward pre-hooks on the device-map modules make a worker hold the lock
of a module's execution device while it runs there, so each device serves one micro-batch at a
time while different devices serve different ones: GPU ``k`` works on micro-batch ``i`` while
GPU ``k + 1`` works on micro-batch ``i - 1``. CUDA kernel launches are asynchronous and waits
release the GIL, so the devices overlap. Outputs are concatenated back and equal the unsplit
batch's.

Scheduling rules (what makes it safe for any forward, not only a chain of stages):

- ``"cpu"`` and ``"disk"`` entries execute on the main device (the lowest GPU of the map, else the
  CPU) and share its lock, so the offload hooks that swap weights in and out are never raced.
- A worker never holds two locks and never waits while holding one: it takes a ticket for the
  next device, releases the current one, then waits for its turn. Locks are served first come,
  first served and micro-batches enter their first device in order, so they keep their order on
  every device and no cycle can form.
- Devices are the device map's identities, not the tensors' devices: a map may name devices that
  are all the CPU (how the tests simulate several GPUs).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch import nn

from lightning_bigmodel.device_map import normalize_device

__all__ = ["MicroBatchPipeline", "pipelined_forward"]


class _Cancelled(Exception):
    """Raised in a worker when another micro-batch failed, so the run stops early."""


class _TicketLock:
    """A first-come, first-served lock whose place in the queue is taken before waiting."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def ticket(self) -> int:
        with self._cond:
            self._next += 1
            return self._next - 1

    def wait(self, ticket: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class _Run:
    """State shared by the workers of one pipelined call."""

    def __init__(self, domains: set, n: int) -> None:
        self.locks = {domain: _TicketLock() for domain in domains}
        self.gates = [threading.Event() for _ in range(n)]
        self.failed = threading.Event()
        self.results: list = [None] * n
        self.errors: list = [None] * n
        self.modes = _capture_modes()
        self.cuda = _cuda_devices(domains)
        self.caller_device = torch.cuda.current_device() if self.cuda else None
        self.caller_streams = {d: torch.cuda.current_stream(d) for d in self.cuda}
        self.streams = [{d: torch.cuda.Stream(device=d) for d in self.cuda} for _ in range(n)]
        for streams in self.streams:
            for d, stream in streams.items():
                stream.wait_stream(self.caller_streams[d])


def _capture_modes() -> Callable[[ExitStack], None]:
    """Capture the caller's thread-local grad, inference and autocast modes to re-enter in a worker."""
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    cache = torch.is_autocast_cache_enabled()
    autocasts = [(t, torch.get_autocast_dtype(t)) for t in ("cpu", "cuda") if torch.is_autocast_enabled(t)]

    def enter(stack: ExitStack) -> None:
        stack.enter_context(torch.inference_mode() if inference else torch.set_grad_enabled(grad))
        for device_type, dtype in autocasts:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))

    return enter


def _cuda_devices(domains: set) -> list[int]:
    """The domains that are real, already initialised CUDA devices (never initialises CUDA)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return []
    count = torch.cuda.device_count()
    return sorted(d for d in domains if isinstance(d, int) and 0 <= d < count)


def _domain(device: Union[int, str, torch.device], main: Hashable) -> Hashable:
    """The lock domain (execution device) of a device-map value: its GPU index, or ``main`` for cpu/disk."""
    device = normalize_device(device)
    return device if isinstance(device, int) else main


def _find_device_map(model: nn.Module) -> tuple[str, Optional[Mapping]]:
    """The device map of ``model`` or of its first dispatched submodule, with that submodule's prefix."""
    for name, module in model.named_modules():
        device_map = getattr(module, "hf_device_map", None)
        if device_map:
            return (f"{name}." if name else ""), device_map
    return "", None


def _key_module(modules: dict[str, nn.Module], path: str, key: str) -> nn.Module:
    """The module a map key names; for a key naming a tensor, the module holding it."""
    parent, _, attr = path.rpartition(".")
    for name in (path, parent):
        module = modules.get(name)
        if module is not None and (name == path or attr in module._parameters or attr in module._buffers):
            return module
    raise ValueError(f"`hf_device_map` key {key!r} names no module of the model. Fix the map, or re-dispatch.")


class MicroBatchPipeline:
    """Run a (dispatched) model on micro-batches that flow through its devices as a pipeline.

    Hooks are attached on construction and stay until :meth:`remove` (or the end of a ``with``
    block); outside a pipelined call they do nothing, so the model can still be called directly.
    Create the pipeline after dispatching the model. A model without ``hf_device_map``, or whose
    map names one execution device only, is simply run micro-batch after micro-batch.

    Tensors (also inside tuples, lists, dicts and dataclasses) whose size along ``dim`` equals the
    batch size are split; other values are passed whole to every micro-batch. Outputs are
    concatenated along ``dim``; non-tensor outputs must be equal across micro-batches (a KV cache
    is not: pass ``use_cache=False``).

    Args:
        model: the model, usually dispatched with :func:`lightning_bigmodel.dispatch_model`.
        micro_batches: how many micro-batches to split each batch into (fewer when the batch is smaller).
        dim: the batch dimension of inputs and outputs.
        main_device: where ``"cpu"`` and ``"disk"`` entries execute; defaults to the lowest GPU of
            the map, else the CPU.

    Example::

        with MicroBatchPipeline(model, micro_batches=4) as pipe:
            logits = pipe(input_ids)
            tokens = pipe.generate(input_ids, max_new_tokens=20)
    """

    def __init__(
        self,
        model: nn.Module,
        micro_batches: int = 4,
        dim: int = 0,
        main_device: Optional[Union[int, str, torch.device]] = None,
    ) -> None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"`micro_batches` must be a positive integer, got {micro_batches!r}.")
        self.model = model
        self.micro_batches = micro_batches
        self.dim = dim
        self._local = threading.local()
        self._handles: list = []
        prefix, device_map = _find_device_map(model)
        device_map = dict(device_map or {})
        if main_device is None:
            gpus = [_domain(d, "cpu") for d in device_map.values()]
            main = min((g for g in gpus if isinstance(g, int)), default="cpu")
        else:
            main = _domain(main_device, "cpu")
        self.domains = {name: _domain(device, main) for name, device in device_map.items()}
        if len(set(self.domains.values())) > 1:
            self._attach(prefix)

    def _attach(self, prefix: str) -> None:
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for name, domain in self.domains.items():
            module = _key_module(modules, (prefix + name).rstrip("."), name)
            # Prepended so the device lock is held before the dispatch hooks load offloaded weights;
            # the post-hook is appended so it runs after they put them back.
            self._handles.append(module.register_forward_pre_hook(partial(self._enter, domain), prepend=True))
            self._handles.append(module.register_forward_hook(partial(self._exit, domain)))

    @property
    def pipelined(self) -> bool:
        """Whether calls overlap devices (the model's map names two or more execution devices)."""
        return bool(self._handles)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Pipelined ``model(*args, **kwargs)``."""
        return self.run(self.model, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Pipelined ``model.generate(*args, **kwargs)``: each micro-batch runs its own decoding loop."""
        return self.run(self.model.generate, *args, **kwargs)

    def run(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Split the inputs, call ``fn`` on each micro-batch (pipelined when possible), merge the outputs."""
        chunks = _split_inputs(args, kwargs, self.micro_batches, self.dim)
        if len(chunks) == 1:
            return fn(*args, **kwargs)
        if self.pipelined:
            results = self._run_pipelined(fn, chunks)
        else:
            results = [fn(*a, **k) for a, k in chunks]
        return _gather(results, self.dim, "output")

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MicroBatchPipeline":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def _run_pipelined(self, fn: Callable, chunks: list) -> list:
        run = _Run(set(self.domains.values()), len(chunks))
        threads = [
            threading.Thread(target=self._work, args=(run, i, fn, a, k), name=f"micro-batch-{i}", daemon=True)
            for i, (a, k) in enumerate(chunks)
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:
            run.failed.set()  # e.g. KeyboardInterrupt: the workers stop at their next module
            raise
        for d, caller in run.caller_streams.items():
            for streams in run.streams:
                caller.wait_stream(streams[d])
        errors = [e for e in run.errors if e is not None and not isinstance(e, _Cancelled)]
        if errors:
            raise errors[0]
        if run.cuda:
            _record_streams(run.results, run.caller_streams)
        return run.results

    def _work(self, run: _Run, index: int, fn: Callable, args: tuple, kwargs: dict) -> None:
        state = self._local
        state.run, state.index, state.held, state.stack, state.entered = run, index, None, [], False
        try:
            with ExitStack() as stack:
                run.modes(stack)
                for stream in run.streams[index].values():
                    torch.cuda.set_stream(stream)
                if run.cuda:
                    torch.cuda.set_device(run.caller_device)
                run.results[index] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread
            run.errors[index] = exc
            run.failed.set()
        finally:
            if state.held is not None:
                run.locks[state.held].release()
            run.gates[index].set()
            state.run = None

    def _enter(self, domain: Hashable, module: nn.Module, args: tuple) -> None:
        state = self._local
        if getattr(state, "run", None) is None:
            return
        state.stack.append(domain)
        if domain != state.held:
            self._switch(state, domain)

    def _exit(self, domain: Hashable, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._local
        if getattr(state, "run", None) is None:
            return
        if state.stack:
            state.stack.pop()
        # Back in a parent module mapped to another device (nested map keys): return to it.
        if state.stack and state.stack[-1] != state.held:
            self._switch(state, state.stack[-1])

    @staticmethod
    def _switch(state: threading.local, domain: Hashable) -> None:
        run = state.run
        if run.failed.is_set():
            raise _Cancelled("another micro-batch failed")
        lock = run.locks[domain]
        if not state.entered:
            if state.index:
                run.gates[state.index - 1].wait()  # enter the pipeline in micro-batch order
            ticket = lock.ticket()
            state.entered = True
            run.gates[state.index].set()
        else:
            ticket = lock.ticket()  # queue up first, so no later micro-batch overtakes this one
            run.locks[state.held].release()
            state.held = None
        lock.wait(ticket)
        state.held = domain


def pipelined_forward(model: nn.Module, *args: Any, micro_batches: int = 4, dim: int = 0, **kwargs: Any) -> Any:
    """Run ``model(*args, **kwargs)`` as ``micro_batches`` pipelined micro-batches; see :class:`MicroBatchPipeline`.

    The hooks are attached for this call only. To call repeatedly, keep a :class:`MicroBatchPipeline`.
    """
    with MicroBatchPipeline(model, micro_batches=micro_batches, dim=dim) as pipe:
        return pipe(*args, **kwargs)


def _record_streams(obj: Any, streams: dict) -> None:
    """Mark CUDA outputs made on worker streams as used by the caller's streams (allocator safety)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda and obj.device.index in streams:
            obj.record_stream(streams[obj.device.index])
        return
    items = _items(obj)
    for item in items[1] if items else ():
        _record_streams(item, streams)


def _items(obj: Any) -> Optional[tuple[list, list]]:
    """``(keys, values)`` of a container to split or merge, or None for a leaf."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        keys = [f.name for f in dataclasses.fields(obj) if f.init]
        return keys, [getattr(obj, k) for k in keys]
    if isinstance(obj, Mapping):
        return list(obj.keys()), list(obj.values())
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return list(range(len(obj))), list(obj)
    return None


def _rebuild(template: Any, keys: list, values: list) -> Any:
    """A container like ``template`` holding ``values``."""
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **dict(zip(keys, values)))
    if isinstance(template, Mapping):
        if type(template) is dict:
            return dict(zip(keys, values))
        new = copy.copy(template)
        for key, value in zip(keys, values):
            new[key] = value
        return new
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*values)
    return type(template)(values) if isinstance(template, (list, tuple)) else values


def _batch_size(obj: Any, dim: int) -> Optional[int]:
    if isinstance(obj, torch.Tensor):
        return obj.shape[dim] if obj.ndim > dim else None
    items = _items(obj)
    for value in items[1] if items else ():
        size = _batch_size(value, dim)
        if size is not None:
            return size
    return None


def _split(obj: Any, sizes: list[int], batch: int, dim: int) -> list:
    if isinstance(obj, torch.Tensor):
        if obj.ndim > dim and obj.shape[dim] == batch:
            return list(obj.split(sizes, dim))
        return [obj] * len(sizes)
    items = _items(obj)
    if items is None:
        return [obj] * len(sizes)
    keys, values = items
    columns = [_split(value, sizes, batch, dim) for value in values]
    return [_rebuild(obj, keys, [column[i] for column in columns]) for i in range(len(sizes))]


def _split_inputs(args: tuple, kwargs: dict, micro_batches: int, dim: int) -> list[tuple[tuple, dict]]:
    """``[(args, kwargs), ...]``, one per micro-batch, as even as possible and never empty."""
    batch = _batch_size((args, kwargs), dim)
    if batch is None:
        raise ValueError(
            f"No input tensor has a batch dimension `dim={dim}` to split into micro-batches. "
            "Pass the batch as a tensor, or set `dim`."
        )
    n = max(1, min(micro_batches, batch))
    base, extra = divmod(batch, n)
    sizes = [base + 1] * extra + [base] * (n - extra)
    return [(tuple(a), k) for a, k in _split((list(args), kwargs), sizes, batch, dim)]


def _gather(values: list, dim: int, path: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim <= dim:
            raise ValueError(
                f"Cannot concatenate the micro-batches' {path}: a {first.ndim}-d tensor has no batch "
                f"dimension `dim={dim}`. Return per-sample values, or call without micro-batches."
            )
        return torch.cat(values, dim)
    items = _items(first)
    if items is not None:
        keys = items[0]
        columns = [_items(v)[1] for v in values]
        merged = [_gather([c[j] for c in columns], dim, f"{path}[{key!r}]") for j, key in enumerate(keys)]
        return _rebuild(first, keys, merged)
    for value in values[1:]:
        if value is not first and not _equal(value, first):
            raise TypeError(
                f"Cannot merge the micro-batches' {path}: {type(first).__name__} values differ ({first!r:.80} "
                f"vs {value!r:.80}). Only tensors are concatenated; turn this output off (e.g. `use_cache=False`)."
            )
    return first


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False
