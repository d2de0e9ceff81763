"""The stream's large read buffers: private anonymous memory advised for transparent huge pages (an ``O_DIRECT`` read
into 4 KiB pages is split into small device requests), never mistaken for a view of a file, unmapped with their last
view, and read into with outputs equal to the plain model."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.offload import _anonymous, attach, pages
from lightning_bigmodel.offload.readahead import ReadAhead
from lightning_bigmodel.offload.stream import DIRECT, aligned_empty

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")
THP = Path("/sys/kernel/mm/transparent_hugepage")
CONFIG = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=384)  # 7 MB per block


def _mapping_of(address: int) -> tuple[str, set[str]]:
    """``(permissions, VmFlags)`` of the memory map of this process holding ``address``."""
    perms, inside = "", False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            inside, perms = start <= address < end, head[1]
        elif inside and line.startswith("VmFlags:"):
            return perms, set(head[1:])
    raise AssertionError(f"no memory map holds {address:#x}")


def _huge_pages_advisable() -> bool:
    return THP.is_dir() and "[never]" not in (THP / "enabled").read_text()


def test_a_large_read_buffer_is_private_memory_advised_for_huge_pages_and_no_file_view():
    buffer = aligned_empty(4 * 2**20 + 100)
    assert buffer.data_ptr() % DIRECT == 0 and buffer.numel() == 4 * 2**20 + 100
    perms, flags = _mapping_of(buffer.data_ptr())
    assert perms.endswith("p"), perms  # private: shared anonymous memory is shmem, with its own huge-page setting
    if _huge_pages_advisable():
        assert "hg" in flags, flags  # MADV_HUGEPAGE
    view = buffer[DIRECT : 2 * DIRECT].view(torch.float32)
    assert not pages.is_file_backed(buffer) and not pages.is_file_backed(view)
    small = aligned_empty(2**20)  # below a huge page: a plain allocation, as before
    assert small.data_ptr() % DIRECT == 0 and small.untyped_storage().resizable()


def test_a_file_view_is_still_a_file_view_beside_the_buffers(tmp_path):
    import mmap

    keep = aligned_empty(4 * 2**20)
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 64)
    with open(tmp_path / "blob", "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = torch.frombuffer(mapping, dtype=torch.uint8)[100:200]
    assert pages.is_file_backed(view)
    assert not pages.is_file_backed(keep) and keep.untyped_storage().data_ptr() in _anonymous._alive


def test_a_buffer_is_unmapped_and_forgotten_with_its_last_view():
    before = len(_anonymous._alive)
    buffer = aligned_empty(3 * 2**20)
    address = buffer.untyped_storage().data_ptr()
    view = buffer[2**20 :]
    del buffer
    gc.collect()
    assert address in _anonymous._alive  # the view keeps the map
    _mapping_of(address)
    del view
    gc.collect()
    assert address not in _anonymous._alive and len(_anonymous._alive) == before
    with pytest.raises(AssertionError, match="no memory map"):
        _mapping_of(address)


def test_pinned_slabs_are_private_memory_advised_for_huge_pages(monkeypatch):
    from lightning_bigmodel.offload import pinned

    registered = []
    monkeypatch.setattr(pinned, "_register", lambda address, nbytes, device: registered.append((address, nbytes)))
    monkeypatch.setattr(pinned, "_unregister", lambda address, device: None)
    slab = pinned._new_slab(pinned.OWN_SLAB, 0)
    assert registered == [(slab.data_ptr(), pinned.OWN_SLAB)]
    perms, flags = _mapping_of(slab.data_ptr())
    assert perms.endswith("p"), perms
    if _huge_pages_advisable():
        assert "hg" in flags, flags


def _direct_supported(folder: Path) -> bool:
    import os

    try:
        os.close(os.open(folder / "model.safetensors", os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_units_over_a_huge_page_stream_into_huge_page_buffers_with_outputs_equal_to_plain(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = GPT(CONFIG).eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"pad": "x" * 13})  # data not 64-byte aligned
    if not _direct_supported(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: True)
    with init_empty_weights():
        model = GPT(CONFIG)
    model = load_checkpoint_and_dispatch(model, tmp_path / "model.safetensors", device_map={"": "disk"}).eval()
    streamer = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(streamer, ReadAhead) and streamer.release
    streamer.keep = False  # every unit streams
    seen: dict[str, tuple[bool, bool]] = {}

    def check(name):
        def hook(module, _):  # after the stream installed the unit's weights
            weight = next(module.parameters(recurse=False))
            seen[name] = (_anonymous.is_anonymous_buffer(weight), pages.is_file_backed(weight))
        return hook

    blocks = [name for name in streamer._units if name.startswith("transformer.h.")]
    assert len(blocks) == 12 and max(streamer._units[name].layout.nbytes for name in blocks) > _anonymous.HUGE_PAGE
    for name in blocks:
        model.get_submodule(name).register_forward_pre_hook(check(name))
    x = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    streamer.close()
    assert streamer.pool.slot_bytes > _anonymous.HUGE_PAGE  # the largest unit (mlp.c_fc, 2.4 MB) sizes the buffers
    assert seen == {name: (True, False) for name in blocks}
    assert all(streamer._units[name].layout.direct_reads >= 3 for name in blocks)


def test_a_late_record_drop_keeps_a_newer_buffer_at_the_same_address():
    """The old map's finalizer may run after a new buffer was mapped at its address (unmapping releases the GIL):
    the new buffer stays recorded, so it is still no file view."""
    buffer = aligned_empty(2 * 2**20)
    address = buffer.untyped_storage().data_ptr()
    _anonymous._forget(address, object())  # a stale token: another, older map at this address
    assert _anonymous.is_anonymous_buffer(buffer) and not pages.is_file_backed(buffer)
