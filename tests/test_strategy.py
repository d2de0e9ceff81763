"""End to end through the real ``Trainer.predict`` with ``BigModelInferenceStrategy`` on CPU (+ disk)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback
from tests.lightning_models import (
    GPTModule,
    PlainGPTModule,
    assert_same,
    bigmodel_trainer,
    plain_gpt,
    reference_outputs,
    stock_trainer,
    token_loader,
    tokens,
    write_bare_checkpoint,
)

# cpu + disk: the embeddings and the first half of the blocks in RAM, the rest on disk
CPU_DISK_MAP = {
    "model.transformer.wte": "cpu",
    "model.transformer.wpe": "cpu",
    "model.transformer.h.0": "cpu",
    "model.transformer.h.1": "cpu",
    "model.transformer.h.2": "disk",
    "model.transformer.h.3": "disk",
    "model.transformer.ln_f": "disk",
    "model.lm_head": "cpu",
}


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # device_map.json and any Lightning output land in tmp_path


@pytest.fixture
def bare_ckpt(tmp_path):
    return write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("device_map", ["explicit", "auto"])
def test_cpu_disk_predict_matches_plain_model(tmp_path, safe, device_map):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt(), safe=safe)
    strategy = BigModelInferenceStrategy(
        device_map=CPU_DISK_MAP if device_map == "explicit" else "auto",
        max_memory=None if device_map == "explicit" else {"cpu": 120_000},
        no_split_module_classes=["Block"],
        offload_folder=tmp_path / "offload",
    )
    module = GPTModule()
    outputs = bigmodel_trainer(strategy).predict(module, token_loader(), ckpt_path=str(ckpt))
    assert_same(outputs, reference_outputs())
    assert "disk" in strategy.plan.values() and "cpu" in strategy.plan.values()
    assert strategy.root_device == torch.device("cpu")


def test_lightning_ckpt_from_stock_trainer_loads(tmp_path):
    plain = PlainGPTModule()
    stock = stock_trainer(default_root_dir=tmp_path)
    expected = stock.predict(plain, token_loader())
    stock.save_checkpoint(tmp_path / "plain.ckpt")
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, offload_folder=tmp_path / "offload")
    outputs = bigmodel_trainer(strategy).predict(GPTModule(), token_loader(), ckpt_path=tmp_path / "plain.ckpt")
    assert_same(outputs, expected)


def test_checkpoint_argument_without_ckpt_path(bare_ckpt):
    strategy = BigModelInferenceStrategy(checkpoint=str(bare_ckpt))
    outputs = bigmodel_trainer(strategy).predict(GPTModule(), token_loader())
    assert_same(outputs, reference_outputs())


def test_predict_twice_reuses_the_dispatched_model(bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP)
    trainer = bigmodel_trainer(strategy)
    module = GPTModule()
    first = trainer.predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    weight = module.model.transformer.h[0].attn.c_attn.weight
    second = trainer.predict(module, token_loader())  # no ckpt_path: the loaded model is reused
    third = trainer.predict(module, token_loader(), ckpt_path=str(bare_ckpt))  # same checkpoint: not reloaded
    assert module.model.transformer.h[0].attn.c_attn.weight is weight
    for outputs in (first, second, third):
        assert_same(outputs, reference_outputs())


def test_release_on_teardown_reloads_from_checkpoint(bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, checkpoint=str(bare_ckpt), release_on_teardown=True)
    trainer = bigmodel_trainer(strategy)
    module = GPTModule()
    first = trainer.predict(module, token_loader())
    second = trainer.predict(module, token_loader())
    assert_same(first, reference_outputs())
    assert_same(second, reference_outputs())


def test_generate_loop_in_predict_step(bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP)
    module = GPTModule(mode="generate", max_new_tokens=4)
    outputs = bigmodel_trainer(strategy).predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    reference = plain_gpt()
    expected = [reference.generate(chunk, max_new_tokens=4) for chunk in tokens().split(3)]
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)


def test_strategy_by_name(bare_ckpt):
    trainer = bigmodel_trainer(strategy="bigmodel")  # type: ignore[arg-type]
    assert isinstance(trainer.strategy, BigModelInferenceStrategy)
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))
    assert_same(outputs, reference_outputs())


class _BatchWriter(BasePredictionWriter):
    def __init__(self, folder):
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        torch.save(prediction, self.folder / f"batch_{batch_idx}.pt")


def test_prediction_writer_batch_job(tmp_path, bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP)
    trainer = bigmodel_trainer(strategy, callbacks=[_BatchWriter(tmp_path)])
    returned = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt), return_predictions=False)
    assert returned is None
    written = [torch.load(tmp_path / f"batch_{i}.pt") for i in range(2)]
    assert_same(written, reference_outputs())


PRECISIONS = ["bf16-true", "16-true", "bf16-mixed", "16-mixed"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_matches_stock_lightning(tmp_path, bare_ckpt, precision):
    if precision == "16-mixed" and not torch.cuda.is_available():
        pytest.skip("Lightning replaces 16-mixed by bf16-mixed on CPU (covered by the bf16-mixed case)")
    accelerator = "cpu"
    expected = stock_trainer(precision=precision).predict(PlainGPTModule(), token_loader())
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, offload_folder=tmp_path / "offload")
    trainer = bigmodel_trainer(strategy, precision=precision, accelerator=accelerator)
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))
    for got, want in zip(outputs, expected):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_dtype_argument_casts_weights(tmp_path, bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, dtype="bfloat16", offload_folder=tmp_path / "off")
    module = GPTModule()
    bigmodel_trainer(strategy).predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    assert module.model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype="):
        BigModelInferenceStrategy(dtype="int8")


class _Trainable(GPTModule):
    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_is_rejected():
    trainer = bigmodel_trainer(BigModelInferenceStrategy(), max_steps=1)
    with pytest.raises(MisconfigurationException, match="inference-only"):
        trainer.fit(_Trainable(), token_loader())


def test_user_device_map_callback_is_used(bare_ckpt):
    callback = DeviceMapCallback(device_map=CPU_DISK_MAP)
    strategy = BigModelInferenceStrategy(device_map="sequential")  # the callback's plan wins
    trainer = bigmodel_trainer(strategy, callbacks=[callback])
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))
    assert strategy.plan == callback.device_map == CPU_DISK_MAP
    assert_same(outputs, reference_outputs())


def test_strict_missing_keys_raise(tmp_path):
    state = {k: v for k, v in plain_gpt().state_dict().items() if "h.3.mlp" not in k}
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(RuntimeError, match="Missing key"):
        bigmodel_trainer(BigModelInferenceStrategy()).predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))


def test_explicit_key_prefix_and_ambiguous_prefix(tmp_path, bare_ckpt):
    outputs = bigmodel_trainer(BigModelInferenceStrategy(key_prefix="model.")).predict(
        GPTModule(), token_loader(), ckpt_path=str(bare_ckpt)
    )
    assert_same(outputs, reference_outputs())

    class TwoCopies(GPTModule):
        def configure_model(self):
            super().configure_model()
            if not hasattr(self, "copy"):
                self.copy = type(self.model)(self.model.config)

    with pytest.raises(ValueError, match="key_prefix="):
        bigmodel_trainer(BigModelInferenceStrategy()).predict(TwoCopies(), token_loader(), ckpt_path=str(bare_ckpt))


def test_signature_validates_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(BigModelInferenceStrategy, "strategy")
    cfg = parser.parse_args(["--strategy.device_map=balanced_low_0", "--strategy.dtype=bfloat16"])
    assert cfg.strategy.device_map == "balanced_low_0"
    with pytest.raises(Exception):
        parser.parse_args(["--strategy.device_map=fastest"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_CPU_DISK_MAP = {**CPU_DISK_MAP, "model.transformer.wte": 0, "model.transformer.h.0": 0, "model.lm_head": 0}


@needs_cuda
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-true"])
def test_gpu_cpu_disk_map_matches_stock_lightning(tmp_path, bare_ckpt, precision):
    expected = pl_gpu_trainer(precision).predict(PlainGPTModule(), token_loader())
    strategy = BigModelInferenceStrategy(device_map=GPU_CPU_DISK_MAP, offload_folder=tmp_path / "offload")
    trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=1, precision=precision)
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))
    assert strategy.root_device == torch.device("cuda", 0)
    for got, want in zip(outputs, expected):
        assert got.device == want.device and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def pl_gpu_trainer(precision):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="gpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)
