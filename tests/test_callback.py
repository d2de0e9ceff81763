"""DeviceMapCallback: planning through the strategy, the table, device_map.json; the table helpers."""

from __future__ import annotations

import json
import logging

import pytest
from lightning.pytorch.accelerators import CPUAccelerator

from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback
from lightning_bigmodel.planning.table import bytes_per_device, format_bytes, module_ranges, render_table
from tests.lightning_models import GPTModule, bigmodel_trainer, plain_gpt, token_loader, write_bare_checkpoint


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        ({"a": "cpu", "h.0": "cpu", "h.1": "cpu", "h.2": "disk", "h.3": "disk", "b": "disk"},
         [("a", "cpu"), ("h.0-1", "cpu"), ("h.2-3", "disk"), ("b", "disk")]),
        ({"h.0": 0, "h.2": 0, "h.3": 1}, [("h.0", 0), ("h.2", 0), ("h.3", 1)]),  # gaps and device changes split
        ({"": "cpu"}, [("(whole model)", "cpu")]),
    ],
)  # fmt: skip
def test_module_ranges(device_map, expected):
    assert [(name, device) for name, device, _ in module_ranges(device_map)] == expected


def test_render_table_bytes_and_budget():
    device_map = {"x.0": 0, "x.1": 0, "y": "cpu", "z": "disk"}
    sizes = {"x.0": 2**30, "x.1": 2**30, "y": 512, "z": 3 * 2**20}
    text = render_table(device_map, sizes, {0: 4 * 2**30, "cpu": 1024})
    assert "x.0-1" in text and "cuda:0" in text
    assert "2.0 GiB" in text and "50.0%" in text  # 2 GiB of a 4 GiB budget
    assert "512 B" in text and "3.0 MiB" in text
    assert bytes_per_device(device_map, sizes) == {"cuda:0": 2**31, "cpu": 512, "disk": 3 * 2**20}
    assert format_bytes(None) == "-"


# Bytes of the tiny GPT (n_embd 32, 4 blocks, vocab 97, block_size 64, fp32), by hand: a block has 12 * 32**2 + 13 * 32
# weights (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj), a float `scale` and a 64 x 64 bool mask.
BLOCK_BYTES = (12 * 32**2 + 13 * 32) * 4 + 4 + 64 * 64
TINY_BYTES = {"model.transformer.wte": 97 * 32 * 4, "model.transformer.wpe": 64 * 32 * 4,
              **{f"model.transformer.h.{i}": BLOCK_BYTES for i in range(4)},
              "model.transformer.ln_f": 2 * 32 * 4, "model.lm_head": 0}  # fmt: skip  (lm_head is tied to wte)


def test_callback_prints_table_and_writes_json(tmp_path, caplog):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    budget = 120_000 + 2 * BLOCK_BYTES  # a given CPU budget is all for resident weights: about 60% of the model
    callback = DeviceMapCallback(device_map="auto", max_memory={"cpu": budget}, no_split_module_classes=["Block"])
    trainer = bigmodel_trainer(callbacks=[callback], default_root_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO):
        trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert callback.device_map is not None and set(callback.device_map.values()) == {"cpu", "disk"}
    assert callback.module_sizes[""] == sum(TINY_BYTES.values()) == 240_528
    assert "Device map:" in caplog.text and "model.transformer.h." in caplog.text
    written = json.loads((tmp_path / "run" / "device_map.json").read_text())
    assert written["device_map"] == callback.device_map
    per_device = {}
    for name, device in callback.device_map.items():
        per_device[device] = per_device.get(device, 0) + TINY_BYTES[name]
    assert written["bytes_per_device"] == per_device
    assert written["max_memory"] == {"cpu": budget} and written["max_memory_source"] == {"cpu": "max_memory"}
    # the blocks are whole on one device
    blocks = [key for key in callback.device_map if ".h." in key]
    assert all(key.count(".") == 3 for key in blocks)


def GPTModule_sized():
    module = GPTModule()
    module.configure_model()
    return module


def test_strategy_makes_a_callback_when_none_is_given(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    trainer = bigmodel_trainer(BigModelInferenceStrategy(device_map="sequential"), default_root_dir=tmp_path)
    trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    made = [cb for cb in trainer.callbacks if isinstance(cb, DeviceMapCallback)]
    assert len(made) == 1 and made[0].device_map == trainer.strategy.plan
    assert (tmp_path / "device_map.json").is_file()


def test_gpu_budget_on_cpu_accelerator_is_an_error():
    strategy = BigModelInferenceStrategy()
    strategy.accelerator = CPUAccelerator()
    with pytest.raises(ValueError, match="accelerator='gpu'"):
        DeviceMapCallback(max_memory={0: "1GB", "cpu": "1GB"}).plan(GPTModule_sized(), strategy)


def test_callback_without_bigmodel_strategy_warns(tmp_path):
    from tests.lightning_models import PlainGPTModule, stock_trainer

    trainer = stock_trainer(callbacks=[DeviceMapCallback()], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="BigModelInferenceStrategy"):
        trainer.predict(PlainGPTModule(), token_loader())
