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
