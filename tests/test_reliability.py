"""Bad input through the public entry points: each error has its type, names the culprit and says the fix, and leaves
no partial state (the model still on meta or untouched, no offload folder written). Also: a checkpoint never runs
code, and a dispatched model refuses to move or train."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from models import BufferNet, PicklePayload, UntiedMLP, example_input, make_reference
from torch import nn

from lightning_bigmodel import (
    CheckpointError,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    save_sharded_checkpoint,
)
from lightning_bigmodel.offload.placement import is_disk, is_dispatched

NO_GPU = torch.cuda.device_count()  # the first GPU index this machine does not have


def empty_model(cls: type = UntiedMLP) -> nn.Module:
    with init_empty_weights():
        return cls().eval()


def assert_untouched(model: nn.Module, offload: Path) -> None:
    """Every parameter still on meta, nothing dispatched, nothing written to the offload folder."""
    assert all(p.is_meta for p in model.parameters())
    assert not is_dispatched(model) and not hasattr(model, "hf_device_map")
    assert not offload.exists() or [p.name for p in offload.iterdir() if p.name != ".lock"] == []


def write(state: dict, folder: Path, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        return save_sharded_checkpoint(state, folder)
    torch.save(state, folder / f"weights.{fmt}")
    return folder / f"weights.{fmt}"


# --------------------------------------------------------------------------- broken checkpoints


LAST = "model-00007-of-00007.safetensors"


def _damage(index: Path, how: str) -> tuple[Path, str]:
    """Break the sharded checkpoint of ``index`` as ``how`` says; return what to load and the expected message."""
    folder = index.parent
    shard = folder / LAST
    doc = json.loads(index.read_text())
    if how == "missing_path":
        return folder / "nope" / "model.safetensors", r"nope.*model\.safetensors"
    if how == "missing_shard":
        shard.unlink()
        return index, rf"entry 'blocks\.2\.proj\.weight' names shard '{LAST}', but .* does not exist"
    if how == "tensor_not_in_shard":
        doc["weight_map"]["ghost.weight"] = LAST
    elif how == "escaping_shard":
        (folder.parent / "outside.safetensors").write_bytes(shard.read_bytes())
        doc["weight_map"]["out.weight"] = "../outside.safetensors"
    elif how == "truncated_header":
        shard.write_bytes(shard.read_bytes()[:20])
        return index, rf"{LAST}.*corrupt or truncated"
    elif how == "empty_shard":
        shard.write_bytes(b"")
        return index, rf"{LAST}.*empty"
    elif how == "duplicate_key":
        save_sharded_checkpoint({"out.weight": torch.zeros(4, 16)}, folder / "extra")
        (folder / "extra" / "model.safetensors").rename(folder / "dup.safetensors")
        doc["weight_map"]["out.weight"] = "dup.safetensors"  # and model-00007 still holds it
        index.write_text(json.dumps(doc))
        return index, rf"'out\.weight' appears in two shards, .*(dup\.safetensors.*{LAST}|{LAST}.*dup\.safetensors)"
    index.write_text(json.dumps(doc))
    expected = {"tensor_not_in_shard": r"'ghost\.weight'.*does not hold it",
                "escaping_shard": r"'out\.weight'.*outside\.safetensors.*outside the checkpoint folder"}  # fmt: skip
    return index, expected[how]


@pytest.mark.parametrize(
    "how",
    ["missing_path", "missing_shard", "tensor_not_in_shard", "escaping_shard", "truncated_header", "empty_shard",
     "duplicate_key"],
)  # fmt: skip
def test_broken_checkpoint_fails_before_placing(tmp_path, how):
    index = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt", max_shard_size=3000)
    assert index.name.endswith(".json") and (index.parent / LAST).exists()
    checkpoint, culprit = _damage(index, how)
    offload = tmp_path / "off"
    model = empty_model()
    with pytest.raises(CheckpointError, match=culprit):  # dtype=float64 would write every tensor to the folder
        load_checkpoint_and_dispatch(
            model, checkpoint, device_map={"": "disk"}, offload_folder=offload, dtype=torch.float64
        )
    assert_untouched(model, offload)


# --------------------------------------------------------------------------- checkpoint does not fit the model


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_shape_mismatch(tmp_path, fmt):
    state = make_reference(UntiedMLP).state_dict()
    state["blocks.1.fc.weight"] = torch.zeros(3, 16)
    checkpoint, offload = write(state, tmp_path / "ckpt", fmt), tmp_path / "off"
    model = empty_model()
    culprit = r"`blocks\.1\.fc\.weight`: checkpoint shape \[3, 16\], model .* \[32, 16\]"
    with pytest.raises(ValueError, match=culprit) as info:
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "disk"}, offload_folder=offload)
    assert str(tmp_path / "ckpt") in str(info.value) and "Build the model from the configuration" in str(info.value)
    assert_untouched(model, offload)


@pytest.mark.parametrize(
    "key, bad, want",
    [("a.steps", torch.tensor(2.5), r"`a\.steps`: checkpoint dtype torch\.float32 cannot be cast to torch\.int64"),
     ("a.fc.weight", torch.ones(16, 16, dtype=torch.complex64),
      r"`a\.fc\.weight`: checkpoint dtype torch\.complex64 cannot be cast to torch\.float32")],
)  # fmt: skip
def test_dtype_that_cannot_be_cast(tmp_path, key, bad, want):
    state = make_reference(BufferNet).state_dict()
    state[key] = bad
    checkpoint, offload = write(state, tmp_path / "ckpt", "bin"), tmp_path / "off"
    model = empty_model(BufferNet)
    with pytest.raises(ValueError, match=want):
        load_checkpoint_and_dispatch(
            model, checkpoint, device_map={"a": "disk", "mid": "cpu", "b": "cpu"}, offload_folder=offload
        )
    assert_untouched(model, offload)


# --------------------------------------------------------------------------- device maps


@pytest.mark.parametrize(
    "device_map, culprit",
    [({"inp": "cpu", "blocks": "cpu"}, r"leaves \['out\.weight', 'out\.bias'\] unassigned"),
     ({"": "cpu", "blocks.7": "cpu"}, r"name no module.*\['blocks\.7'\]"),
     ({"": "cpu", "out": "tpu"}, r"not devices: \{'out': 'tpu'\}")],
)  # fmt: skip
def test_device_map_that_does_not_fit(tmp_path, device_map, culprit):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "safetensors")
    model = empty_model()
    with pytest.raises(ValueError, match=culprit):
        load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map)
    assert_untouched(model, tmp_path / "off")
    plain = make_reference(UntiedMLP)
    weights = dict(plain.named_parameters())
    with pytest.raises(ValueError, match=culprit):
        dispatch_model(plain, device_map)
    assert all(p is weights[n] for n, p in plain.named_parameters()) and not is_dispatched(plain)


def test_gpu_that_does_not_exist(tmp_path):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "safetensors")
    model = empty_model()
    with pytest.raises(ValueError, match=rf"\[''\] on GPU {NO_GPU} of {NO_GPU} visible.*CUDA_VISIBLE_DEVICES"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": NO_GPU})
    assert_untouched(model, tmp_path / "off")
    plain = make_reference(UntiedMLP)
    with pytest.raises(ValueError, match=rf"GPU {NO_GPU} of {NO_GPU} visible"):
        dispatch_model(plain, {"": f"cuda:{NO_GPU}"})
    assert all(p.device.type == "cpu" for p in plain.parameters()) and not is_dispatched(plain)
    # a plan for a GPU budget this machine cannot honour fails the same way, before loading
    model = empty_model()
    with pytest.raises(ValueError, match=rf"`max_memory\[{NO_GPU}\]` budgets GPU\(s\) \[{NO_GPU}\], but this process sees"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", max_memory={NO_GPU: "1GB", "cpu": "1GB"})
    assert_untouched(model, tmp_path / "off")


def test_gpu_3_of_2_is_refused_before_cuda_is_touched(tmp_path, monkeypatch):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "safetensors")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    model = empty_model()
    device_map = {"inp": 0, "blocks": 1, "out": 3}
    with pytest.raises(ValueError, match=r"\['out'\] on GPU 3 of 2 visible. Use GPU indices below 2"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map)
    assert_untouched(model, tmp_path / "off")


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "budget, culprit",
    [({"cpu": "-1GB"}, r"`max_memory\['cpu'\]`: Memory size '-1GB' is negative"),
     ({"cpu": -5}, r"`max_memory\['cpu'\]`: Memory size -5 must be finite and non-negative"),
     ({"cpu": "12 parsecs"}, r"'12 parsecs' is malformed; use .*GiB"),
     ({"cpu": "1.5.GB"}, r"'1\.5\.GB' is malformed"),
     ({"gpu0": "1GB"}, r"unknown key 'gpu0'")],
)  # fmt: skip
def test_malformed_or_negative_memory(tmp_path, budget, culprit):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "bin")
    model = empty_model()
    with pytest.raises(ValueError, match=culprit):
        load_checkpoint_and_dispatch(
            model, checkpoint, device_map="auto", max_memory=budget, offload_folder=tmp_path / "off"
        )
    assert_untouched(model, tmp_path / "off")


def test_budget_too_small_without_offload_folder(tmp_path):
    reference = make_reference(UntiedMLP)
    checkpoint = write(reference.state_dict(), tmp_path / "ckpt", "bin")
    model = empty_model()
    with pytest.raises(ValueError, match=r"`max_memory`=\{'cpu': 2000\} is too small.*weights\.bin.*`offload_folder=`"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", max_memory={"cpu": 2000})
    assert_untouched(model, tmp_path / "off")
    # the same budget works with a folder, and with a safetensors checkpoint (referenced in place) without one
    model = load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map="auto", max_memory={"cpu": 2000}, offload_folder=tmp_path / "off"
    )
    safe = write(reference.state_dict(), tmp_path / "safe", "safetensors")
    model_safe = load_checkpoint_and_dispatch(empty_model(), safe, device_map="auto", max_memory={"cpu": 2000})
    with torch.inference_mode():
        want = reference(example_input(UntiedMLP))
        for got in (model, model_safe):
            assert any(is_disk(p) for p in got.parameters())
            torch.testing.assert_close(got(example_input(UntiedMLP)), want, rtol=0, atol=0)


# --------------------------------------------------------------------------- pickles never run code




@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".bin", ".pt"])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_never_runs_through_the_loaders(tmp_path, suffix, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    state = {**make_reference(UntiedMLP).state_dict(), "extra": PicklePayload(marker)}
    if legacy:  # pre-zip torch.save format: a plain pickle stream
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, path)
    for load in (
        lambda m: load_checkpoint_in_model(m, path, device_map={"": "disk"}, offload_folder=tmp_path / "off"),
        lambda m: load_checkpoint_and_dispatch(m, path, device_map="auto", offload_folder=tmp_path / "off"),
    ):
        model = empty_model()
        with pytest.raises(CheckpointError, match=rf"evil\{suffix}.*weights_only=True.*never unpickled"):
            load(model)
        assert not marker.exists()
        assert_untouched(model, tmp_path / "off")


# --------------------------------------------------------------------------- a dispatched model stays where it is


def test_dispatched_model_refuses_cuda_and_other_moves(tmp_path):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "safetensors")
    model = load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map={"inp": "cpu", "blocks": "disk", "out": "cpu"}
    )
    moves = (lambda m: m.cuda(), lambda m: m.to("cuda:0"), lambda m: m.double(), lambda m: m.to_empty(device="cpu"))
    for move in moves:
        with pytest.raises(RuntimeError, match=r"UntiedMLP is dispatched.*hf_device_map.*remove_dispatch\(model\)"):
            move(model)
    assert all(p.device.type == "cpu" for p in model.parameters()) and any(is_disk(p) for p in model.parameters())
    with torch.inference_mode():
        want = make_reference(UntiedMLP)(example_input(UntiedMLP))
        torch.testing.assert_close(model(example_input(UntiedMLP)), want, rtol=0, atol=0)


def test_requires_grad_on_disk_weights_is_refused_with_the_reason(tmp_path):
    checkpoint = write(make_reference(UntiedMLP).state_dict(), tmp_path / "ckpt", "bin")
    model = load_checkpoint_and_dispatch(
        empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=tmp_path / "off"
    )
    model.blocks[0].fc.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"1 offloaded weight\(s\) require grad.*'blocks.0.fc.weight', shape \(32, 16\).*runs inference only"):
        model(example_input(UntiedMLP))
    with torch.no_grad():  # the refusal is about training: inference still works, with the right outputs
        want = make_reference(UntiedMLP)(example_input(UntiedMLP))
        torch.testing.assert_close(model(example_input(UntiedMLP)), want, rtol=0, atol=0)
