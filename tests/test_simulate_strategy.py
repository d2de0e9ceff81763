"""The strategy and DeviceMapCallback take the expected input shape: the plan keeps every simulated peak within its
budget, device_map.json carries the peaks, and predictions stay equal to the plain model's."""

from __future__ import annotations

import json

import pytest

from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback
from lightning_bigmodel.planning.sizes import compute_module_sizes
from tests.lightning_models import GPTModule, assert_same, bigmodel_trainer, plain_gpt, reference_outputs, token_loader
from tests.lightning_models import write_bare_checkpoint


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_strategy_plans_for_the_input_shape_and_json_carries_the_peaks(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    total = compute_module_sizes(plain_gpt())[""]
    budget = total * 6 // 10  # the rest goes to disk, streamed through RAM
    strategy = BigModelInferenceStrategy(
        max_memory={"cpu": budget}, no_split_module_classes=["Block"], input_shape="3x7", max_new_tokens=2
    )
    callback = DeviceMapCallback()
    trainer = bigmodel_trainer(strategy, callbacks=[callback], default_root_dir=tmp_path / "run")
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert_same(outputs, reference_outputs())
    written = json.loads((tmp_path / "run" / "device_map.json").read_text())
    assert written["input_shape"] == [3, 7] and written["max_new_tokens"] == 2
    assert written["peak_per_device"]["cpu"] <= budget
    assert written["peak_per_device"]["cpu"] > written["weights_per_device"]["cpu"]  # activations and disk pages
    assert written["weights_per_device"]["disk"] > 0
    assert callback.memory is not None and callback.memory["cpu"]["peak"] == written["peak_per_device"]["cpu"]


def test_input_shape_given_twice_differently_is_refused(tmp_path):
    strategy = BigModelInferenceStrategy(input_shape="3x7")
    trainer = bigmodel_trainer(strategy, callbacks=[DeviceMapCallback(input_shape=(3, 8))])
    with pytest.raises(ValueError, match=r"`input_shape`: \(3, 7\) \(strategy\) vs \(3, 8\) \(DeviceMapCallback\)"):
        trainer.predict(GPTModule(), token_loader(), ckpt_path=str(write_bare_checkpoint(tmp_path / "c", plain_gpt())))


def test_bad_input_shape_fails_when_the_strategy_is_made():
    with pytest.raises(ValueError, match=r"`input_shape='3by7'` does not parse"):
        BigModelInferenceStrategy(input_shape="3by7")


def test_max_new_tokens_without_input_shape_is_refused(tmp_path):
    strategy = BigModelInferenceStrategy(max_new_tokens=8)
    with pytest.raises(ValueError, match=r"`max_new_tokens=8` needs `input_shape`"):
        bigmodel_trainer(strategy).predict(
            GPTModule(), token_loader(), ckpt_path=str(write_bare_checkpoint(tmp_path / "c", plain_gpt()))
        )
