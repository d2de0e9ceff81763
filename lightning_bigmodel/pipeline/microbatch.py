"""Micro-batch pipelining: keep every device of a dispatched model busy.

A model dispatched over several GPUs runs them one after the other: while GPU 1 computes, GPU 0
waits. :class:`MicroBatchPipeline` splits each batch into micro-batches and runs each one's forward
in its own worker thread. Forward pre-hooks on the device-map modules make a worker hold the lock
of a module's execution device while it runs there, so each device serves one micro-batch at a
time while different devices serve different ones: GPU ``k`` works on micro-batch ``i`` while
GPU ``k + 1`` works on micro-batch ``i - 1``. CUDA kernel launches are asynchronous and waits
release the GIL, so the devices overlap. Outputs are concatenated back and equal the unsplit
batch's when the micro-batches of a forward are independent (no state carried from one sample to
another, e.g. no KV cache: pass ``use_cache=False``).

Scheduling rules (not only for a chain of stages):

- ``"cpu"`` and ``"disk"`` entries execute on the main device (the lowest GPU of the map, else the
  CPU) and share its lock, so the offload hooks that swap weights in and out are never raced.
- A worker never holds two locks and never waits while holding one: it takes a ticket for the
  next device, releases the current one, then waits for its turn. Locks are served first come,
  first served and micro-batches enter their first device in order, so they keep their order on
  every device and no cycle can form.
- The GPU side follows the same order: releasing a GPU records an event on the worker's stream
  there, and the next holder's stream waits for it (see ``_workers``). Every GPU thus runs its
  micro-batches one after the other, as the CPU hands them over, on streams kept across calls.
- Devices are the device map's identities, not the tensors' devices: a map may name devices that
  are all the CPU (how the tests simulate several GPUs).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from contextlib import ExitStack
from functools import partial
from typing import Any, Callable, Hashable, Optional, Union

import torch
from torch import nn

from lightning_bigmodel import _accelerator as accel
from lightning_bigmodel.pipeline._batching import _gather, _split_inputs
from lightning_bigmodel.pipeline._workers import _Cancelled, _Run, _record_streams
from lightning_bigmodel.offload.placement import main_device_of
from lightning_bigmodel.planning.device_map import normalize_device

__all__ = ["MicroBatchPipeline", "pipelined_forward"]


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
        main_device: where ``"cpu"`` and ``"disk"`` entries execute; defaults to the dispatched model's (the plan's
            execution device), else the lowest GPU of the map, else the CPU.

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
        self._streams: dict = {}  # (micro-batch index, GPU) -> the stream it runs on, reused by every call
        self._handles: list = []
        prefix, device_map = _find_device_map(model)
        device_map = dict(device_map or {})
        if main_device is None:  # where the dispatch computes "cpu"/"disk" entries (the CPU for a CPU-execution plan)
            main_device = main_device_of(model)
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
        run = _Run(set(self.domains.values()), len(chunks), self._streams)
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
        if run.gpus:
            _record_streams(run.results, run.caller_streams)
        return run.results

    def _work(self, run: _Run, index: int, fn: Callable, args: tuple, kwargs: dict) -> None:
        state = self._local
        state.run, state.index, state.held, state.stack, state.entered = run, index, None, [], False
        try:
            with ExitStack() as stack:
                run.modes(stack)
                for stream in run.streams[index].values():
                    accel.set_stream(stream)
                if run.gpus:
                    accel.set_device(accel.gpu(run.caller_device))
                run.results[index] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread
            run.errors[index] = exc
            run.failed.set()
        finally:
            if state.held is not None:
                run.hand_over(state.held, index)
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
            run.hand_over(state.held, state.index)
            run.locks[state.held].release()
            state.held = None
        lock.wait(ticket)
        run.take_over(domain, state.index)  # the GPU side, in the same order as the lock
        state.held = domain


def pipelined_forward(model: nn.Module, *args: Any, micro_batches: int = 4, dim: int = 0, **kwargs: Any) -> Any:
    """Run ``model(*args, **kwargs)`` as ``micro_batches`` pipelined micro-batches; see :class:`MicroBatchPipeline`.

    The hooks are attached for this call only. To call repeatedly, keep a :class:`MicroBatchPipeline`.
    """
    with MicroBatchPipeline(model, micro_batches=micro_batches, dim=dim) as pipe:
        return pipe(*args, **kwargs)
