"""Live bytes per device while code runs on fake tensors: a dispatch mode that counts storages as they are born and die.

torch ships a tracker of this kind (``torch.distributed._tools.mem_tracker.MemTracker``), but it is private, lives in
``torch.distributed`` (absent from some builds), rounds every block up to the CUDA allocator's granularity and keys
devices by ``torch.device``; the planner needs exact bytes keyed like a device map (``0``, ``"cpu"``, ``"disk"``),
weights placed by hand under a label of our choosing (disk), and a cheap current/peak per device. So this is ~60 lines
of our own on the public dispatch-mode API.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

Label = Union[int, str]  # a GPU index, "cpu" or "disk": the keys of a device map and of `max_memory`


def device_label(device: torch.device) -> Optional[Label]:
    """``cuda:k`` -> ``k``, ``cpu`` -> ``"cpu"``; ``None`` for devices that hold no real bytes (meta)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "meta":
        return None
    return device.index or 0  # any accelerator type: its index is the GPU of the device map


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every live storage per device label, and the peak of each count.

    A storage is counted once, when an op first returns a tensor on it (views and in-place results share it), and
    uncounted when it is freed: torch keeps one Python object per storage alive as long as the storage, so a weak
    reference to it fires exactly then. Weights placed before the run are added with :meth:`add`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current: dict[Label, int] = {}
        self.peak: dict[Label, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.recording = True  # when False, bytes are still counted but peaks are left alone

    @contextmanager
    def peaks_paused(self) -> Iterator[None]:
        """Count allocations and frees, but do not raise any peak (a shortcut to a state, not part of the run)."""
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def add(self, tensor: torch.Tensor, label: Optional[Label] = None) -> None:
        """Count ``tensor``'s storage under ``label`` (default: its device) unless it is counted already."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        label = device_label(tensor.device) if label is None else label
        if label is None:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, k=key, l=label, n=nbytes: self._free(k, l, n))
        now = self.current.get(label, 0) + nbytes
        self.current[label] = now
        if self.recording and now > self.peak.get(label, 0):
            self.peak[label] = now

    def _free(self, key: int, label: Label, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.current[label] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.add(leaf)
        return out

