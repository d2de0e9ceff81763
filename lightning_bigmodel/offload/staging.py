"""Page-locked staging of pageable weights (disk views) on their way to a GPU: one reusable buffer per prefetcher.

The GPU copies a host tensor asynchronously only from page-locked memory, so the prefetcher first reads a module's
disk weights into such memory. It used to take a fresh ``torch.empty(..., pin_memory=True)`` per tensor and per
forward: torch's caching host allocator rounds each block up to a power of two and keeps freed blocks for reuse, so a
1.1 GiB layer held 2 GiB of page-locked RAM, outside the CPU budget and never given back. Here one buffer, page-locked
at its size (:func:`~lightning_bigmodel.offload.pinned.pinned_empty`), takes the module in flight: the bytes of its file
views are read with the streaming engine's large ``preadv`` calls (:class:`~lightning_bigmodel.offload.stream.Layout`:
no page faults, a changed file is an error naming it), other pageable tensors are copied after them. The buffer grows
to the largest module and is reused by every later module; it is freed with the prefetcher.

Reuse is safe because the buffer is overwritten only once the GPU copies from it are done: :meth:`Staging.stage`
waits for the event recorded after the last job's copies (:meth:`Staging.copied`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lightning_bigmodel.offload.pages import release as release_pages
from lightning_bigmodel.offload.pinned import pinned_empty
from lightning_bigmodel.offload.stream import ALIGN, Layout
from lightning_bigmodel.offload.subclass import is_pinned, is_wrapped, map_inner, plain_parts


def _aligned(position: int) -> int:
    return -(-position // ALIGN) * ALIGN


def needs_staging(host: torch.Tensor) -> bool:
    """Whether the GPU must copy ``host`` through page-locked memory (pageable host memory: a disk view, plain RAM)."""
    return host.device.type == "cpu" and not is_pinned(host)


class Staging:
    """The reusable page-locked buffer of one prefetcher (one module in flight at a time, one thread)."""

    def __init__(self) -> None:
        self.buffer: Optional[torch.Tensor] = None
        self._layouts: dict[str, Layout] = {}  # by the hook's module name
        self._copied: Optional[torch.Event] = None
        self.stages = 0  # jobs staged (for tests and benchmarks)
        self.allocations = 0  # times the buffer was (re)allocated

    def stage(self, hook, indices: Sequence[int], release: bool) -> dict[int, torch.Tensor]:
        """Page-locked stand-ins for the host tensors of ``hook.entries`` at ``indices`` (views of the buffer), read
        from their files (``release``: their file ranges leave the page cache once read)."""
        hosts = {index: hook.entries[index].host for index in indices}
        layout = self._layouts.get(hook.name)
        if layout is None:
            names = {i: f"{hook.name}.{hook.entries[i].slots[0][1]}" for i in hosts}
            parts = [(names[i], part) for i, host in hosts.items() for part in plain_parts(host)]
            layout = self._layouts[hook.name] = Layout(parts)
        laid_out = layout.places
        rest = [p for h in hosts.values() for p in plain_parts(h) if needs_staging(p) and p.data_ptr() not in laid_out]
        if self._copied is not None:
            self._copied.synchronize()  # the GPU finished reading the last job's bytes from the buffer
        buffer = self._reserve(layout.nbytes + sum(_aligned(p.numel() * p.element_size()) for p in rest), hook.device)
        layout.read_into(buffer, release)
        if release:  # pages the views themselves mapped (a fetch without prefetch, e.g. the first forward) go too
            for host in hosts.values():
                for part in plain_parts(host):
                    if part.data_ptr() in laid_out:
                        release_pages(part)
        position = _aligned(layout.nbytes)
        self.stages += 1

        start = buffer.data_ptr()

        def place(part: torch.Tensor) -> torch.Tensor:
            nonlocal position
            if start <= part.data_ptr() < start + buffer.numel() or not needs_staging(part):
                return part  # read into the buffer above, or pinned / on a GPU already
            nbytes = part.numel() * part.element_size()
            view = buffer[position : position + nbytes].view(part.dtype).view(part.shape).copy_(part)
            position = _aligned(position + nbytes)
            return view

        out = {}
        for index, host in hosts.items():
            staged = layout.rebuild(buffer, host)
            out[index] = map_inner(staged, place) if is_wrapped(staged) else place(staged)
        return out

    def copied(self, event: torch.Event) -> None:
        """The event recorded after the GPU copies of the last staged job were issued."""
        self._copied = event

    def _reserve(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # the old one is unlocked and freed once no copy reads it (see `pinned`)
            self.buffer = pinned_empty(torch.Size([max(nbytes, 1)]), torch.uint8, device)
            self.allocations += 1
        return self.buffer

    def close(self) -> None:
        self.buffer, self._copied = None, None
        self._layouts.clear()
