"""Page-locked slabs for weights kept in RAM, with a counting stand-in for ``cudaHostRegister``/``Unregister``."""

from __future__ import annotations

import gc

import pytest
import torch

import lightning_bigmodel.offload.pinned as pinned

GPU = torch.device("cuda", 1)


@pytest.fixture
def registrar(monkeypatch):
    """Every register/unregister call, as the driver would see it; live ranges must never overlap."""
    log = {"register": [], "unregister": [], "live": {}}

    def register(address, nbytes, device):
        assert address % pinned.PAGE == 0 and nbytes % pinned.PAGE == 0  # whole pages: no page shared with others
        assert all(address + nbytes <= a or a + n <= address for a, n in log["live"].items())
        log["register"].append((address, nbytes, device))
        log["live"][address] = nbytes

    def unregister(address, device):
        log["unregister"].append((address, device))
        del log["live"][address]

    monkeypatch.setattr(pinned, "uses_registered_memory", lambda device: True)
    monkeypatch.setattr(pinned, "_register", register)
    monkeypatch.setattr(pinned, "_unregister", unregister)
    pinned.close_shared_slabs()
    yield log
    pinned.close_shared_slabs()
    gc.collect()


def test_a_large_tensor_takes_its_size_not_the_next_power_of_two(registrar):
    source = torch.randn(3, 2**20 + 7)  # 12.6 MB: torch's pinned allocator would take 16 MiB
    before = pinned.pinned_bytes()
    copy = pinned.pinned_copy(source, GPU)
    assert torch.equal(copy, source) and copy.dtype == source.dtype and copy.shape == source.shape
    nbytes = source.numel() * 4
    ((_, registered, device),) = registrar["register"]
    assert registered == pinned.pinned_footprint(nbytes) < nbytes + pinned.PAGE and device == 1
    assert registered < 2 ** (nbytes - 1).bit_length()  # the power of two the caching allocator would use
    assert pinned.pinned_bytes() - before == registered
    del copy
    gc.collect()
    assert registrar["unregister"] == [(registrar["register"][0][0], 1)]  # freed with its last view, to the OS
    assert pinned.pinned_bytes() == before


def test_small_tensors_share_a_slab_aligned(registrar):
    tensors = [pinned.pinned_copy(torch.full((n,), float(n), dtype=torch.float16), GPU) for n in (3, 1000, 77)]
    assert len(registrar["register"]) == 1 and registrar["register"][0][1] == pinned.SLAB
    assert all(t.data_ptr() % pinned.ALIGN == 0 for t in tensors)
    assert [t[0].item() for t in tensors] == [3.0, 1000.0, 77.0] and [t.numel() for t in tensors] == [3, 1000, 77]
    pinned.close_shared_slabs()
    del tensors[:2]
    gc.collect()
    assert registrar["unregister"] == []  # one tensor still views the slab
    tensors.clear()
    gc.collect()
    assert len(registrar["unregister"]) == 1


def test_off_cuda_falls_back_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(pinned, "_carve", lambda *a: calls.append(a))
    plain = pinned.pinned_empty((2, 3), torch.float32, torch.device("cpu"))  # a CPU execution device: no pinning
    assert plain.shape == (2, 3) and not plain.is_pinned() and calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the rest of the process")
def test_dispatching_a_model_in_ram_pins_it_without_holding_it_twice_and_release_gives_it_back(registrar, monkeypatch):
    import weakref

    import lightning_bigmodel.dispatch as dispatch
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.pl.loader import release
    from lightning_bigmodel.simulate import simulated_gpus
    from models import UntiedMLP, example_input, make_reference

    x = example_input(UntiedMLP)
    with torch.no_grad():
        expected = make_reference(UntiedMLP)(x)
    originals, alive_at_copy = [], []
    real_to_host = dispatch.to_host

    def to_host(tensor, pin):  # counts the originals still alive each time one more is copied
        alive_at_copy.append(sum(ref() is not None for ref in originals))
        originals.append(weakref.ref(tensor))
        return real_to_host(tensor, pin)

    monkeypatch.setattr(dispatch, "to_host", to_host)
    before = pinned.pinned_bytes()
    with simulated_gpus(1), torch.no_grad():
        model = make_reference(UntiedMLP)
        host = {"blocks", "out"}
        nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.split(".")[0] in host)
        dispatch_model(model, {"inp": 0, "blocks": "cpu", "out": "cpu"})
        assert len(originals) == sum(1 for n, _ in model.named_parameters() if n.split(".")[0] in host)
        assert alive_at_copy == [0] * len(originals)  # each original was freed once its pinned copy was in place
        assert pinned.pinned_bytes() - before == pinned.SLAB >= nbytes  # small tensors: one shared slab
        torch.testing.assert_close(model(x), expected)
        release(model)
    gc.collect()
    assert pinned.pinned_bytes() == before and registrar["live"] == {}  # unregistered and unmapped


# A stand-in for cudaHostRegister/Unregister that counts the live ranges (the `registrar` fixture, for a subprocess).
_COUNTING_REGISTRAR = """
import lightning_bigmodel.offload.pinned as pinned
live = {}
pinned.uses_registered_memory = lambda device: True
pinned._register = lambda address, nbytes, device: live.__setitem__(address, nbytes)
pinned._unregister = lambda address, device: live.pop(address)
"""

_RELEASE_WITHOUT_FORWARD = _COUNTING_REGISTRAR + """
import torch
from torch import nn
from lightning_bigmodel import dispatch_model
from lightning_bigmodel.pl.loader import release
from lightning_bigmodel.simulate import simulated_gpus

with simulated_gpus(1), torch.no_grad():
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)])
    dispatch_model(model, {"0": "cpu", "1": "cpu", "2": "cpu", "3": "cpu", "4": 0})
    assert pinned.pinned_bytes() == pinned.SLAB and len(live) == 1  # the four RAM layers share one slab
    release(model)  # no forward: the shared slab's last reference is the one `close_shared_slabs` drops
    assert pinned.pinned_bytes() == 0 and live == {}, (pinned.pinned_bytes(), live)
print("released")
"""


def test_releasing_the_last_tensor_of_a_shared_slab_does_not_deadlock():
    """The slab's destructor runs where its last reference goes: it used to take the module lock that
    `close_shared_slabs` held while dropping that reference, and `release` hung for ever. Run in a process of its own
    (a hang fails at the timeout instead of hanging the suite; the simulated GPUs need a CUDA-free process)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RELEASE_WITHOUT_FORWARD], capture_output=True, text=True, timeout=120, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("`release` of a model whose RAM weights share one pinned slab hung (deadlock on the slab lock)")
    assert done.returncode == 0 and done.stdout.strip() == "released", done.stderr[-3000:]


def test_no_slab_is_freed_while_the_lock_is_held(registrar, monkeypatch):
    """Filling a new slab drops the full one, and closing drops the current ones: outside the lock."""
    held_at_free = []
    real_del = pinned._Slab.__del__

    def spy(self):
        held_at_free.append(pinned._lock.locked())
        if not held_at_free[-1]:  # under the lock the real destructor would hang this test (it took the lock)
            real_del(self)

    monkeypatch.setattr(pinned._Slab, "__del__", spy)
    piece = pinned.OWN_SLAB - pinned.ALIGN  # shared, and eight of them fill a slab but for 4096 bytes
    pieces = [pinned.pinned_empty((piece,), torch.uint8, GPU) for _ in range(pinned.SLAB // pinned.OWN_SLAB)]
    assert len(registrar["register"]) == 1
    del pieces  # the first slab is now referenced by the module's "slab being filled" only
    last = pinned.pinned_empty((8192,), torch.uint8, GPU)  # does not fit: a new slab replaces the full one
    assert held_at_free == [False], "the full slab was freed while the lock was held"
    assert len(registrar["register"]) == 2 and len(registrar["live"]) == 1
    pinned.close_shared_slabs()
    del last
    assert held_at_free == [False, False] and registrar["live"] == {}


def test_release_unlocks_pinned_ram_without_the_garbage_collector(registrar):
    """The weight hooks and the prefetcher refer to each other; `release` must not leave it to a garbage collection
    to free their host tensors (page-locked RAM that the OS cannot reclaim)."""
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.pl.loader import release
    from lightning_bigmodel.simulate import simulated_gpus

    if torch.cuda.is_available():
        pytest.skip("the simulated GPUs need a CUDA-free process (the subprocess twin above runs there)")
    before = pinned.pinned_bytes()
    gc.collect()
    gc.disable()
    try:
        with simulated_gpus(1), torch.no_grad():
            model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(5)])
            dispatch_model(model, {"0": "cpu", "1": "cpu", "2": "cpu", "3": "cpu", "4": 0})
            for _ in range(2):  # the second forward prefetches: the prefetcher knows every weight hook
                model(torch.randn(2, 16))
            assert pinned.pinned_bytes() - before == pinned.SLAB
            release(model)
            assert pinned.pinned_bytes() == before and registrar["live"] == {}
    finally:
        gc.enable()


class _RefusingRuntime:
    """`torch.cuda.cudart()` of a driver that refuses to page-lock (as under a locked-memory or container limit)."""

    class cudaError:  # noqa: N801 (the runtime's name)
        success = 0

    OUT_OF_MEMORY = 2

    def cudaHostRegister(self, address, nbytes, flags):  # noqa: N802
        return self.OUT_OF_MEMORY

    def cudaGetErrorString(self, status):  # noqa: N802
        return "out of memory"


def test_a_refused_page_lock_clears_the_cuda_error_and_says_why(monkeypatch):
    """The runtime keeps a failed call's error as the thread's last error, which the next kernel would raise: it is
    cleared, and the error raised names the size and the likely causes. Nothing stays registered or counted."""
    import contextlib

    cleared = []
    monkeypatch.setattr(pinned, "uses_registered_memory", lambda device: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _RefusingRuntime())
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(pinned, "_clear_last_cuda_error", lambda: cleared.append(True))
    before = pinned.pinned_bytes()
    nbytes = 3 * pinned.OWN_SLAB
    with pytest.raises(pinned.PinnedMemoryError, match=rf"page-lock {nbytes} bytes \(0.01 GiB\).*GPU 1.*out of memory.*"
                       r"`ulimit -l`, now .*container"):  # fmt: skip
        pinned.pinned_empty((nbytes,), torch.uint8, GPU)
    assert cleared == [True] and pinned.pinned_bytes() == before


def test_clearing_the_last_cuda_error_without_a_cuda_runtime_does_nothing():
    pinned._clear_last_cuda_error()  # no libcudart mapped in a CPU-only process: returns quietly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_refused_cuda_host_register_leaves_no_error_for_the_next_kernel(tmp_path):
    """Registering a range twice is refused (cudaErrorHostMemoryAlreadyRegistered): our error, then kernels still run.
    In a fresh process: an uncleared error would break whatever CUDA work came next in this one."""
    from cuda_contexts import run_and_list_contexts

    body = """
    import torch
    import lightning_bigmodel.offload.pinned as pinned

    gpu = torch.device("cuda", 0)
    held = pinned.pinned_empty((pinned.OWN_SLAB,), torch.uint8, gpu)
    try:
        pinned._register(held.data_ptr(), pinned.OWN_SLAB, 0)
    except pinned.PinnedMemoryError as err:
        refused = str(err)
    x = torch.ones(1024, device=gpu)
    result = [refused, (x * 2).sum().item()]  # a kernel launch, then a sync: the old error would surface here
    """
    out = run_and_list_contexts(body, tmp_path)
    refused, total = out["result"]
    assert "cudaHostRegister failed" in refused and total == 2048.0


def test_release_returns_the_gpu_memory_the_allocator_cached_for_the_freed_weights(registrar, monkeypatch):
    """A plan made after a release asks the driver what is free: the caching allocator's blocks of the freed weights
    must go back first (`empty_cache` on the released model's device, from its context)."""
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.pl.loader import release
    from lightning_bigmodel.simulate import simulated_gpus
    from lightning_bigmodel.simulate._standins import SimulatedDeviceModule
    from lightning_bigmodel.simulate._runtime import current_device_index

    emptied = []
    record = staticmethod(lambda: emptied.append(current_device_index()))
    monkeypatch.setattr(SimulatedDeviceModule, "empty_cache", record)
    with simulated_gpus(2), torch.no_grad():
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
        dispatch_model(model, {"0": 1, "1": "cpu", "2": 1})
        model(torch.randn(2, 16))
        assert emptied == []
        release(model)
        assert emptied == [1]  # GPU 1, the execution device: no other GPU's context is touched
