"""Thread and CUDA-stream state of one pipelined call of :class:`~lightning_bigmodel.pipeline.MicroBatchPipeline`.

Each micro-batch runs in its own worker thread on its own CUDA streams (one per CUDA device of the map, ordered
after the caller's streams). Workers queue for an execution device with a first-come, first-served ticket lock;
the caller's grad, inference and autocast modes are re-entered in every worker.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any, Callable

import torch

from lightning_bigmodel.pipeline._batching import _items


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


def _record_streams(obj: Any, streams: dict) -> None:
    """Mark CUDA outputs made on worker streams as used by the caller's streams (allocator safety)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_cuda and obj.device.index in streams:
            obj.record_stream(streams[obj.device.index])
        return
    items = _items(obj)
    for item in items[1] if items else ():
        _record_streams(item, streams)
