"""ShardedCheckpointIO, LazyStateDict and key-prefix matching."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open

from lightning_bigmodel import ShardedCheckpointIO
from lightning_bigmodel.pl.io import LazyStateDict
from lightning_bigmodel.checkpoint.keys import infer_key_prefix
from tests.lightning_models import plain_gpt, write_bare_checkpoint


def test_load_checkpoint_is_lazy_and_versioned(tmp_path, monkeypatch):
    folder = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    io = ShardedCheckpointIO()
    reads = []
    checkpoint = io.load_checkpoint(folder)
    state_dict = checkpoint["state_dict"]
    original = state_dict.reader.read
    monkeypatch.setattr(state_dict.reader, "read", lambda key, device="cpu": reads.append(key) or original(key))
    assert isinstance(state_dict, LazyStateDict)
    assert checkpoint["pytorch-lightning_version"] == pl.__version__
    expected = plain_gpt().state_dict()
    assert "transformer.h.0.attn.c_attn.weight" in state_dict and len(state_dict) == len(list(state_dict))
    assert reads == []  # keys, len and `in` read headers only
    torch.testing.assert_close(state_dict["transformer.wpe.weight"], expected["transformer.wpe.weight"])
    assert reads == ["transformer.wpe.weight"]
    with pytest.raises(KeyError):
        state_dict["nope"]
    checkpoint["epoch"] = 3  # the outer dict is mutable (Lightning's migration writes into it)
    io.teardown()


def test_lightning_ckpt_keeps_its_entries(tmp_path):
    state = {f"model.{k}": v for k, v in plain_gpt().state_dict().items()}
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.5.0", "epoch": 4, "optimizer_states": []}, path)
    checkpoint = ShardedCheckpointIO().load_checkpoint(path)
    assert checkpoint["pytorch-lightning_version"] == "2.5.0" and checkpoint["epoch"] == 4
    assert "optimizer_states" not in checkpoint
    assert set(checkpoint["state_dict"]) == set(state)


def test_save_load_remove_roundtrip(tmp_path):
    state = plain_gpt().state_dict()
    io = ShardedCheckpointIO(max_shard_size=20_000)
    io.save_checkpoint({"state_dict": state, "pytorch-lightning_version": pl.__version__, "epoch": 1}, tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) > 1
    loaded = io.load_checkpoint(tmp_path / "c")
    assert loaded["epoch"] == 1
    on_disk = set()
    for shard in (tmp_path / "c").glob("*.safetensors"):  # the checkpoint's own key list, read with safetensors
        with safe_open(str(shard), framework="pt") as handle:
            on_disk.update(handle.keys())
    assert set(state) - on_disk == {"lm_head.weight"}  # tied to transformer.wte.weight: saved once
    assert sorted(loaded["state_dict"]) == sorted(on_disk)  # every saved key: a dropped one fails here
    for key in on_disk:
        torch.testing.assert_close(loaded["state_dict"][key], state[key], rtol=0, atol=0)
    io.remove_checkpoint(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_save_refuses_meta_tensors(tmp_path):
    with pytest.raises(RuntimeError, match="meta"):
        ShardedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.empty(2, device="meta")}}, tmp_path / "c")


def test_progress_threshold():
    assert ShardedCheckpointIO().show_progress(2**31) and not ShardedCheckpointIO().show_progress(10)
    assert ShardedCheckpointIO(progress=True).show_progress(10)
    assert not ShardedCheckpointIO(progress=False).show_progress(2**40)


MODEL_KEYS = ["model.a.weight", "model.b.weight", "model.b.bias", "head.weight"]


@pytest.mark.parametrize(
    ("checkpoint_keys", "model_keys", "prefix"),
    [
        (["a.weight", "b.weight", "b.bias"], MODEL_KEYS, "model."),  # bare network into `self.model`
        (["model.a.weight", "model.b.weight"], MODEL_KEYS, ""),  # a Lightning .ckpt: as is
        (["a.weight", "b.weight", "b.bias", "extra"], MODEL_KEYS, "model."),  # most keys match: the rest is unexpected
        (["x.y"], ["x.y", "m.x.y"], ""),  # an exact match wins over a submodule
    ],
)
def test_infer_key_prefix(checkpoint_keys, model_keys, prefix):
    assert infer_key_prefix(checkpoint_keys, model_keys) == prefix


def test_infer_key_prefix_errors_show_keys():
    with pytest.raises(ValueError, match=r"several submodules.*'student\.'.*key_prefix="):
        infer_key_prefix(["w", "b"], ["teacher.w", "teacher.b", "student.w", "student.b"])
    with pytest.raises(ValueError, match=r"'q\.weight'.*'model\.a\.weight'.*key_prefix="):
        infer_key_prefix(["q.weight", "r.weight"], MODEL_KEYS)
