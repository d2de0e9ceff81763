"""Page-locked host memory for weights kept in RAM: sized as asked, and given back to the OS when freed.

Why not ``pin_memory=True``: torch's pinned-memory allocator rounds every block up to a power of two (a 141 MB
matrix takes 256 MB of page-locked RAM, which can never be swapped out) and caches freed blocks for reuse, so
dropping a pinned tensor does not return its RAM. Offloaded weights live as long as the dispatch, so they get
their own memory: private anonymous memory mappings (advised for huge pages, see
:mod:`~lightning_bigmodel.offload._anonymous`) page-locked with ``cudaHostRegister`` (torch's allocator does the same
with its ``pinned_use_cuda_host_register`` option, but keeps the rounding and the cache). A tensor of at least
:data:`OWN_SLAB` bytes gets a mapping of its own (rounded up to a page); smaller ones share slabs of :data:`SLAB`
bytes. A mapping is unregistered and unmapped when the last tensor viewing it is freed, after the GPU work that may
still read it has finished.

Only CUDA (and ROCm, whose ``cudart`` carries the same names) registers memory; on other accelerators
:func:`pinned_empty` falls back to ``pin_memory=True``. Bytes page-locked here: :func:`pinned_bytes`.
"""

from __future__ import annotations

import mmap
import threading
from typing import Optional

import torch

from lightning_bigmodel.offload._anonymous import huge_page_map

PAGE = mmap.PAGESIZE
ALIGN = 512  # start of every tensor inside a shared slab (more than any dtype or vectorised copy needs)
OWN_SLAB = 2**22  # 4 MiB: tensors this large get a mapping of their own
SLAB = 2**25  # 32 MiB: shared by smaller tensors
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context, not only the current one

# `_lock` guards `_filling` only, and nothing is ever freed while it is held: a slab's destructor may run wherever
# its last view dies (also inside a garbage collection that starts while the lock is held), so it takes no lock;
# code holding the lock swaps references out and drops them after releasing it.
_lock = threading.Lock()
_registered: dict[int, int] = {}  # id(slab) -> bytes, for each page-locked slab alive (dict set/pop: atomic)
_filling: dict[int, tuple[torch.Tensor, int]] = {}  # GPU index -> (shared slab being filled, next free offset)


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


def pinned_footprint(nbytes: int) -> int:
    """Page-locked bytes a tensor of ``nbytes`` takes here: its own mapping, or its aligned share of a slab."""
    return _round_up(nbytes, PAGE) if nbytes >= OWN_SLAB else _round_up(nbytes, ALIGN)


def pinned_bytes() -> int:
    """Bytes page-locked by this module and not given back yet."""
    return sum(list(_registered.values()))


class PinnedMemoryError(RuntimeError):
    """The driver refused to page-lock host memory for offloaded weights."""


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error of this thread (``cudaGetLastError``), which a failed call leaves behind:
    the next kernel launched on the thread would raise it. torch binds no ``cudaGetLastError``, so it is called in the
    runtime library torch loaded (found among the process's mappings: the same instance, hence the same state)."""
    import ctypes  # noqa: PLC0415

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line or "libamdhip64.so" in line}
    except OSError:
        return
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        (library.cudaGetLastError if hasattr(library, "cudaGetLastError") else library.hipGetLastError)()


def _locked_memory_limit() -> str:
    import resource  # noqa: PLC0415

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


def _register(address: int, nbytes: int, device: int) -> None:
    """Page-lock ``[address, address + nbytes)`` from the context of GPU ``device`` (no context on another GPU).

    Raises:
        PinnedMemoryError: the driver refused; the runtime's error state is cleared first.
    """
    with torch.cuda.device(device):
        status = torch.cuda.cudart().cudaHostRegister(address, nbytes, _HOST_REGISTER_PORTABLE)
        if status == torch.cuda.cudart().cudaError.success:
            return
        _clear_last_cuda_error()
    name = torch.cuda.cudart().cudaGetErrorString(status)
    raise PinnedMemoryError(
        f"Could not page-lock {nbytes} bytes ({nbytes / 2**30:.2f} GiB) of RAM for offloaded weights feeding GPU "
        f"{device}: cudaHostRegister failed ({name}). Likely causes: the locked-memory limit of this process "
        f"(`ulimit -l`, now {_locked_memory_limit()}) or the memory limit of its container or cgroup. Raise that "
        "limit, or give less to 'cpu' in `max_memory` so that more weights go to disk."
    )


def _unregister(address: int, device: int) -> None:
    """Wait until GPU ``device`` no longer reads the range (copies are issued there), then unlock it."""
    with torch.cuda.device(device):
        torch.cuda.synchronize()
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(address))


class _Slab(mmap.mmap):
    """An anonymous mapping, page-locked while any tensor views it; unlocked and unmapped with the last view."""

    device = 0
    address = 0
    registered = False

    def lock(self, device: int) -> torch.Tensor:
        view = torch.frombuffer(self, dtype=torch.uint8)  # holds a reference to the mapping: it lives as long
        self.device, self.address = device, view.data_ptr()
        _register(self.address, len(self), device)
        self.registered = True
        _registered[id(self)] = len(self)
        return view

    def __del__(self) -> None:  # takes no lock: it may run under `_lock` (see there)
        if not self.registered:
            return
        self.registered = False
        _registered.pop(id(self), None)
        try:
            _unregister(self.address, self.device)
        except Exception:  # noqa: BLE001 - interpreter shutdown or a dead context: the pages go with the process
            pass


def _new_slab(nbytes: int, device: int) -> torch.Tensor:
    return huge_page_map(_round_up(max(nbytes, 1), PAGE), _Slab).lock(device)  # huge pages: see _anonymous


def _carve(nbytes: int, device: int) -> torch.Tensor:
    """``nbytes`` of page-locked memory as a uint8 tensor: its own mapping, or the next piece of a shared slab."""
    if nbytes >= OWN_SLAB:
        return _new_slab(nbytes, device)[:nbytes]
    with _lock:
        slab, offset = _filling.get(device, (None, 0))
        if slab is not None and offset + nbytes <= slab.numel():
            _filling[device] = (slab, _round_up(offset + nbytes, ALIGN))
            return slab[offset : offset + nbytes]
    del slab  # outside the lock: it may be the last reference to a full slab
    slab = _new_slab(SLAB, device)
    with _lock:
        full = _filling.get(device)
        _filling[device] = (slab, _round_up(nbytes, ALIGN))
    del full  # the slab it replaced is freed here, after the lock, with its last tensor
    return slab[:nbytes]


def uses_registered_memory(device: torch.device) -> bool:
    """Whether pinned copies for ``device`` are made here (a CUDA device with a runtime that registers memory)."""
    return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch.cuda.cudart(), "cudaHostRegister")


def pinned_empty(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised page-locked CPU tensor that feeds GPU ``device`` (``pin_memory=True`` on another accelerator;
    not page-locked when ``device`` is the CPU).

    Raises:
        PinnedMemoryError: the driver refused to page-lock the memory (locked-memory limit, too little RAM left).
    """
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes == 0 or not uses_registered_memory(device):
        return torch.empty(shape, dtype=dtype, pin_memory=nbytes > 0 and device.type != "cpu")
    return _carve(nbytes, device.index or 0).view(dtype).view(shape)


def pinned_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A page-locked CPU copy of ``tensor`` that feeds GPU ``device`` (see :func:`pinned_empty`)."""
    return pinned_empty(tensor.shape, tensor.dtype, device).copy_(tensor)


def close_shared_slabs() -> None:
    """Stop filling the current shared slabs: each is then freed with the last tensor in it (call after a release)."""
    with _lock:
        filling = dict(_filling)
        _filling.clear()
    filling.clear()  # after the lock: the last reference to a slab runs its destructor here


def give_back_host_memory(device: Optional[torch.device] = None) -> None:
    """After a release: stop filling the shared slabs (each is unmapped with its last tensor), and from the context of
    GPU ``device`` (the released model's execution device; no context is created on another GPU) return to the driver
    the GPU memory the caching allocator keeps for the freed weights (a plan made next asks the driver what is free,
    and would count it as used) and the pinned blocks torch's caching host allocator keeps. Never initialises the
    accelerator."""
    close_shared_slabs()
    if device is None or device.type in ("cpu", "meta"):
        return
    module = torch.get_device_module(device.type)
    if not (module.is_available() and getattr(module, "is_initialized", lambda: False)()):
        return
    with module.device(device):
        module.empty_cache()  # only blocks no tensor uses are returned
        empty_host = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds (`torch.accelerator.empty_host_cache`
        if device.type == "cuda" and empty_host is not None:  # asks whichever accelerator is current)
            empty_host()
