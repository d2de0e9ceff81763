"""Loading progress: the ``progress`` callback of ``load_checkpoint_in_model`` and the ``ShardedCheckpointIO`` bar."""

from __future__ import annotations

import sys
import types
from collections import Counter

import pytest
import torch
from models import TiedLM, UntiedMLP, make_reference
from safetensors import safe_open

from lightning_bigmodel import BigModelInferenceStrategy, ShardedCheckpointIO, init_empty_weights, load_checkpoint_in_model
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from tests.lightning_models import GPTModule, assert_same, bigmodel_trainer, plain_gpt, reference_outputs, token_loader

CPU_DISK_MAP = {"wte": "cpu", "blocks.0": "disk", "blocks.1": "cpu", "blocks.2": "disk", "ln_f": "cpu", "head": "disk"}


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # device_map.json lands in tmp_path


def checkpoint_bytes(folder) -> dict[str, int]:
    """``{key: bytes}`` of every tensor in the safetensors files of ``folder``, read with the safetensors library."""
    sizes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                sizes[key] = tensor.numel() * tensor.element_size()
    return sizes


@pytest.mark.parametrize("cls", [TiedLM, UntiedMLP])
@pytest.mark.parametrize("device_map", [None, CPU_DISK_MAP], ids=["no-map", "cpu-disk"])
def test_progress_reports_every_key_once_with_its_bytes(tmp_path, cls, device_map):
    if device_map is not None and cls is UntiedMLP:
        device_map = {"inp": "disk", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "out": "cpu"}
    folder = tmp_path / "ckpt"
    save_sharded_checkpoint(make_reference(cls), folder, max_shard_size=3_000)
    expected = checkpoint_bytes(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    with init_empty_weights():
        model = cls()
    calls = []
    load_checkpoint_in_model(
        model, folder, device_map=device_map, progress=lambda key, nbytes: calls.append((key, nbytes))
    )
    assert Counter(key for key, _ in calls) == Counter(expected.keys())  # every key exactly once
    assert dict(calls) == expected
    assert sum(nbytes for _, nbytes in calls) == sum(expected.values())


def test_progress_counts_unexpected_keys_too(tmp_path):
    state = {**make_reference(UntiedMLP).state_dict(), "extra.weight": torch.ones(3, 5)}
    folder = tmp_path / "ckpt"
    save_sharded_checkpoint(state, folder)
    calls = []
    with init_empty_weights():
        model = UntiedMLP()
    _, unexpected = load_checkpoint_in_model(model, folder, progress=lambda key, nbytes: calls.append((key, nbytes)))
    assert unexpected == ["extra.weight"]
    assert dict(calls) == checkpoint_bytes(folder) and len(calls) == len(state)
    assert calls[-1] == ("extra.weight", 60)  # keys that place nothing come after the placed ones


def test_progress_after_each_placement(tmp_path):
    folder = tmp_path / "ckpt"
    save_sharded_checkpoint(make_reference(UntiedMLP), folder)
    with init_empty_weights():
        model = UntiedMLP()
    seen = []

    def check(key, nbytes):
        assert not model.get_parameter(key).is_meta  # placed before it is reported
        seen.append(key)

    load_checkpoint_in_model(model, folder, progress=check)
    assert sorted(seen) == sorted(name for name, _ in model.named_parameters())


class _FakeTqdm:
    """Stands in for ``tqdm.auto.tqdm``: records what the bar was given."""

    made: list["_FakeTqdm"] = []

    def __init__(self, total, **kwargs):
        self.total, self.kwargs, self.updates, self.closed = total, kwargs, [], False
        _FakeTqdm.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch):
    _FakeTqdm.made = []
    monkeypatch.setitem(sys.modules, "tqdm.auto", types.SimpleNamespace(tqdm=_FakeTqdm))
    return _FakeTqdm.made


def _predict(tmp_path, io: ShardedCheckpointIO):
    folder = save_sharded_checkpoint(plain_gpt(), tmp_path / "ckpt", max_shard_size=20_000)
    strategy = BigModelInferenceStrategy(device_map={"model": "cpu"}, checkpoint_io=io)
    outputs = bigmodel_trainer(strategy).predict(GPTModule(), token_loader(), ckpt_path=str(tmp_path / "ckpt"))
    assert_same(outputs, reference_outputs())
    return folder


def test_sharded_io_progress_bar_advances_to_the_total(tmp_path, fake_tqdm):
    _predict(tmp_path, ShardedCheckpointIO(progress=True))
    total = sum(checkpoint_bytes(tmp_path / "ckpt").values())
    assert len(fake_tqdm) == 1
    bar = fake_tqdm[0]
    assert bar.total == total and sum(bar.updates) == total and bar.closed
    assert len(bar.updates) == len(checkpoint_bytes(tmp_path / "ckpt"))


def test_no_bar_for_a_small_checkpoint_by_default(tmp_path, fake_tqdm):
    _predict(tmp_path, ShardedCheckpointIO())
    assert fake_tqdm == []


def test_plain_report_without_tqdm(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `from tqdm.auto import tqdm` raises ImportError
    _predict(tmp_path, ShardedCheckpointIO(progress=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Loading checkpoint:")]
    percents = [int(line.split(":")[1].split("%")[0]) for line in lines]
    assert percents == sorted(set(percents)) and percents[-1] == 100
    assert all(p % 10 == 0 for p in percents) and len(percents) <= 10


def test_sharded_io_progress_with_the_real_tqdm(tmp_path, capsys):
    """The bar as a user sees it: the real tqdm (its keyword arguments accepted), ending at the checkpoint's bytes."""
    from tqdm import tqdm

    _predict(tmp_path, ShardedCheckpointIO(progress=True))
    total = tqdm.format_sizeof(sum(checkpoint_bytes(tmp_path / "ckpt").values()), divisor=1024)
    err = capsys.readouterr().err
    assert f"Loading checkpoint: 100%|██████████| {total}/{total} [" in err, err[-2000:]
