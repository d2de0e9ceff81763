"""The disk stream's reusable buffers (see :class:`~lightning_bigmodel.offload.readahead.ReadAhead`)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_bigmodel.offload.hooks import map_tensors
from lightning_bigmodel.offload.stream import aligned_empty


class BufferPool:
    """At most :attr:`slots` buffers of :attr:`slot_bytes` (the largest unit) each, allocated when first needed
    (aligned for ``O_DIRECT`` reads, see :func:`~lightning_bigmodel.offload.stream.aligned_empty`).

    Not thread-safe: the stream calls it under its lock.
    """

    def __init__(self) -> None:
        self.slot_bytes = 0
        self.slots = 2
        self.made = 0  # buffers allocated (free, ready, in flight or in use)
        self._free: list[torch.Tensor] = []

    def available(self) -> bool:
        """Whether :meth:`take` returns a pooled buffer."""
        return bool(self._free) or self.made < self.slots

    def take(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """``(buffer, pooled)``: a free buffer (allocated up to :attr:`slots`), else one of ``nbytes`` of its own."""
        if self._free:
            return self._free.pop(), True
        if self.made < self.slots:
            self.made += 1
            return aligned_empty(self.slot_bytes), True
        return aligned_empty(nbytes), False

    def put(self, buffer: torch.Tensor, pooled: bool, output: Any = None) -> None:
        """Give back a buffer :meth:`take` returned; one that a tensor of ``output`` still views (a module returned a
        view of its weight) is left to the output, and a new one will replace it."""
        if pooled:
            if _escapes(output, buffer):
                self.made -= 1
            else:
                self._free.append(buffer)

    @property
    def unallocated_bytes(self) -> int:
        """Bytes of the buffers not allocated yet."""
        return (self.slots - self.made) * self.slot_bytes

    def clear(self) -> None:
        """Drop the free buffers."""
        self._free.clear()


def _escapes(output: Any, buffer: torch.Tensor) -> bool:
    """Whether a tensor of ``output`` shares ``buffer``'s memory (a module returned a view of its weight)."""
    if output is None:
        return False
    target, found = buffer.untyped_storage().data_ptr(), []

    def check(tensor: torch.Tensor) -> torch.Tensor:
        try:
            if tensor.device.type == "cpu" and tensor.untyped_storage().data_ptr() == target:
                found.append(tensor)
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): not a view of ours
            pass
        return tensor

    map_tensors(output, check)
    return bool(found)
