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
