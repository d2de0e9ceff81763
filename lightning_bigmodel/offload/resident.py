"""What the disk stream keeps in memory: everything (memory to spare), or a stable subset of its units.

The stream (:class:`~lightning_bigmodel.offload.readahead.ReadAhead`) reads the ``"disk"`` weights of each *unit* (the
finest module holding them) before it computes. What stays in memory between forwards:

- **Memory to spare** (:func:`should_release` false: the disk weights fit in half the memory left; for a plan fitted
  for a batch, :func:`release_reason` none: they fit beside the room it kept for the activations): each unit is read
  once, at its first use, into memory of its own and kept (:class:`OwnedWeights`): later forwards read nothing and copy
  nothing, and the weights no longer depend on the file (as ``"cpu"`` weights after their first forward).
- **Memory short**: the memory the process still has once the first forward ran, beyond its CPU budget, the stream's
  buffers and a margin (:func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`: the cgroup's room or the
  available RAM, less :data:`SUBSET_MARGIN`), holds a stable subset of the units (:func:`spread`), spread evenly over
  the execution order so that the disk keeps working while the compute runs through them. Their file ranges stay in
  the page cache: each forward copies them into a buffer from memory, without touching the disk. The file ranges of
  every other unit are dropped from the page cache as soon as they are read, so the streamed bytes never push the
  subset out (no LRU churn; they are read around the page cache, see :mod:`~lightning_bigmodel.offload.stream`), and
  only they are read from the disk again. Page cache is reclaimable: a burst of
  activations that needs the memory evicts part of the subset (read again later) instead of getting the process
  OOM-killed. Under an explicit CPU budget the same holds: the subset takes the memory the budget leaves free in the
  process's limit.
- **Tied weights** (``lm_head`` sharing ``wte``'s tensor: two units, one file range): the range leaves the page cache
  only after the last unit using it in the order (:func:`read_again_later`), so a forward reads it from the disk once;
  its bytes are kept out of the subset's room while it waits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from lightning_bigmodel.offload.stream import Layout
from lightning_bigmodel.offload.subclass import plain_parts
from lightning_bigmodel.planning.budget import detect_cpu_memory
from lightning_bigmodel.planning.table import format_bytes

# Memory left free beside the resident subset (at most the detected budget's headroom): the subset is page cache, which
# a burst of activations reclaims instead of getting the process OOM-killed, so it need not keep the budget's
# max(256 MiB, 5%) back; this only keeps a forward's own small allocations from evicting part of it each time.
SUBSET_MARGIN = 64 * 2**20


def should_release(disk_bytes: int) -> bool:
    """Whether streamed disk weights should leave the page cache after use, for a plan that knows nothing of the
    activations: when they take more than half of the memory this process can still use (its cgroup's room or the
    available RAM, see :func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`)."""
    return disk_bytes > detect_cpu_memory().free // 2


def release_reason(disk_bytes: int, activations: int) -> Optional[str]:
    """Why the disk weights of a plan fitted for a batch must stream (released after use) instead of being kept, or
    ``None`` to keep them: kept, they take memory of their own beside the ``activations`` the plan kept room for (its
    simulated CPU bytes beside the weights, see :class:`~lightning_bigmodel.planning.devices.PlannedDeviceMap`), and the
    budget's headroom for the process; all three must fit in what this process can still use. (The plan sent them to
    disk to leave that room: keeping them whenever they fit half the free memory got a 4 x 256 batch OOM-killed.)"""
    cpu = detect_cpu_memory()
    need = disk_bytes + activations + cpu.headroom
    if need <= cpu.free:
        return None
    return (
        f"the disk weights ({format_bytes(disk_bytes)}), the plan's room for the batch's activations "
        f"({format_bytes(activations)}) and the headroom ({format_bytes(cpu.headroom)}) exceed what this process can "
        f"still use ({format_bytes(cpu.free)}, {cpu.describe()})"
    )


def subset_room(reserved: int) -> int:
    """Bytes the resident subset may take: what this process can still use (the cgroup's room or the available RAM,
    see :func:`~lightning_bigmodel.planning.budget.detect_cpu_memory`) less :data:`SUBSET_MARGIN` (at most the
    budget's headroom) and ``reserved`` (the stream's buffers still to allocate, ranges waiting in the page cache)."""
    cpu = detect_cpu_memory()
    return max(0, cpu.free - min(cpu.headroom, SUBSET_MARGIN) - reserved)


def spread(order: Sequence[str], sizes: Mapping[str, int], room: int) -> set[str]:
    """Units of ``order`` to hold resident: as many of their ``sizes`` as ``room`` allows, spread evenly over the order
    (a unit is taken each time the credit of ``room / total`` per byte walked covers it)."""
    total = sum(sizes[name] for name in order)
    if room <= 0 or not total:
        return set()
    share, credit, kept = min(1.0, room / total), 0.0, set()
    for name in order:
        credit += share * sizes[name]
        if sizes[name] and credit >= sizes[name]:
            kept.add(name)
            credit -= sizes[name]
    return kept


def read_again_later(order: Sequence[str], places: Mapping[str, Sequence[int]]) -> set[str]:
    """Units whose file ranges a later unit of the same forward reads again (a tied weight's first user): their pages
    must stay in the page cache until then. ``places``: each unit's file views (data pointers)."""
    seen: set[int] = set()
    out: set[str] = set()
    for name in reversed(order):
        if seen & set(places[name]):
            out.add(name)
        seen |= set(places[name])
    return out


@dataclass
class Residency:
    """What stays in the page cache while memory is short (see the module docstring)."""

    held: set[str]  # units whose ranges a later unit reads again in the forward (tied weights)
    kept: set[str]  # the resident subset
    kept_parts: set[int]  # the subset's tensors (data pointers of the file views)
    cached_parts: set[int]  # tensors whose ranges are in the page cache when read: kept or held
    room: int  # bytes the subset could take when it was chosen


def choose_residency(
    order: Sequence[str], places: Mapping[str, Sequence[int]], sizes: Mapping[str, int], keep: bool, reserved: int
) -> Residency:
    """The tied ranges to hold and, with ``keep``, the resident subset: spread over ``order`` in the room
    :func:`subset_room` finds less ``reserved`` (the stream's buffers still to allocate) and the held ranges."""
    held = read_again_later(order, places)
    room = subset_room(reserved + sum(sizes[name] for name in held)) if keep else 0
    kept = spread(order, sizes, room) if keep else set()
    kept_parts = {ptr for name in kept for ptr in places[name]}
    return Residency(held, kept, kept_parts, kept_parts | {ptr for name in held for ptr in places[name]}, room)


class OwnedWeights:
    """Memory to spare: each unit's disk parameters read once into memory of their own, then only installed.

    A parameter tied to one already read (``lm_head`` and ``wte``) is that one: read once, held once. Thread-safe:
    a second thread wanting a unit being read waits for that read.
    """

    def __init__(self) -> None:
        self._by_unit: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._by_param: dict[int, nn.Parameter] = {}  # by id of the disk parameter (tied ones are one object)
        self._lock = threading.Lock()
        self.reads = 0  # units read from the files

    def get(self, name: str, params: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, nn.Parameter]]:
        """``(attribute, parameter)`` pairs to install for unit ``name``, whose disk parameters are ``params``.

        Raises:
            CheckpointError: a read failed or came back short, or a file changed since it was loaded.
        """
        owned = self._by_unit.get(name)
        if owned is not None:
            return owned
        with self._lock:
            owned = self._by_unit.get(name)
            if owned is None:
                missing = [(attr, p) for attr, p in params if id(p) not in self._by_param]
                if missing:
                    layout = Layout([(f"{name}.{attr}", part) for attr, p in missing for part in plain_parts(p)])
                    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
                    layout.read_into(buffer, False)
                    self.reads += 1
                    for _, p in missing:
                        self._by_param[id(p)] = nn.Parameter(layout.rebuild(buffer, p), requires_grad=False)
                owned = self._by_unit[name] = [(attr, self._by_param[id(p)]) for attr, p in params]
            return owned

    def clear(self) -> None:
        with self._lock:
            self._by_unit.clear()
            self._by_param.clear()
