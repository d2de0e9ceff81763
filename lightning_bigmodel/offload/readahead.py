"""Disk weights streamed behind the compute on a CPU execution device: while one module computes, the next are read.

:class:`ReadAhead` hooks each module holding ``"disk"`` weights (a *unit*: the finest module, a ``Linear`` rather than
its block). Their memory-mapped views are never touched: before a unit runs, its weights are read with a few large reads
(:class:`~lightning_bigmodel.offload.stream.Layout`) into a reusable buffer whose views are installed in the module's
parameters; after it ran the file views are put back and the buffer is free for a later unit. Two reader threads read
the units in execution order (learned on the first forward; the last unit is followed by the first) into the free
buffers, ahead of the compute; they wait on a condition when every buffer is full, and the compute thread waits only
for a read not done. Memory: ``stream_bytes`` (the planner's reserve, ``1 + READ_AHEAD_LAYERS`` times the largest piece
brought in at once, see :func:`~lightning_bigmodel.offload.attach.stream_bytes`) is cut into buffers of the largest
unit's size (counted without alignment padding, as the simulation counts them), at least two. What stays in memory
besides is decided in :mod:`~lightning_bigmodel.offload.resident`.

A read that fails, comes back short, or finds its file changed since it was loaded raises the engine's
:class:`~lightning_bigmodel.checkpoint.errors.CheckpointError` in the compute thread, naming the file and the tensors;
nothing touches the map, so a truncated file never raises ``SIGBUS``. A unit whose output is a view of its buffer (a
module returning its weight) keeps that buffer: it is never reused under the output.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from lightning_bigmodel.offload._pool import BufferPool
from lightning_bigmodel.offload.resident import OwnedWeights, choose_residency, should_release
from lightning_bigmodel.offload.stream import Layout
from lightning_bigmodel.offload.subclass import plain_parts
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS

__all__ = ["ReadAhead", "should_release"]

_MAX_BUFFERS = 8  # stream buffers at most: enough to smooth reads of uneven units, whatever the reserve
_READERS = 2  # reader threads


@dataclass
class _Unit:
    module: nn.Module
    params: list[tuple[str, torch.Tensor]]  # (attribute, the disk parameter the module holds between forwards)
    layout: Layout


class ReadAhead:
    """Streams the disk weights of a dispatched model computing on the CPU (see the module docstring).

    Has the interface of :class:`~lightning_bigmodel.offload.prefetch.Prefetcher` that the root hook and the
    strategy use (:attr:`recording`, :meth:`end_forward`, :meth:`finish_recording`, :meth:`close`).

    Args:
        depth: units read ahead when ``stream_bytes`` is not given (``1 + depth`` buffers of the largest unit).
        release: memory is short (see :func:`should_release`): stream the units each forward, drop what was read
            from the page cache, keep a resident subset; else read each unit once and keep it.
        stream_bytes: memory for the stream's buffers.
        keep: hold a resident subset in the memory left (default: ``release``).
    """

    def __init__(
        self,
        depth: int = READ_AHEAD_LAYERS,
        release: bool = True,
        stream_bytes: Optional[int] = None,
        keep: Optional[bool] = None,
    ) -> None:
        self.depth = depth
        self.release = release
        self.keep = release if keep is None else keep
        self.stream_bytes = stream_bytes
        self._largest = 0  # bytes of the largest unit's tensors, without alignment padding
        self._units: dict[str, _Unit] = {}
        self._tensors: dict[str, list[torch.Tensor]] = {}  # unit -> the plain disk views it uses
        self._order: list[str] = []
        self._position: dict[str, int] = {}
        self._recording = True
        self._recorder: Optional[int] = None
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # the compute thread waits here for a read
        self._work = threading.Condition(lock)  # the readers wait here for a free buffer or a unit to read
        self.pool = BufferPool()
        self._ready: dict[str, tuple[torch.Tensor, bool, Optional[BaseException]]] = {}
        self._in_use: dict[tuple[str, int], list[tuple[torch.Tensor, bool]]] = {}
        self._inflight: set[str] = set()
        self._cursor = 0
        self._generation = 0
        self._kept: set[str] = set()  # units whose file ranges stay in the page cache
        self._kept_parts: set[int] = set()  # their tensors (data pointers of the file views)
        self._held: set[str] = set()  # units whose file ranges a later unit reads again in the forward (tied)
        self._cached_parts: set[int] = set()  # tensors whose ranges are in the page cache when read: kept or held
        self._owned = OwnedWeights()  # without release: parameters read once, kept
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._reads = 0  # units read by the stream
        self.kept_room = 0  # bytes the resident subset could take when it was chosen

    @property
    def recording(self) -> bool:
        """Whether the execution order is still being learned."""
        return self._recording

    @property
    def reads(self) -> int:
        """Units read from the files so far (tests and benchmarks)."""
        return self._reads + self._owned.reads

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the stream's buffers allocated so far."""
        return self.pool.made * self.pool.slot_bytes

    @property
    def kept_bytes(self) -> int:
        """Bytes of the units whose file ranges stay in the page cache (the resident subset)."""
        return sum(self._units[name].layout.nbytes for name in self._kept)

    def _release(self, name: str) -> bool:
        """Whether ``name``'s file ranges leave the page cache once read: not those of the resident subset, nor of a
        unit sharing a tensor with it, nor those a later unit reads again in the forward (tied weights). The others
        are read around the page cache (``O_DIRECT``), except where a kept or held range already put them there."""
        return self.release and name not in self._held and not (set(self._units[name].layout.places) & self._kept_parts)

    def _read(self, name: str, buffer: torch.Tensor) -> None:
        layout, release = self._units[name].layout, self._release(name)
        layout.read_into(buffer, release, direct=release and not set(layout.places) & self._cached_parts)
        self._reads += 1

    def attach(self, name: str, module: nn.Module, tensors: Sequence[torch.Tensor]) -> list:
        """Hook ``module`` (called ``name``), whose forward uses the disk views ``tensors``; return the hook handles."""
        params = [(attr, p) for attr, p in module._parameters.items() if any(p is t for t in tensors)]
        parts = [(f"{name}.{attr}", part) for attr, p in params for part in plain_parts(p)]  # quantized: inner views
        self._tensors[name] = [part for _, part in parts]
        self._units[name] = _Unit(module, params, Layout(parts))
        self.pool.slot_bytes = max(self.pool.slot_bytes, self._units[name].layout.nbytes)
        self._largest = max(self._largest, sum(part.numel() * part.element_size() for _, part in parts))
        return [
            module.register_forward_pre_hook(lambda *_: self.before(name)),
            module.register_forward_hook(lambda _m, _i, output: self.after(name, output), always_call=True),
        ]

    # ------------------------------------------------------------------ the compute thread
    def before(self, name: str) -> None:
        """Install ``name``'s weights: owned, read ahead (waiting for the read if it is in flight), or read now."""
        unit, me = self._units[name], threading.get_ident()
        if self._recording:
            with self._cond:
                if self._recording and self._recorder in (None, me):
                    self._recorder = me
                    self._order.append(name)
        if not self.release:  # memory to spare: read once into memory of its own, then only installed
            for attr, param in self._owned.get(name, unit.params):
                unit.module._parameters[attr] = param
            return
        with self._cond:
            buffer, pooled, error = None, False, None
            if not self._recording and name in self._position:
                buffer, pooled, error = self._await(name)
            read_here = buffer is None
            if read_here:  # the first forward, or out of order: read it here
                buffer, pooled = self.pool.take(unit.layout.nbytes)
            self._in_use.setdefault((name, me), []).append((buffer, pooled))
        try:
            if error is not None:
                raise error
            if read_here:
                self._read(name, buffer)
        except BaseException:
            self._give_back(name, me, None)
            raise
        for attr, param in unit.params:
            unit.module._parameters[attr] = nn.Parameter(unit.layout.rebuild(buffer, param), requires_grad=False)

    def after(self, name: str, output: Any = None) -> None:
        """Put the file views back and free the buffer (kept when ``output`` is a view of it)."""
        unit = self._units[name]
        for attr, param in unit.params:
            unit.module._parameters[attr] = param
        if self.release:
            self._give_back(name, threading.get_ident(), output)

    def _give_back(self, name: str, me: int, output: Any) -> None:
        with self._cond:
            stack = self._in_use.get((name, me))
            if not stack:
                return
            buffer, pooled = stack.pop()
            if not stack:
                del self._in_use[(name, me)]
            self.pool.put(buffer, pooled, output)
            if pooled:
                self._work.notify()  # one reader can take the buffer (waking both would wake one for nothing)

    def _await(self, name: str) -> tuple[Optional[torch.Tensor], bool, Optional[BaseException]]:
        """(Under the lock.) ``name``'s read, waiting while the reader works on it; on a unit out of order, restart
        the stream after ``name`` and return nothing (the caller reads it)."""
        self._start()
        while True:
            if name in self._ready:
                return self._ready.pop(name)
            coming = name in self._inflight or self._next_unit() == name
            progress = bool(self._inflight) or self.pool.available()
            if not (coming and progress) or self._closed:  # closed: no reader comes, read it here
                self._restart_after(name)
                return None, False, None
            self._cond.wait()

    def _restart_after(self, name: str) -> None:
        self._generation += 1  # a read in flight is dropped when it lands
        for buffer, pooled, _ in self._ready.values():
            self.pool.put(buffer, pooled)
        self._ready.clear()
        self._cursor = (self._position[name] + 1) % len(self._order)
        self._work.notify_all()

    # ------------------------------------------------------------------ the reader thread
    def _next_unit(self) -> Optional[str]:
        """(Under the lock.) The next unit the reader will read."""
        return self._order[self._cursor] if self._order else None

    def _next_task(self) -> Optional[tuple[str, torch.Tensor, bool, int]]:
        if self._closed or self._recording or not self.release:  # memory to spare: every unit is owned, no stream
            return None
        name = self._next_unit()
        if name is None or name in self._ready or name in self._inflight or any(u == name for u, _ in self._in_use):
            return None
        if not self.pool.available():
            return None
        buffer, pooled = self.pool.take(self._units[name].layout.nbytes)
        self._cursor = (self._cursor + 1) % len(self._order)
        self._inflight.add(name)
        return name, buffer, pooled, self._generation

    def _run(self) -> None:
        while True:
            with self._cond:
                task = self._next_task()
                while task is None and not self._closed:
                    self._work.wait()
                    task = self._next_task()
                if self._closed:
                    return
            name, buffer, pooled, generation = task
            error = None
            try:
                self._read(name, buffer)
            except BaseException as err:  # noqa: BLE001 - raised in the compute thread, which waits for this read
                error = err
            with self._cond:
                self._inflight.discard(name)
                if generation != self._generation:
                    self.pool.put(buffer, pooled)
                else:
                    self._ready[name] = (buffer, pooled, error)
                self._cond.notify_all()  # the compute thread(s); this reader goes on by itself

    def _start(self) -> None:
        """Start the readers: two, so that a read is in flight while the other reader's thread waits for a core (the
        machine computing) or moves its bytes into place; each ``O_DIRECT`` read itself needs almost no CPU."""
        while len(self._threads) < _READERS and not self._closed:
            thread = threading.Thread(target=self._run, name="bigmodel-stream", daemon=True)
            self._threads.append(thread)
            thread.start()

    # ------------------------------------------------------------------ order and the resident subset
    def end_forward(self) -> None:
        """Called after the root forward: the recording thread's first call fixes the order."""
        if self._recording and self._recorder == threading.get_ident():
            self.finish_recording()

    def finish_recording(self) -> None:
        """Fix the order recorded so far (each unit once, at its first call), choose the resident subset and start
        reading ahead; a no-op once fixed or before any unit ran."""
        with self._cond:
            if not self._recording or not self._order:
                return
            self._order = list(dict.fromkeys(self._order))
            self._position = {name: index for index, name in enumerate(self._order)}
            ahead = 1 + self.depth if self.stream_bytes is None else self.stream_bytes // max(1, self._largest)
            self.pool.slots = max(2, min(len(self._order), _MAX_BUFFERS, ahead))
            if self.release:  # memory short: tied ranges held for their second use, a resident subset kept
                places = {name: list(self._units[name].layout.places) for name in self._order}
                sizes = {name: self._units[name].layout.nbytes for name in self._order}
                chosen = choose_residency(self._order, places, sizes, self.keep, self.pool.unallocated_bytes)
                self._held, self._kept, self._kept_parts = chosen.held, chosen.kept, chosen.kept_parts
                self._cached_parts, self.kept_room = chosen.cached_parts, chosen.room
            self._cursor = 0
            self._recording = False
            if self.release:  # memory to spare: every unit is read once and owned, no reader (it would only be woken)
                self._start()
            self._work.notify_all()

    def close(self) -> None:
        """Stop the readers (after the reads in flight) and drop the buffers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._work.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        with self._cond:
            self._ready.clear()
            self.pool.clear()
        self._owned.clear()

