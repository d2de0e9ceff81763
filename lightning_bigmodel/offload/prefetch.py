"""Prefetch of offloaded weights on a side GPU stream, in the execution order learned on the first forward.

During the first forward the prefetcher only records the order in which weight hooks start. Afterwards, when the
hook of module ``i`` starts, the parameters of the module that followed it are copied in by a background thread:
disk views are read (large reads, no page faults on the compute thread) into a reusable page-locked buffer (see
:mod:`~lightning_bigmodel.offload.staging`), and every host tensor is copied to the GPU with ``non_blocking=True``
on a side stream, followed by an event. When that module
starts, its hook waits for the event on the current stream and calls ``record_stream`` on the copies, so the caching
allocator does not reuse their memory before the compute stream is done with them. At most one module is in flight,
on the GPU too: before allocating module ``i + 1``'s copies the background thread waits for an event the compute stream
recorded when module ``i`` started (every module before ``i`` done, their copies freed), so however far the CPU runs
ahead, two modules' weights are resident at steady state (the planner reserves room for the two largest). Pageable host
tensors are staged through pinned memory; pinned ones and tensors on another GPU (a tied weight resident there) are
copied directly. The background thread makes the hook's device its current device, so it never touches GPU 0's context.

The order is learned in one thread only: the first that calls :meth:`Prefetcher.started` (micro-batches of a
pipelined forward run in threads and would interleave their orders). Other threads neither record nor prefetch
while it records, and only that thread's :meth:`Prefetcher.end_forward` fixes the order; a caller that knows no
forward is running (e.g. the Lightning strategy after a ``predict_step``) may fix it with
:meth:`Prefetcher.finish_recording` from any thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from typing import Optional

import torch

from lightning_bigmodel import _accelerator as accel
from lightning_bigmodel._modes import capture_modes
from lightning_bigmodel.offload.staging import Staging, needs_staging
from lightning_bigmodel.offload.subclass import copy_to, plain_parts


def _blocking_event(device: torch.device) -> torch.Event:
    """An event whose ``synchronize`` sleeps until the GPU reaches it (``cudaEventBlockingSync``): a default event's
    spins a CPU core at full load for as long as the wait lasts, here most of every forward."""
    module = accel.device_module(device)
    try:
        return module.Event(blocking=True)
    except TypeError:  # an accelerator whose events take no such flag
        return module.Event()


class Prefetcher:
    """Learns the order of :class:`~lightning_bigmodel.offload.hooks.WeightHook` calls and copies the next one's
    parameters in ahead of time. GPU execution devices only (any accelerator with streams: ``torch.cuda``-like)."""

    def __init__(self) -> None:
        self._order: list = []
        self._recording = True
        self._recorder: Optional[int] = None  # `threading.get_ident()` of the thread learning the order
        self._next: dict = {}
        self._pending: Optional[tuple[object, Future]] = None
        self._lock = threading.Lock()  # guards `_pending` and the switch out of recording
        self._streams: dict[torch.device, torch.Stream] = {}
        self._staging = Staging()  # page-locked RAM the disk weights of the module in flight are read into
        self._pool: Optional[ThreadPoolExecutor] = None
        self.release_disk = False  # drop disk pages once staged (set when the disk weights exceed the memory left)

    @property
    def recording(self) -> bool:
        """Whether the execution order is still being learned."""
        return self._recording

    def started(self, hook) -> None:
        """Called by a weight hook once its own weights are installed: record, or prefetch its successor."""
        if self._recording:
            with self._lock:
                if self._recording:
                    if self._recorder is None:
                        self._recorder = threading.get_ident()
                    if self._recorder == threading.get_ident():
                        self._order.append(hook)
                    return
        successor = self._next.get(hook)
        if successor is None:
            return
        with self._lock:
            if self._pending is not None and self._pending[0] is successor:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-prefetch")
            # Reached by the compute stream once every module before `hook` is done (their weights are free): the
            # successor's copies are not allocated before, so at most two modules' weights are resident at once.
            reached = _blocking_event(hook.device)
            reached.record(accel.current_stream(hook.device))
            self._pending = (successor, self._pool.submit(self._copy_in, successor, capture_modes(), reached))

    def end_forward(self) -> None:
        """Called after the root forward: the recording thread's first one fixes the order (see
        :meth:`finish_recording`); calls from other threads, or after the order is fixed, do nothing."""
        if self._recording and self._recorder == threading.get_ident():
            self.finish_recording()

    def finish_recording(self) -> None:
        """Fix the order recorded so far (the last module is followed by the first); a no-op once fixed or before
        any module ran. Call it only when no forward is running."""
        with self._lock:
            if not self._recording or not self._order:
                return
            order = self._order
            for current, successor in zip(order, order[1:] + order[:1]):
                if current is not successor:
                    self._next.setdefault(current, successor)
            self._recording = False
            self._order = []

    def take(self, hook) -> Optional[dict[int, torch.Tensor]]:
        """The prefetched copies for ``hook`` (entry index -> device tensor), ready on the current stream; else None."""
        with self._lock:
            if self._pending is None or self._pending[0] is not hook:
                return None
            _, future = self._pending
            self._pending = None
        copies, event = future.result()
        stream = accel.current_stream(hook.device)
        stream.wait_event(event)
        for copy in copies.values():
            for part in plain_parts(copy):  # a quantized weight: its inner tensors are what the allocator tracks
                part.record_stream(stream)
        return copies

    def _side_stream(self, device: torch.device) -> torch.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = accel.new_stream(device)
        return stream

    def _copy_in(self, hook, modes, reached: torch.Event) -> tuple[dict[int, torch.Tensor], torch.Event]:
        """Runs on the background thread, in the modes of the forward's thread (``modes``, from ``capture_modes``):
        wait until compute reached ``reached``, stage disk views, issue the copies on the side stream, record an event.
        """
        with ExitStack() as stack:
            modes(stack)
            return self._copy_in_modes(hook, reached)

    def _copy_in_modes(self, hook, reached: torch.Event) -> tuple[dict[int, torch.Tensor], torch.Event]:
        # This thread's current device starts as GPU 0: leaving the side stream's `with` block would switch back to
        # it (and create a context there). Make the hook's device current for good; this thread serves no other.
        accel.set_device(hook.device)
        stream = self._side_stream(hook.device)
        reached.synchronize()  # bounds run-ahead on the GPU: the modules before `hook`'s predecessor freed their copies
        copies = {}
        pageable = [index for index in hook.prefetchable if needs_staging(hook.entries[index].host)]
        with accel.use_stream(stream):
            stream.wait_event(reached)
            # Pageable host memory (disk views) is read into the reusable page-locked buffer first; pinned host memory
            # and another GPU's tensor (a tied weight resident there) are copied directly: GPU to GPU, not through RAM.
            staged = self._staging.stage(hook, pageable, self.release_disk) if pageable else {}
            for index in hook.prefetchable:
                source = staged.get(index, hook.entries[index].host)
                copies[index] = copy_to(source, hook.device, non_blocking=True)
            event = _blocking_event(hook.device)  # the staging buffer's next user sleeps on it too
            event.record(stream)
        if pageable:
            self._staging.copied(event)
        return copies, event

    def close(self) -> None:
        """Drop any pending copies, stop the background thread, and forget the hooks: each weight hook refers to this
        prefetcher, so keeping them would form a reference cycle that holds their host tensors (page-locked RAM)
        until a garbage collection, not until the release."""
        with self._lock:
            pending, self._pending = self._pending, None
            self._recording = False
            order, self._order = self._order, []
            successors, self._next = self._next, {}
        if pending is not None:
            pending[1].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._streams.clear()
        self._staging.close()
        del pending, order, successors  # the copies and hooks are freed here, with no lock held
