"""Disk weights streamed ahead of compute on a CPU execution device: read the next layer(s) while one computes.

On the CPU, ``"disk"`` weights are memory-mapped views used in place. Left alone, the compute thread takes every
page fault (small reads, no overlap with compute) and the page cache keeps every layer it read, pushing out whatever
the kernel picks. :class:`ReadAhead` hooks each module holding disk weights:

- before a module runs, it asks a background thread to start reading the next ``depth`` modules in execution order
  (:func:`~lightning_bigmodel.offload.pages.read_ahead`: exact file ranges, large requests, no waiting), and
  starts its own read if nobody did;
- after it ran, the same thread releases its pages (:func:`~lightning_bigmodel.offload.pages.release`), when the
  disk weights do not fit the memory left (:func:`should_release`; else the page cache keeps them for the next
  forward).

So at most ``1 + depth`` modules' disk bytes are in memory or in flight at once (the planner reserves that much of the CPU budget,
see :data:`READ_AHEAD_LAYERS`), and compute overlaps the reads. The execution order is learned on the first forward
(one thread records it; the last module is followed by the first, so consecutive forwards stream too); the first
forward reads nothing ahead but still releases.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import torch
from torch import nn

from lightning_bigmodel.offload.pages import read_ahead, release
from lightning_bigmodel.offload.subclass import plain_parts
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS, detect_cpu_memory


def should_release(disk_bytes: int) -> bool:
    """Whether streamed disk weights should leave the page cache after use: when they take more than half of the
    memory this process can still use (its cgroup's room or the available RAM, see
    :func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`)."""
    return disk_bytes > detect_cpu_memory().free // 2


class ReadAhead:
    """Read-ahead and release of the disk weights of a dispatched model computing on the CPU.

    Has the interface of :class:`~lightning_bigmodel.offload.prefetch.Prefetcher` that the root hook and the
    strategy use (:attr:`recording`, :meth:`end_forward`, :meth:`finish_recording`, :meth:`close`).

    Args:
        depth: how many modules to read ahead of the one computing.
        release: drop each module's pages after its forward. Worth it when the disk weights do not fit the memory
            left (a cgroup limit, a full machine: see :func:`should_release`); when they do, the page cache keeps
            them (the kernel may still reclaim them) and later forwards read nothing from disk.
    """

    def __init__(self, depth: int = READ_AHEAD_LAYERS, release: bool = True) -> None:
        self.depth = depth
        self.release = release
        self._tensors: dict[str, list[torch.Tensor]] = {}
        self._order: list[str] = []
        self._next: dict[str, str] = {}
        self._recording = True
        self._recorder: Optional[int] = None
        self._pending: dict[str, Future] = {}
        self._releases: list[Future] = []
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None
        self._release_pool: Optional[ThreadPoolExecutor] = None

    @property
    def recording(self) -> bool:
        """Whether the execution order is still being learned."""
        return self._recording

    def attach(self, name: str, module: nn.Module, tensors: Sequence[torch.Tensor]) -> list:
        """Hook ``module`` (called ``name``), whose forward uses the disk views ``tensors``; return the hook handles."""
        self._tensors[name] = [part for tensor in tensors for part in plain_parts(tensor)]  # quantized: inner views
        return [
            module.register_forward_pre_hook(lambda *_: self.before(name)),
            module.register_forward_hook(lambda *_: self.after(name), always_call=True),
        ]

    def before(self, name: str) -> None:
        """Read ``name``'s successors ahead once the modules before it are released (the window stays bounded); wait
        until ``name``'s own read was issued (else issue it now)."""
        with self._lock:
            future = self._pending.pop(name, None)
            releases, self._releases = self._releases, []
            if self._recording:
                if self._recorder is None:
                    self._recorder = threading.get_ident()
                if self._recorder == threading.get_ident():
                    self._order.append(name)
                ahead = []
            else:
                ahead = self._successors(name)
        for done in releases:  # quick (no disk I/O): what earlier modules used leaves memory before more comes in
            done.result()
        with self._lock:
            for successor in ahead:
                if successor not in self._pending:
                    self._pending[successor] = self._submit(self._read, successor)
        if future is not None:
            future.result()
        else:  # not read ahead (the first forward, or out of order): large requests now rather than page faults
            self._read(name)

    def after(self, name: str) -> None:
        """Release ``name``'s pages once its forward is done, except those of modules being read (tied weights)."""
        with self._lock:
            if not self.release or name in self._pending:
                return
            wanted = {id(tensor) for unit in self._pending for tensor in self._tensors[unit]}
            done = [tensor for tensor in self._tensors[name] if id(tensor) not in wanted]
            if done:
                if self._release_pool is None:  # its own thread: a release never waits behind a read being issued
                    self._release_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-release")
                self._releases.append(self._release_pool.submit(self._release, done))

    def _successors(self, name: str) -> list[str]:
        out, current = [], name
        for _ in range(self.depth):
            current = self._next.get(current)
            if current is None or current == name or current in out:
                break
            out.append(current)
        return out

    def _submit(self, fn, arg) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigmodel-readahead")
        return self._pool.submit(fn, arg)

    def _read(self, name: str) -> None:
        for tensor in self._tensors[name]:
            read_ahead(tensor)

    @staticmethod
    def _release(tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            release(tensor)

    def end_forward(self) -> None:
        """Called after the root forward: the recording thread's first call fixes the order."""
        if self._recording and self._recorder == threading.get_ident():
            self.finish_recording()

    def finish_recording(self) -> None:
        """Fix the order recorded so far (the last module is followed by the first); a no-op once fixed or empty."""
        with self._lock:
            if not self._recording or not self._order:
                return
            order = self._order
            for current, successor in zip(order, order[1:] + order[:1]):
                if current != successor:
                    self._next.setdefault(current, successor)
            self._recording = False
            self._order = []

    def close(self) -> None:
        """Wait for the reads and releases in flight, then stop the background thread."""
        with self._lock:
            self._pending.clear()
            self._releases.clear()
            pools = (self._pool, self._release_pool)
            self._pool = self._release_pool = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)
