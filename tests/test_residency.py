"""CPU-placed weights stay resident (locked file pages or anonymous memory); disk weights stream ahead and are released.

Residency is checked with ``mincore`` after evicting the checkpoint's page cache (``POSIX_FADV_DONTNEED``): pages
that are merely cached go, locked or anonymous ones stay.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.gpt import GPT, GPTConfig
from gpu_expectations import gpu_tolerance
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.offload import attach, pages, readahead, resident
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


def _can_lock(nbytes: int) -> bool:
    """Whether this process may lock ``nbytes`` more: ``CAP_IPC_LOCK`` (root usually has it), or room under
    ``RLIMIT_MEMLOCK`` (8 MiB by default for other users and in containers without the capability)."""
    import resource

    capabilities = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                            if line.startswith("CapEff:")), 16)  # fmt: skip
    if capabilities >> 14 & 1:  # CAP_IPC_LOCK
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return soft == resource.RLIM_INFINITY or _status("VmLck") + nbytes <= soft


def test_keep_resident_locks_a_view_in_place_so_eviction_leaves_it(tmp_path):
    view, path = _file_view(tmp_path, 16 * 2**20)
    _require_eviction(view, path)
    assert pages.is_file_backed(view) and not pages.is_file_backed(torch.ones(4))
    lockable = _can_lock(view.numel())
    before = _status("VmLck")
    kept = pages.keep_resident(view)
    if not lockable:  # no CAP_IPC_LOCK and a small RLIMIT_MEMLOCK: an anonymous copy instead, which stays too
        assert kept is not view and not pages.is_file_backed(kept) and torch.equal(kept, view)
        _reclaim([view], path)
        assert pages.resident_fraction(kept) == 1.0
        return
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
    if _can_lock(sum(p.numel() * p.element_size() for p in cpu)):  # else loading copied them (`keep_resident`)
        assert all(pages.is_file_backed(p) for p in cpu if p.numel())  # loading read nothing: zero-copy views
    x = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):  # the first forward learns the order; later ones read ahead
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.__dict__["_bigmodel_dispatch"].prefetcher.close()
    disk, cpu = _disk_and_cpu(model)
    # The first forward replaced the cpu views by copies read with pread: they no longer depend on the file.
    assert not any(pages.is_file_backed(p) for p in cpu)
    _reclaim(cpu, path)
    assert [pages.resident_fraction(p) for p in cpu] == [1.0] * len(cpu)  # anonymous memory: never evicted
    # Disk weights were read into the stream's buffers, never through their maps: the page cache dropped them.
    nbytes = sum(p.numel() * p.element_size() for p in disk)
    cached = sum(pages.resident_fraction(p) * p.numel() * p.element_size() for p in disk)
    assert cached <= 0.05 * nbytes, cached / nbytes


class _Probe:
    """Counts, per unit, the reads started (and by which thread) and the uses; a test can wait for a read."""

    def __init__(self, streamer: ReadAhead) -> None:
        self.events: list[tuple[str, str]] = []
        self.reads = {name: 0 for name in streamer._units}
        self.uses = dict(self.reads)
        self.changed = threading.Condition()
        for name, unit in streamer._units.items():
            read = unit.layout.read_into

            def traced(buffer, release=False, name=name, read=read, **options):
                with self.changed:
                    self.events.append((threading.current_thread().name, name))
                    self.reads[name] += 1
                    self.changed.notify_all()
                return read(buffer, release, **options)

            unit.layout.read_into = traced

    def read_for_next_use(self, name: str, timeout: float = 30) -> bool:
        """Wait until a read of ``name`` started since its last use."""
        with self.changed:
            return self.changed.wait_for(lambda: self.reads[name] > self.uses[name], timeout)


def test_stream_reads_the_next_unit_while_one_computes_and_keeps_the_buffers_bounded(checkpoint):
    reference, path = checkpoint
    model = _load(path, {"cpu": 1})  # everything on disk
    streamer = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(streamer, ReadAhead)
    streamer.keep = False  # no resident subset: every unit streams
    probe = _Probe(streamer)
    x = torch.randint(0, CONFIG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    # The reader thread starts when the first forward ends and at once reads ahead for the next one; held back until the
    # next forward, so that what the first forward read is judged alone (else a loaded machine lets it in first).
    streamer._start = lambda: None
    with torch.inference_mode():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # learns the order, reads in place
        order = list(streamer._order)
        assert {thread for thread, _ in probe.events} == {threading.current_thread().name}
        del streamer._start  # the next forward starts the reader
        probe.uses = dict(probe.reads)
        overlapped: list[bool] = []

        def wait_for_successor(name):
            def hook(*_):  # runs after the stream installed `name`, before it computes: the next read has started
                probe.uses[name] += 1
                overlapped.append(probe.read_for_next_use(order[(order.index(name) + 1) % len(order)]))
            return hook

        handles = [model.get_submodule(name).register_forward_pre_hook(wait_for_successor(name)) for name in order]
        probe.events.clear()
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        assert len(overlapped) == 3 * len(order) and all(overlapped), overlapped
        assert {thread for thread, _ in probe.events} == {"bigmodel-stream"}  # no read on the compute thread
        for handle in handles:
            handle.remove()
    largest = max(unit.layout.nbytes for unit in streamer._units.values())
    assert 2 <= streamer.pool.slots <= 8 and streamer.pool.made <= streamer.pool.slots  # the stream's memory is bounded
    assert streamer.pool.slot_bytes == largest


def test_resident_subset_is_kept_spread_over_the_order_and_not_read_again(checkpoint, monkeypatch):
    reference, path = checkpoint
    model = _load(path, {"cpu": 1})
    streamer = model.__dict__["_bigmodel_dispatch"].prefetcher
    units = {name: unit.layout.nbytes for name, unit in streamer._units.items()}
    room = sum(units.values()) // 2  # memory left beyond the budget, the stream and the margin: half the units

    class Memory:  # the budget's headroom is not kept back from the subset (page cache), only a small margin
        free, headroom = room + resident.SUBSET_MARGIN + 8 * streamer.pool.slot_bytes, 256 * 2**20

    monkeypatch.setattr(resident, "detect_cpu_memory", lambda: Memory)
    streamer.keep = True
    x = torch.randint(0, CONFIG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    kept = streamer._kept
    assert kept and room <= streamer.kept_room <= room + 8 * streamer.pool.slot_bytes  # less the stream to allocate
    assert streamer.kept_room - max(units.values()) <= streamer.kept_bytes <= streamer.kept_room
    order = streamer._order
    positions = sorted(order.index(name) for name in kept)  # spread: no long run of kept units
    assert max(b - a for a, b in zip(positions, positions[1:])) <= 4, positions

    def cached(name):  # the fraction of the unit's file bytes in the page cache (mincore over its views)
        tensors = streamer._tensors[name]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return sum(pages.resident_fraction(t) * t.numel() * t.element_size() for t in tensors) / nbytes

    assert min(cached(name) for name in kept if units[name] >= 4 * pages.PAGE) >= 0.9  # their pages stay cached
    # Each later forward reads from the disk only what is streamed. Judged between two moments where the readers are
    # done reading ahead (every buffer holds a read, or the next unit is read): the units read ahead for the forward
    # before the window and those read for the next one in it are the same ones, whatever the timing.
    before = _idle_read_bytes(streamer)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    read = _idle_read_bytes(streamer) - before
    streamer.close()
    total = sum(units.values())
    assert read <= 1.1 * (total - streamer.kept_bytes) + 2**16, (read, total, streamer.kept_bytes)


def _idle_read_bytes(streamer: ReadAhead) -> int:
    """:func:`_read_bytes` once the stream's readers have nothing left to read ahead (waits on their condition)."""

    def idle() -> bool:
        full = not streamer.pool.available() or streamer._next_unit() in streamer._ready
        return not streamer._inflight and full

    with streamer._cond:
        assert streamer._cond.wait_for(idle, timeout=30), "the readers never finished reading ahead"
        return _read_bytes()


def _read_bytes() -> int:
    """Bytes this process had read from storage (page-cache hits are not counted)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("read_bytes:")))  # fmt: skip


def test_a_module_returning_a_view_of_its_weight_keeps_its_buffer(tmp_path):
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(64, 32))

        def forward(self, x):
            return x + self.table[:1]  # a new tensor

    class Returns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, 32))

        def forward(self, x):
            return self.weight[: x.shape[0]]  # a view of the weight: escapes the forward

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = Returns(), Leaky(), Leaky()

        def forward(self, x):
            return self.c(self.b(x)) * 0 + self.a(x), self.a(x)

    torch.manual_seed(0)
    net = Net().eval()
    save_file(net.state_dict(), str(tmp_path / "m.safetensors"))
    with init_empty_weights():
        empty = Net()
    model = load_checkpoint_and_dispatch(empty, tmp_path / "m.safetensors", device_map={"": "disk"}).eval()
    model.__dict__["_bigmodel_dispatch"].prefetcher.keep = False  # every unit streams through the reused buffers
    x = torch.zeros(4, 32)
    with torch.inference_mode():
        outputs = [model(x) for _ in range(4)]
    for first, second in outputs:  # every output still holds `a.weight`, whatever the stream read since
        torch.testing.assert_close(first, net.a.weight[:4] + 0 * first)
        torch.testing.assert_close(second, net.a.weight[:4])


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
            torch.testing.assert_close(model(x.cuda()).cpu(), expected, **gpu_tolerance(expected.dtype))  # GPU vs CPU
    model.__dict__["_bigmodel_dispatch"].prefetcher.close()
    disk, _ = _disk_and_cpu(model)
    nbytes = sum(p.numel() * p.element_size() for p in disk)
    assert sum(pages.resident_fraction(p) * p.numel() * p.element_size() for p in disk) <= 0.5 * nbytes
