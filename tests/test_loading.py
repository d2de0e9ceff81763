"""Streaming a checkpoint into a meta model: placement on cpu/disk, ties, buffers, strictness, offload folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from models import MAPS, BufferNet, TiedLM, UntiedMLP, example_input, make_reference
from safetensors import safe_open
from torch import nn

from lightning_bigmodel import (
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    save_sharded_checkpoint,
)
from lightning_bigmodel.offload.disk import MANIFEST
from lightning_bigmodel.offload.placement import is_disk

MODELS = (TiedLM, UntiedMLP, BufferNet)


def write_checkpoint(model: nn.Module, folder, fmt: str):
    """The model's state dict as one safetensors file or one ``.bin`` (tied weights saved once)."""
    if fmt == "safetensors":
        return save_sharded_checkpoint(model, folder, max_shard_size="1GB")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_model.bin"
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
    return path


def empty_model(cls: type) -> nn.Module:
    with init_empty_weights():
        model = cls()
    return model.eval()


def assert_same_outputs(model: nn.Module, reference: nn.Module, cls: type, calls: int = 2) -> None:
    with torch.inference_mode():
        for _ in range(calls):  # BufferNet mutates a buffer: every call must stay identical to the reference
            torch.testing.assert_close(model(example_input(cls)), reference(example_input(cls)), rtol=0, atol=0)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("layout", ["cpu", "disk", "mixed"])
def test_outputs_match_plain_load(tmp_path, cls, fmt, layout):
    reference = make_reference(cls)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", fmt)
    offload = tmp_path / "offload"
    model = empty_model(cls)
    missing, unexpected = load_checkpoint_in_model(
        model, checkpoint, device_map=MAPS[cls][layout], offload_folder=offload
    )
    assert (missing, unexpected) == ([], [])
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    if cls is TiedLM:
        assert model.head.weight is model.wte.weight
    disk_params = [p for p in model.parameters() if is_disk(p)]
    assert bool(disk_params) == (layout != "cpu")
    if fmt == "safetensors":
        assert not offload.exists() or not any(offload.iterdir())  # referenced in place: nothing written
    else:
        assert offload.exists() == (layout != "cpu")
    assert_same_outputs(model, make_reference(cls), cls)


def test_disk_views_are_backed_by_the_checkpoint_file(tmp_path):
    reference = make_reference(UntiedMLP)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "safetensors")
    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"})
    assert torch.equal(model.out.bias, reference.out.bias)
    # overwrite the tensor's bytes in the file: a memory-mapped view sees the change (a copy would not)
    with safe_open(checkpoint, "pt") as f:
        assert "out.bias" in f.keys()
    header_len = int.from_bytes(checkpoint.read_bytes()[:8], "little")
    header = json.loads(checkpoint.read_bytes()[8 : 8 + header_len])
    begin, end = header["out.bias"]["data_offsets"]
    new = torch.full((4,), 7.0)
    with open(checkpoint, "r+b") as f:
        f.seek(8 + header_len + begin)
        f.write(new.numpy().tobytes())
    assert torch.equal(model.out.bias, new)


def test_ties_across_cpu_and_disk(tmp_path):
    reference = make_reference(TiedLM)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "safetensors")
    model = empty_model(TiedLM)
    with safe_open(checkpoint, "pt") as f:
        assert len([k for k in f.keys() if k in ("wte.weight", "head.weight")]) == 1  # saved under one name
    load_checkpoint_in_model(
        model, checkpoint, device_map={"wte": "disk", "blocks": "cpu", "ln_f": "cpu", "head": "cpu"}
    )
    assert model.head.weight is model.wte.weight
    assert not is_disk(model.wte.weight)  # the faster of its aliases' places
    assert_same_outputs(model, make_reference(TiedLM), TiedLM)


def test_bin_disk_entries_written_once_then_reused(tmp_path):
    reference = make_reference(UntiedMLP)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "bin")
    offload = tmp_path / "offload"
    load_checkpoint_in_model(empty_model(UntiedMLP), checkpoint, device_map={"": "disk"}, offload_folder=offload)
    manifest = json.loads((offload / MANIFEST).read_text())
    assert set(manifest["tensors"]) == set(reference.state_dict())
    assert manifest["source"][0]["path"] == str(checkpoint.resolve())
    stamps = {p.name: p.stat().st_mtime_ns for p in offload.glob("*.safetensors")}
    assert len(stamps) == len(reference.state_dict())

    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=offload)
    assert {p.name: p.stat().st_mtime_ns for p in offload.glob("*.safetensors")} == stamps  # reused
    assert all(is_disk(p) and p.data_ptr() % 64 == 0 for p in model.parameters())  # aligned like an allocation
    with safe_open(offload / "out.weight.safetensors", "pt") as f:  # plain safetensors files
        torch.testing.assert_close(f.get_tensor("tensor"), reference.out.weight, rtol=0, atol=0)
    assert_same_outputs(model, make_reference(UntiedMLP), UntiedMLP)

    # a changed checkpoint (new weights, new mtime) invalidates the folder
    changed = make_reference(UntiedMLP, seed=5)
    torch.save(changed.state_dict(), checkpoint)
    os.utime(checkpoint, ns=(1, 1))
    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=offload)
    assert_same_outputs(model, make_reference(UntiedMLP, seed=5), UntiedMLP)


def test_partial_offload_folder_is_completed(tmp_path):
    reference = make_reference(UntiedMLP)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "bin")
    offload = tmp_path / "offload"
    load_checkpoint_in_model(empty_model(UntiedMLP), checkpoint, device_map={"": "disk"}, offload_folder=offload)
    (offload / "out.weight.safetensors").unlink()  # lost file: rebuilt, the rest reused
    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=offload)
    assert (offload / "out.weight.safetensors").exists()
    assert_same_outputs(model, make_reference(UntiedMLP), UntiedMLP)


def test_disk_needing_writes_without_folder_fails_before_placing(tmp_path):
    checkpoint = write_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt", "bin")
    model = empty_model(UntiedMLP)
    with pytest.raises(ValueError, match="offload_folder=") as info:
        device_map = {"blocks.1": "disk", "inp": "cpu", "blocks.0": "cpu", "blocks.2": "cpu", "out": "cpu"}
        load_checkpoint_in_model(model, checkpoint, device_map=device_map)
    assert "blocks.1" in str(info.value)
    assert all(p.is_meta for p in model.parameters())


def test_dtype_conversion_on_disk_needs_folder(tmp_path):
    reference = make_reference(UntiedMLP)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "safetensors")
    with pytest.raises(ValueError, match="offload_folder="):
        load_checkpoint_in_model(empty_model(UntiedMLP), checkpoint, device_map={"": "disk"}, dtype=torch.float64)
    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(
        model, checkpoint, device_map={"": "disk"}, dtype=torch.float64, offload_folder=tmp_path / "off"
    )
    assert all(p.dtype == torch.float64 and is_disk(p) for p in model.parameters())
    with torch.inference_mode():
        expected = reference.double()(example_input(UntiedMLP).double())
        torch.testing.assert_close(model(example_input(UntiedMLP).double()), expected, rtol=0, atol=0)


def test_strict_missing_and_unexpected(tmp_path):
    reference = make_reference(UntiedMLP)
    state = reference.state_dict()
    state.pop("out.bias")
    state["extra.weight"] = torch.zeros(2)
    folder = save_sharded_checkpoint(state, tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    with pytest.raises(RuntimeError, match="Missing key\\(s\\) in state_dict:.*out.bias") as info:
        load_checkpoint_in_model(model, folder, device_map={"": "cpu"}, strict=True)
    assert "Unexpected key(s)" in str(info.value) and "extra.weight" in str(info.value)
    assert all(p.is_meta for p in model.parameters())  # nothing placed
    missing, unexpected = load_checkpoint_in_model(model, folder, device_map={"": "cpu"})
    assert (missing, unexpected) == (["out.bias"], ["extra.weight"])
    assert model.out.bias.is_meta and not model.out.weight.is_meta


def test_unused_checkpoint_tensors_are_logged_once_with_count_and_first_names(tmp_path, caplog):
    reference = make_reference(UntiedMLP)
    state = dict(reference.state_dict())
    state.update({f"extra.{i}.weight": torch.zeros(2) for i in range(7)})
    folder = save_sharded_checkpoint(state, tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    with caplog.at_level("WARNING", logger="lightning_bigmodel"):
        load_checkpoint_and_dispatch(model, folder, device_map={"": "cpu"})
    (record,) = [r for r in caplog.records if r.name.startswith("lightning_bigmodel")]
    message = record.getMessage()
    assert message.startswith("7 tensor(s) of checkpoint") and "strict=True" in message
    assert "extra.0.weight, extra.1.weight" in message and "... (2 more)" in message, message
    assert_same_outputs(model, reference, UntiedMLP)  # the used ones loaded as usual
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_bigmodel"):
        load_checkpoint_and_dispatch(empty_model(UntiedMLP), save_sharded_checkpoint(reference, tmp_path / "exact"))
    assert not caplog.records  # an exact checkpoint logs nothing
    with pytest.raises(RuntimeError, match="Unexpected key\\(s\\) in state_dict: \"extra.0.weight\""):
        load_checkpoint_and_dispatch(empty_model(UntiedMLP), folder, device_map={"": "cpu"}, strict=True)


def test_key_prefix(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = UntiedMLP()

    reference = make_reference(UntiedMLP)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "safetensors")
    with init_empty_weights():
        wrapper = Wrapper()
    missing, unexpected = load_checkpoint_in_model(
        wrapper, checkpoint, device_map={"model.blocks": "disk", "model": "cpu"}, key_prefix="model."
    )
    assert (missing, unexpected) == ([], [])
    assert_same_outputs(wrapper.model.eval(), make_reference(UntiedMLP), UntiedMLP)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = make_reference(UntiedMLP).state_dict()
    state["out.weight"] = torch.zeros(5, 16)
    checkpoint = save_sharded_checkpoint(state, tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    with pytest.raises(ValueError, match=r"out\.weight.*\[5, 16\].*\[4, 16\]"):
        load_checkpoint_in_model(model, checkpoint, device_map={"": "cpu"})
    assert all(p.is_meta for p in model.parameters())


def test_uncovered_map_fails(tmp_path):
    checkpoint = write_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt", "safetensors")
    with pytest.raises(ValueError, match="out"):
        load_checkpoint_in_model(empty_model(UntiedMLP), checkpoint, device_map={"inp": "cpu", "blocks": "cpu"})


def test_buffers_non_persistent_kept_and_meta_materialized(tmp_path):
    reference = make_reference(BufferNet)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "safetensors")
    for include_buffers in (False, True):
        with init_empty_weights(include_buffers=include_buffers):
            model = BufferNet().eval()
        assert model.a.table.is_meta == include_buffers
        load_checkpoint_in_model(model, checkpoint, device_map=MAPS[BufferNet]["mixed"])
        assert torch.equal(model.a.table, reference.a.table) and torch.equal(model.b.offset, reference.b.offset)
        assert not any(b.is_meta for b in model.buffers())
        assert_same_outputs(model, make_reference(BufferNet), BufferNet)


def test_no_device_map_loads_on_cpu(tmp_path):
    reference = make_reference(TiedLM)
    checkpoint = write_checkpoint(reference, tmp_path / "ckpt", "bin")
    model = empty_model(TiedLM)
    assert load_checkpoint_in_model(model, checkpoint) == ([], [])
    assert model.head.weight is model.wte.weight
    assert_same_outputs(model, make_reference(TiedLM), TiedLM)


def test_offload_folder_lock_serialises_writers(tmp_path, monkeypatch):
    """A second writer tries the folder's lock while the first holds it: it must find it taken (no sleep decides the
    order: the second thread probes the lock without blocking first, and tells the main thread it did)."""
    import fcntl
    import threading
    import types

    from lightning_bigmodel.offload import disk
    from lightning_bigmodel.offload.disk import OffloadFolder

    events, probed = [], threading.Event()
    second_thread = {}

    def flock(fd, operation):
        if threading.get_ident() == second_thread.get("id") and operation == fcntl.LOCK_EX:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                events.append("second finds the lock taken")
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
            probed.set()
        fcntl.flock(fd, operation)

    monkeypatch.setattr(disk, "fcntl", types.SimpleNamespace(**{**vars(fcntl), "flock": flock}))

    def second_writer():
        second_thread["id"] = threading.get_ident()
        with OffloadFolder(tmp_path, source=[{"path": "x", "size": 1, "mtime_ns": 1}]) as store:
            events.append("second enters")
            assert store.has("t", [3], torch.float32)  # sees what the first one committed: reuses it

    with OffloadFolder(tmp_path, source=[{"path": "x", "size": 1, "mtime_ns": 1}]) as store:
        thread = threading.Thread(target=second_writer)
        thread.start()
        assert probed.wait(timeout=30), "the second writer never asked for the lock"
        events.append("first writes")
        store.write("t", torch.arange(3.0))
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert events == ["second finds the lock taken", "first writes", "second enters"]
