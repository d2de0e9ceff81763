"""One test per trap of DESIGN.md ("Traps found by a prototype"), through the real ``Trainer.predict``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import BigModelInferenceStrategy, init_empty_weights
from tests.lightning_models import (
    PRESET,
    GPTModule,
    assert_same,
    bigmodel_trainer,
    plain_gpt,
    reference_outputs,
    stock_trainer,
    token_loader,
    tokens,
    write_bare_checkpoint,
)

HALF_ON_DISK = {
    "model.transformer.wte": "cpu",
    "model.transformer.wpe": "cpu",
    "model.transformer.h.0": "cpu",
    "model.transformer.h.1": "disk",
    "model.transformer.h.2": "disk",
    "model.transformer.h.3": "cpu",
    "model.transformer.ln_f": "cpu",
    "model.lm_head": "disk",  # tied to wte, which is on "cpu"
}


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def bare_ckpt(tmp_path):
    return write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())


class ExplicitlyEmptyModule(GPTModule):
    """Builds its network under ``init_empty_weights`` itself (what a user does for a big model)."""

    def configure_model(self):
        if self.model is None:
            with init_empty_weights():
                self.model = GPT(GPTConfig.preset(PRESET))


def test_meta_model_with_checkpoint_loads_with_our_strategy(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in plain_gpt().state_dict().items()}}, path)
    # stock Lightning: the load into meta parameters does nothing, then moving/tearing down meta tensors fails
    with pytest.raises(NotImplementedError, match="meta"):
        stock_trainer().predict(ExplicitlyEmptyModule(), token_loader(), ckpt_path=str(path))
    outputs = bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK, offload_folder=tmp_path / "off"))
    outputs = outputs.predict(ExplicitlyEmptyModule(), token_loader(), ckpt_path=str(path))
    assert_same(outputs, reference_outputs())


@pytest.mark.parametrize("layout", ["bare_pt", "ckpt_without_version"])
def test_checkpoint_without_lightning_version_loads(tmp_path, layout):
    state = plain_gpt().state_dict()
    path = tmp_path / ("weights.pt" if layout == "bare_pt" else "run.ckpt")
    torch.save(state if layout == "bare_pt" else {"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    outputs = bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK, offload_folder=tmp_path / "off"))
    outputs = outputs.predict(GPTModule(), token_loader(), ckpt_path=str(path))
    assert_same(outputs, reference_outputs())


def test_no_tensor_left_on_meta(tmp_path, bare_ckpt):
    module = GPTModule()
    bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK)).predict(
        module, token_loader(), ckpt_path=str(bare_ckpt)
    )
    assert not [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    # a checkpoint lacking a parameter, loaded non-strictly: a clear error naming it instead of a meta forward
    partial = {k: v for k, v in plain_gpt().state_dict().items() if k != "transformer.h.1.mlp.c_fc.bias"}
    ckpt = write_bare_checkpoint(tmp_path / "partial", partial)
    with pytest.raises(RuntimeError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        bigmodel_trainer(BigModelInferenceStrategy(strict=False)).predict(
            GPTModule(), token_loader(), ckpt_path=str(ckpt)
        )


def test_non_persistent_buffers_keep_their_values(bare_ckpt):
    module = GPTModule()
    bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK)).predict(
        module, token_loader(), ckpt_path=str(bare_ckpt)
    )
    expected = plain_gpt().transformer.h[1].attn.mask
    for block in module.model.transformer.h:
        assert torch.equal(block.attn.mask, expected)


def test_tied_weights_survive_through_trainer(bare_ckpt):
    module = GPTModule()
    outputs = bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK)).predict(
        module, token_loader(), ckpt_path=str(bare_ckpt)
    )
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    assert_same(outputs, reference_outputs())


def test_persistent_buffer_of_offloaded_module(tmp_path):
    reference = plain_gpt()
    for block in reference.transformer.h:
        block.attn.scale.fill_(0.05)  # differs from the value built by __init__: a stale buffer would show
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", reference)
    outputs = bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK)).predict(
        GPTModule(), token_loader(), ckpt_path=str(ckpt)
    )
    with torch.no_grad():
        expected = [reference(chunk) for chunk in tokens().split(3)]
    assert_same(outputs, expected)
    assert not torch.allclose(expected[0], reference_outputs()[0])  # the buffer value matters


def test_cpu_accelerator_with_gpu_map_is_a_clear_error(bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map={"model": 0})
    with pytest.raises(MisconfigurationException, match=r"accelerator='gpu'"):
        bigmodel_trainer(strategy).predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))


def test_predict_without_ckpt_path_or_checkpoint_says_what_to_do():
    with pytest.raises(RuntimeError, match=r"ckpt_path=.*checkpoint="):
        bigmodel_trainer(BigModelInferenceStrategy()).predict(GPTModule(), token_loader())


def test_predict_twice_on_a_dispatched_model(bare_ckpt, tmp_path):
    module = GPTModule()
    trainer = bigmodel_trainer(BigModelInferenceStrategy(device_map=HALF_ON_DISK))
    first = trainer.predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    second = trainer.predict(module, token_loader())
    assert_same(first, reference_outputs())
    assert_same(second, reference_outputs())
    # another checkpoint into the already dispatched model: refused with the fix, not silently mixed
    other = write_bare_checkpoint(tmp_path / "other", plain_gpt(seed=1))
    with pytest.raises(RuntimeError, match="already dispatched"):
        trainer.predict(module, token_loader(), ckpt_path=str(other))
