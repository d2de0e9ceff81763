"""One source of truth for the plan: a strategy and a DeviceMapCallback never silently override each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback, compute_module_sizes, init_empty_weights
from tests.lightning_models import (
    GPTModule,
    assert_same,
    bigmodel_trainer,
    plain_gpt,
    reference_outputs,
    token_loader,
    tokens,
    write_bare_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _model_bytes() -> int:
    with init_empty_weights():
        module = GPTModule()
        module.configure_model()
    return compute_module_sizes(module)[""]


def test_callback_without_settings_uses_the_strategys(tmp_path):
    """The issue's case: the user adds the callback only for the table and device_map.json."""
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    budget = int(_model_bytes() * 0.7)
    strategy = BigModelInferenceStrategy(
        device_map="auto", max_memory={"cpu": budget}, no_split_module_classes=["Block"],
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    callback = DeviceMapCallback()
    trainer = bigmodel_trainer(strategy, callbacks=[callback], default_root_dir=tmp_path / "run")
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert_same(outputs, reference_outputs())
    plan = callback.device_map
    assert plan == strategy.plan and "disk" in plan.values() and "cpu" in plan.values()  # the budget was honoured
    assert not any(key.count(".") > 3 for key in plan if ".h." in key), plan  # blocks stay whole (no_split)
    assert callback.max_memory_bytes == {"cpu": budget}
    written = json.loads((tmp_path / "run" / "device_map.json").read_text())
    assert written["device_map"] == plan and written["max_memory"] == {"cpu": budget}


def test_settings_given_only_to_the_callback_reach_the_strategy(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy()
    callback = DeviceMapCallback(dtype="bfloat16", offload_buffers=True, device_map={"": "cpu"})
    outputs = bigmodel_trainer(strategy, callbacks=[callback]).predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert strategy.dtype is torch.bfloat16 and strategy.offload_buffers is True  # used for loading as well
    reference = plain_gpt().to(torch.bfloat16).eval()  # the plain model cast to the same dtype
    with torch.no_grad():
        expected = [reference(chunk) for chunk in tokens().split(3)]
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected):
        assert got.dtype is torch.bfloat16
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("strategy_kwargs", "callback_kwargs", "culprit"),
    [
        ({"device_map": "sequential"}, {"device_map": "balanced"}, "`device_map`: 'sequential' (strategy) vs 'balanced'"),
        ({"max_memory": {"cpu": "1GB"}}, {"max_memory": {"cpu": "2GB"}}, "`max_memory`"),
        ({"no_split_module_classes": ["Block"]}, {"no_split_module_classes": ["Other"]}, "`no_split_module_classes`"),
        ({"dtype": "bfloat16"}, {"dtype": "float16"}, "`dtype`"),
        ({"offload_buffers": True}, {"offload_buffers": False}, "`offload_buffers`: True (strategy) vs False"),
    ],
)
def test_the_same_setting_with_different_values_is_an_error_before_planning(
    tmp_path, strategy_kwargs, callback_kwargs, culprit
):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    callback = DeviceMapCallback(**callback_kwargs)
    trainer = bigmodel_trainer(BigModelInferenceStrategy(**strategy_kwargs), callbacks=[callback])
    module = GPTModule()
    with pytest.raises(ValueError, match="set the same planning setting") as err:
        trainer.predict(module, token_loader(), ckpt_path=str(ckpt))
    assert culprit in str(err.value)
    assert callback.device_map is None  # nothing was planned
    assert all(p.is_meta for p in module.parameters())  # nothing was loaded


def test_equal_values_written_differently_are_not_a_clash(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy(max_memory={"cpu": "1GB"}, dtype=torch.float32, device_map="auto")
    callback = DeviceMapCallback(max_memory={"cpu": 10**9}, dtype="fp32", device_map="auto")
    outputs = bigmodel_trainer(strategy, callbacks=[callback]).predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert_same(outputs, reference_outputs())


def _cli_config(tmp_path: Path, callback_args: dict) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "gpt_tiny.yaml").read_text())
    config["ckpt_path"] = str(tmp_path / "gpt-tiny")
    from lightning_bigmodel.pl._tiny_random import create_model_folder

    if not (tmp_path / "gpt-tiny").exists():
        create_model_folder("tiny-random-gpt", tmp_path / "gpt-tiny")  # what `lightning-bigmodel demo` writes
    config["trainer"]["default_root_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"][0]["init_args"]["output_path"] = str(tmp_path / "tokens.pt")
    config["trainer"]["callbacks"].append({"class_path": "lightning_bigmodel.DeviceMapCallback", "init_args": callback_args})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_cli(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("jsonargparse")  # the CLI is built on it
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # what the environment had, after the repo
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "lightning_bigmodel", "predict", "--config", str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_callback_without_settings_uses_the_strategys_and_a_clash_fails(tmp_path):
    done = _run_cli(_cli_config(tmp_path, {}), tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Tip:" not in done.stdout + done.stderr and "LeafSpec" not in done.stdout + done.stderr  # no banners
    assert "Device map:" in done.stdout + done.stderr
    written = json.loads((tmp_path / "runs" / "device_map.json").read_text())
    assert written["max_memory"] == {"cpu": 150_000}  # the strategy's budget from the YAML
    assert "disk" in written["device_map"].values()

    clash = _run_cli(_cli_config(tmp_path, {"no_split_module_classes": ["Nothing"]}), tmp_path)
    assert clash.returncode != 0
    assert "`no_split_module_classes`: ['Block'] (strategy) vs ['Nothing'] (DeviceMapCallback)" in clash.stdout + clash.stderr
