"""The disk stream's scheduling: what is read, how often, and by which thread (no timing, no page-out advice)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.offload import attach
from lightning_bigmodel.offload.placement import is_disk
from lightning_bigmodel.offload.readahead import ReadAhead

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="preadv/posix_fadvise are Linux calls")

CONFIG = GPTConfig(vocab_size=512, block_size=32, n_layer=3, n_head=4, n_embd=128)


@pytest.fixture
def checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    save_file(state, str(tmp_path / "model.safetensors"))
    return model, tmp_path / "model.safetensors"


def _on_disk(path: Path, monkeypatch, release: bool, config: GPTConfig = CONFIG) -> tuple[torch.nn.Module, ReadAhead]:
    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: release)
    with init_empty_weights():
        model = GPT(config)
    model = load_checkpoint_and_dispatch(model, path, device_map={"": "disk"}).eval()
    streamer = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(streamer, ReadAhead) and streamer.release is release
    return model, streamer


def _stream_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "bigmodel-stream"]


def _three_forwards_equal(model: torch.nn.Module, reference: torch.nn.Module, seed: int) -> None:
    """Three forwards of ``model`` on one batch, each equal to the plain ``reference`` to the bit."""
    x = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = reference(x)
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_memory_to_spare_reads_each_weight_once_keeps_it_and_wakes_no_reader(checkpoint, monkeypatch):
    reference, path = checkpoint
    before = _stream_threads()
    model, streamer = _on_disk(path, monkeypatch, release=False)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: two units, one disk tensor
    installed: dict[str, list[int]] = {}

    def spy(name):
        def hook(module, _):  # registered after the stream's hook: sees what it installed
            installed.setdefault(name, []).append(id(module.weight))
        return hook

    for name in ("transformer.wte", "lm_head", "transformer.h.1.mlp.c_fc"):
        model.get_submodule(name).register_forward_pre_hook(spy(name))
    _three_forwards_equal(model, reference, seed=1)
    # No reader thread: nothing is streamed, so one would only be woken (a thread handoff per module on 2 cores).
    assert not streamer._threads and _stream_threads() == before
    # Each disk tensor was read once, the tied one too (wte and lm_head share it), and the same parameters are
    # installed every forward (nothing rebuilt).
    assert streamer.reads == len(streamer._units) - 1
    assert installed["transformer.wte"][0] == installed["lm_head"][0]
    assert all(len(set(ids)) == 1 for ids in installed.values()), installed
    # Between forwards the model holds what loading placed: the disk views.
    assert all(is_disk(p) for p in model.parameters())
    streamer.close()


TIED = GPTConfig(vocab_size=16384, block_size=32, n_layer=1, n_head=4, n_embd=128)  # wte: 8 MiB, the block: 0.8 MB


def _read_bytes() -> int:
    """Bytes this process had read from storage (page-cache hits are not counted)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("read_bytes:")))  # fmt: skip


def test_a_tied_weight_streamed_is_read_from_disk_once_per_forward(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = GPT(TIED).eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    model, streamer = _on_disk(tmp_path / "model.safetensors", monkeypatch, release=True, config=TIED)
    streamer.keep = False  # no resident subset: every unit streams
    events: list[tuple[str, bool]] = []
    lock = threading.Lock()
    for name, unit in streamer._units.items():
        def traced(buffer, release=False, name=name, read=unit.layout.read_into, **options):
            with lock:
                events.append((name, release))
            return read(buffer, release, **options)

        unit.layout.read_into = traced
    x = torch.randint(0, TIED.vocab_size, (1, 8), generator=torch.Generator().manual_seed(3))
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    with torch.inference_mode():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # learns the order
        assert streamer._order[0] == "transformer.wte" and streamer._order[-1] == "lm_head"
        events.clear()
        before = _read_bytes()
        for _ in range(3):
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    streamer.close()  # the reader stops: every read it made is in `events`
    read = _read_bytes() - before
    # The embedding's read keeps the range in the page cache for lm_head, the last user, which drops it.
    assert ("transformer.wte", True) not in events and ("lm_head", True) in events, events
    assert all(release for name, release in events if name != "transformer.wte")
    # From the disk: the unique bytes once per forward, and what the reader read ahead for a fourth one (at most all).
    assert read <= 3 * 1.1 * unique + unique, (read, unique)


def _direct_supported(path: Path) -> bool:
    import mmap
    import os

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    try:
        os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_streamed_reads_go_around_the_page_cache_into_aligned_views(tmp_path, monkeypatch):
    from lightning_bigmodel.offload import pages

    torch.manual_seed(0)
    reference = GPT(CONFIG).eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"pad": "x" * 13})  # data not 64-byte aligned
    if not _direct_supported(tmp_path / "model.safetensors"):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    model, streamer = _on_disk(tmp_path / "model.safetensors", monkeypatch, release=True)
    streamer.keep = False  # no resident subset: every unit streams
    assert any(pages.file_of(t)[1] % 64 for ts in streamer._tensors.values() for t in ts)  # views move in the buffer
    misaligned: list[str] = []

    def check(name):
        def hook(module, _):  # after the stream installed the unit's weights
            if any(p.data_ptr() % 64 for p in module.parameters(recurse=False)):
                misaligned.append(name)
        return hook

    for name in streamer._units:
        model.get_submodule(name).register_forward_pre_hook(check(name))
    _three_forwards_equal(model, reference, seed=5)
    streamer.close()
    # Every unit was read with O_DIRECT (each read of the three forwards and the reads ahead), into 64-byte aligned views;
    # except the tied weight after the first forward: the page cache holds it for its second user, read from there.
    direct = {name: unit.layout.direct_reads for name, unit in streamer._units.items()}
    assert direct.pop("transformer.wte") == direct.pop("lm_head") == 1, direct
    assert all(count >= 3 for count in direct.values()), direct
    assert not misaligned, misaligned


def test_a_buffered_read_fetches_exactly_its_range(tmp_path):
    """A kept unit is read through the page cache: nothing past its range may come in with it (the kernel's read-ahead
    would fetch the next tensors, which stream around the page cache: wasted reads that push the subset out)."""
    import mmap
    import os

    from lightning_bigmodel.offload import pages
    from lightning_bigmodel.offload.stream import Layout, aligned_empty

    path, data = tmp_path / "blob", os.urandom(8 * 2**20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold, as a checkpoint read from disk
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        pages.track_file(mapping, fd)
    finally:
        os.close(fd)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    starts = [2**20 + i * 2**16 for i in range(4)]  # units read in file order
    units = [whole[start : start + 2**16] for start in starts]
    after = whole[2**20 + 4 * 2**16 + pages.PAGE : 6 * 2**20]
    if pages.resident_fraction(after) > 0:
        pytest.skip(f"the page cache of {tmp_path} cannot be dropped here")
    for start, unit in zip(starts, units):
        layout = Layout([("unit", unit)])
        buffer = aligned_empty(layout.nbytes)
        layout.read_into(buffer)  # buffered: the range stays in the page cache (a kept unit)
        assert pages.resident_fraction(unit) == 1.0  # the map itself is never touched
        assert bytes(layout.view_of(buffer, unit).numpy()) == data[start : start + 2**16]
    assert pages.resident_fraction(after) == 0.0  # sequential reads, and yet no read-ahead past them


def test_a_forward_after_close_reads_in_place_instead_of_waiting_for_a_reader(checkpoint, monkeypatch):
    reference, path = checkpoint
    model, streamer = _on_disk(path, monkeypatch, release=True)
    x = torch.randint(0, CONFIG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(6))
    result: list = []
    with torch.inference_mode():
        expected = reference(x)
        model(x)  # learns the order, starts the readers
        streamer.close()
        worker = threading.Thread(target=lambda: result.append(model(x)), daemon=True)
        worker.start()
        worker.join(timeout=60)  # the old stream waited forever for a reader that was gone
    assert not worker.is_alive() and result, "the forward after close() never returned"
    torch.testing.assert_close(result[0], expected, rtol=0, atol=0)
