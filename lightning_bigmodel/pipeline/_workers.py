"""Thread and GPU-stream state of one pipelined call of :class:`~lightning_bigmodel.pipeline.MicroBatchPipeline`.

Each micro-batch runs in its own worker thread on its own streams (one per GPU of the map, ordered after the
caller's streams; kept by the pipeline and reused by every call, so no call adds streams, nor the cuBLAS workspace
each stream gets). Workers queue for an execution device with a first-come, first-served ticket lock; the caller's
grad, inference and autocast modes and torch-function modes are re-entered in every worker.

The lock orders the CPU side only. The GPU side is ordered the same way by an event: a worker releasing a GPU records
one on its stream there (:meth:`_Run.hand_over`), and the next holder's stream waits for it before anything of its own
runs there (:meth:`_Run.take_over`). All work on one GPU thus runs in lock order, whichever stream it was queued on:
in-place buffer updates and caches built lazily by one micro-batch are complete before the next reads them, and
memory one micro-batch's stream freed is reused only by work ordered after it.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from lightning_bigmodel import _accelerator as accel
from lightning_bigmodel._modes import capture_modes
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

    def __init__(self, domains: set, n: int, pool: Optional[dict] = None) -> None:
        self.locks = {domain: _TicketLock() for domain in domains}
        self.gates = [threading.Event() for _ in range(n)]
        self.failed = threading.Event()
        self.results: list = [None] * n
        self.errors: list = [None] * n
        self.modes = capture_modes()
        self.gpus = _gpu_devices(domains)
        self.caller_device = accel.current_device(accel.accelerator_type()) if self.gpus else None
        self.caller_streams = {d: accel.current_stream(accel.gpu(d)) for d in self.gpus}
        pool = {} if pool is None else pool  # (micro-batch index, GPU) -> stream, kept across calls by the pipeline
        for key in [(i, d) for i in range(n) for d in self.gpus if (i, d) not in pool]:
            pool[key] = accel.new_stream(accel.gpu(key[1]))
        self.streams = [{d: pool[(i, d)] for d in self.gpus} for i in range(n)]
        self.handoff: dict[int, Any] = {}  # GPU -> event recorded by the last worker that released it
        for streams in self.streams:
            for d, stream in streams.items():
                stream.wait_stream(self.caller_streams[d])

    def hand_over(self, domain: Any, index: int) -> None:
        """Worker ``index`` releases ``domain``: mark on its stream there how far its work goes (call before
        releasing the lock)."""
        if domain in self.gpus:
            event = accel.new_event(accel.gpu(domain))
            event.record(self.streams[index][domain])
            self.handoff[domain] = event

    def take_over(self, domain: Any, index: int) -> None:
        """Worker ``index`` holds ``domain`` now: its stream there waits for the previous holder's work."""
        event = self.handoff.get(domain) if domain in self.gpus else None
        if event is not None:
            self.streams[index][domain].wait_event(event)


def _gpu_devices(domains: set) -> list[int]:
    """The domains that are GPUs with streams, their accelerator already initialised (never initialises CUDA)."""
    count = accel.gpu_count()
    if not count or not accel.has_streams(accel.gpu(0)):
        return []
    module = accel.device_module(accel.gpu(0))
    if not getattr(module, "is_initialized", lambda: True)():
        return []
    return sorted(d for d in domains if isinstance(d, int) and 0 <= d < count)


def _record_streams(obj: Any, streams: dict) -> None:
    """Mark GPU outputs made on worker streams as used by the caller's streams (allocator safety)."""
    if isinstance(obj, torch.Tensor):
        if accel.is_gpu(obj.device) and obj.device.index in streams:
            obj.record_stream(streams[obj.device.index])
        return
    items = _items(obj)
    for item in items[1] if items else ():
        _record_streams(item, streams)
