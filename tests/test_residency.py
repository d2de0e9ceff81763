"""CPU-placed weights stay resident (locked file pages or anonymous memory); disk weights stream ahead and are released.

Residency is checked with ``mincore`` after evicting the checkpoint's page cache (``POSIX_FADV_DONTNEED``): pages
that are merely cached go, locked or anonymous ones stay.
"""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.offload import attach, pages, readahead
from lightning_bigmodel.offload.placement import is_disk
from lightning_bigmodel.offload.readahead import ReadAhead
from lightning_bigmodel.planning import budget as budget_module
from lightning_bigmodel.planning.budget import READ_AHEAD_LAYERS, detect_cpu_memory
from lightning_bigmodel.planning.device_map import infer_device_map
from lightning_bigmodel.planning.sizes import compute_module_sizes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/madvise/mlock2 are Linux calls")

CONFIG = GPTConfig(vocab_size=512, block_size=32, n_layer=4, n_head=4, n_embd=256)  # 4 blocks of 3 MiB


def _evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache where nothing pins them (locked pages stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _reclaim(tensors, path: Path) -> None:
    """What memory pressure does: ask the kernel to reclaim the tensors' pages (``MADV_PAGEOUT``, refused for locked
    ones), then drop the file's unmapped cache."""
    for tensor in tensors:
        pages._madvise(tensor, pages._MADV_PAGEOUT)
    _evict(path)


def _require_eviction(view: torch.Tensor, path: Path) -> None:
    """Skip unless reclaiming really drops the pages of ``view`` (an unlocked view): the checks need it."""
    view.sum()
    _reclaim([view], path)
    if pages.resident_fraction(view) > 0.5:
        pytest.skip(f"pages of {path.parent} cannot be reclaimed on demand here (MADV_PAGEOUT needs Linux 5.4; tmpfs?)")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    _evict(tmp_path / "model.safetensors")  # written back: clean pages, as for any checkpoint read from disk
    return model, tmp_path / "model.safetensors"


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _file_view(tmp_path: Path, nbytes: int = 64 * pages.PAGE) -> torch.Tensor:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(nbytes))
    _evict(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mapping, dtype=torch.uint8), path


def test_keep_resident_locks_a_view_in_place_so_eviction_leaves_it(tmp_path):
    view, path = _file_view(tmp_path, 16 * 2**20)
    _require_eviction(view, path)
    assert pages.is_file_backed(view) and not pages.is_file_backed(torch.ones(4))
    before = _status("VmLck")
    kept = pages.keep_resident(view)
    assert kept is view  # locked in place: no copy
    assert pages.resident_fraction(kept) < 0.5  # locking read nothing
    anonymous = _status("RssAnon")
    kept.sum()  # the first use faults the pages in, and locks them
    assert _status("VmLck") - before >= kept.numel() and _status("RssAnon") - anonymous < kept.numel() // 2
    _reclaim([kept], path)
    assert pages.resident_fraction(kept) == 1.0


def test_keep_resident_copies_when_locking_is_refused(tmp_path, monkeypatch):
    view, _ = _file_view(tmp_path)
    monkeypatch.setattr(pages, "lock_pages", lambda tensor: False)
    kept = pages.keep_resident(view)
    assert kept is not view and not pages.is_file_backed(kept) and torch.equal(kept, view)


def test_populate_reads_and_release_drops_pages(tmp_path):
    view, path = _file_view(tmp_path)
    _require_eviction(view, path)
    assert pages.populate(view) and pages.resident_fraction(view) == 1.0
    if not pages.release(view):
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux 5.4+)")
    for _ in range(3):  # page-out is advice: the kernel skips pages it is busy with (seen once in a full run)
        if pages.resident_fraction(view) < 0.1:
            break
        pages.release(view)
    assert pages.resident_fraction(view) < 0.1


@pytest.fixture(autouse=True)
def release_after_use(monkeypatch):
    """These models are tiny: make the streamer release pages as it does when disk weights exceed the memory left."""
    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: True)


def test_pages_are_released_only_when_disk_weights_do_not_fit(monkeypatch):
    free = detect_cpu_memory().free
    assert not readahead.should_release(free // 4) and readahead.should_release(free)


def _load(path: Path, max_memory):
    with init_empty_weights():
        model = GPT(CONFIG)
    return load_checkpoint_and_dispatch(
        model, path, device_map="auto", max_memory=max_memory, no_split_module_classes=["Block"]
    ).eval()


def _disk_and_cpu(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = {id(p): p for p in model.parameters()}.values()
    disk = [p for p in params if is_disk(p)]
    return disk, [p for p in params if not is_disk(p)]


def test_cpu_weights_stay_resident_and_disk_weights_stream(checkpoint):
    reference, path = checkpoint
    block = compute_module_sizes(reference)["transformer.h.0"]
    model = _load(path, {"cpu": compute_module_sizes(reference)[""] // 2 + (1 + READ_AHEAD_LAYERS) * block})
    disk, cpu = _disk_and_cpu(model)
    assert disk and cpu, model.hf_device_map
    x = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):  # the first forward learns the order; later ones read ahead
            torch.testing.assert_close(model(x), expected)
    model.__dict__["_bigmodel_dispatch"].prefetcher.close()  # wait for the releases in flight
    resident = {id(p): pages.resident_fraction(p) for p in [*disk, *cpu]}
    _reclaim(cpu, path)
    assert [pages.resident_fraction(p) for p in cpu] == [1.0] * len(cpu)  # after warm-up: locked, not reclaimed
    # Disk weights were released after use, except the first disk block: read ahead for the next forward.
    first = model.get_submodule(next(k for k, v in model.hf_device_map.items() if v == "disk"))
    ahead = {id(p) for p in first.parameters()}
    left = sum(resident[id(p)] * p.numel() * p.element_size() for p in disk if id(p) not in ahead)
    assert left <= 0.05 * sum(p.numel() * p.element_size() for p in disk), left


def test_read_ahead_reads_each_block_before_it_runs_and_keeps_the_window_bounded(checkpoint):
    reference, path = checkpoint
    model = _load(path, {"cpu": 1})  # everything on disk
    streamer = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(streamer, ReadAhead)
    units = dict(streamer._tensors)
    largest = max(sum(t.numel() * t.element_size() for t in tensors) for tensors in units.values())
    events: list[tuple[str, str]] = []
    submit, before = streamer._submit, streamer.before
    streamer._submit = lambda fn, name: (events.append((fn.__name__, name)), submit(fn, name))[1]
    release = streamer._release
    streamer._release = lambda tensors: (events.append(("_release", "")), release(tensors))[1]
    streamer.before = lambda name: (events.append(("before", name)), before(name))[1]
    others: list[tuple[str, float]] = []

    def probe(name):
        def hook(*_):  # runs after the read-ahead hook: `name` computes next
            resident = sum(
                pages.resident_fraction(t) * t.numel() * t.element_size()
                for other, tensors in units.items() if other != name for t in tensors
            )  # fmt: skip
            others.append((name, resident / largest))

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(probe(name)) for name in units]
    x = torch.randint(0, CONFIG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):
            _evict(path)
            torch.testing.assert_close(model(x), expected)
    for handle in handles:
        handle.remove()
    blocks = [name for name in units if ".h." in name]  # the layers of the blocks
    first_forward_end = min(i for i, (kind, name) in enumerate(events) if kind == "before" and name == blocks[-1])
    for name in blocks:  # after the first forward, each layer's read was submitted before its hook ran
        calls = [i for i, event in enumerate(events) if event == ("before", name) and i > first_forward_end]
        assert len(calls) == 2
        for previous, call in zip([first_forward_end, *calls], calls):
            assert ("_read", name) in events[previous:call], (name, events[previous:call])
    assert [kind for kind, _ in events].count("_release") >= 3 * len(blocks)
    window = [share for name, share in others[len(units) :] if name in blocks]
    # At most `depth` units beside the current one, plus what is never released: pages shared with neighbours and
    # tensors smaller than a page (biases, norms). Without releases this would be every unit (about 13 here).
    assert window and max(window) <= READ_AHEAD_LAYERS + 0.5, others


def test_planner_reserves_the_stream_window_on_cpu_for_a_detected_budget(monkeypatch):
    with torch.device("meta"):
        model = GPT(CONFIG)
    sizes = compute_module_sizes(model)
    budget, block = sizes[""] // 2 + 2 * sizes["transformer.h.0"], sizes["transformer.h.0"]  # a block is the largest

    def on_cpu(device_map):
        assert "disk" in device_map.values()
        return sum(sizes.get(name, 0) for name, device in device_map.items() if device == "cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(budget_module, "_available_cpu_memory", lambda: budget)  # what detection finds
    detected = on_cpu(infer_device_map(model, no_split_module_classes=["Block"]))
    assert 0 < detected and detected + (1 + READ_AHEAD_LAYERS) * block <= budget
    # A given CPU budget is for resident weights: the stream comes on top of it.
    given = on_cpu(infer_device_map(model, max_memory={"cpu": budget}, no_split_module_classes=["Block"]))
    assert detected < given <= budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: disk weights staged into pinned memory")
def test_gpu_prefetch_releases_staged_disk_pages_when_memory_is_short(checkpoint):
    reference, path = checkpoint
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h": "disk", "transformer.ln_f": 0, "lm_head": 0}
    with init_empty_weights():
        model = GPT(CONFIG)
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map).eval()
    assert model.__dict__["_bigmodel_dispatch"].prefetcher.release_disk  # `should_release` is patched to say so
    x = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):
            torch.testing.assert_close(model(x.cuda()).cpu(), expected)
    model.__dict__["_bigmodel_dispatch"].prefetcher.close()
    disk, _ = _disk_and_cpu(model)
    nbytes = sum(p.numel() * p.element_size() for p in disk)
    assert sum(pages.resident_fraction(p) * p.numel() * p.element_size() for p in disk) <= 0.5 * nbytes
