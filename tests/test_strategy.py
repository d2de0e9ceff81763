"""End to end through the real ``Trainer.predict`` with ``BigModelInferenceStrategy`` on CPU (+ disk)."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from torch import nn

from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback, ShardedCheckpointIO, dispatch_model
from lightning_bigmodel import infer_device_map, init_empty_weights, remove_dispatch
from lightning_bigmodel.pl.io import LazyStateDict
from lightning_bigmodel.pl.loader import dispatched_modules, hook_network_children, prefetchers, return_outputs
from lightning_bigmodel.offload.hooks import RootHook
from tests.gpu_expectations import DeviceSpy, assert_greedy_consistent, gpu_tolerance
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
        max_memory=None if device_map == "explicit" else {"cpu": 230_000},  # 120 kB + two 55 kB blocks streaming
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
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
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
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


@torch.no_grad()
def _plain_outputs_in(dtype: torch.dtype) -> list[torch.Tensor]:
    """The plainly built model, every floating tensor cast to ``dtype`` (the attention mask stays bool)."""
    reference = plain_gpt().to(dtype)
    return [reference(chunk) for chunk in tokens().split(3)]


def test_dtype_argument_casts_weights(tmp_path, bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, dtype="bfloat16", offload_folder=tmp_path / "off")
    module = GPTModule()
    outputs = bigmodel_trainer(strategy).predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)  # disk-offloaded ones too
    expected = _plain_outputs_in(torch.bfloat16)
    assert all(out.dtype == torch.bfloat16 for out in outputs)
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # same kernels on the same bf16 weights
    assert not torch.equal(outputs[0].float(), reference_outputs()[0])  # bf16 is not float32
    with pytest.raises(ValueError, match="dtype="):
        BigModelInferenceStrategy(dtype="int8")


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_dtype_with_precision(tmp_path, bare_ckpt, precision):
    """`dtype` casts the stored weights; the Trainer's `precision` decides the compute, as with a stock Trainer."""
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, dtype="bfloat16", offload_folder=tmp_path / "off")
    outputs = bigmodel_trainer(strategy, precision=precision).predict(
        GPTModule(), token_loader(), ckpt_path=str(bare_ckpt)
    )
    stock = PlainGPTModule()
    stock.model.to(torch.bfloat16)  # the same bf16 weights, loaded plainly
    expected = stock_trainer(precision=precision).predict(stock, token_loader())
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)


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
    strategy = BigModelInferenceStrategy()  # no planning settings: the callback's are used
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
    pytest.importorskip("jsonargparse")
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(BigModelInferenceStrategy, "strategy")
    cfg = parser.parse_args(["--strategy.device_map=balanced_low_0", "--strategy.dtype=bfloat16"])
    assert cfg.strategy.device_map == "balanced_low_0"
    with pytest.raises(ArgumentError, match=r"(?s)device_map.*fastest"):
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
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        # Lightning returns predictions on the CPU; both runs use GPU kernels, which may still differ in algorithm
        assert got.device.type == want.device.type == "cpu" and got.dtype == want.dtype
        torch.testing.assert_close(got, want, **gpu_tolerance(got.dtype))


def pl_gpu_trainer(precision):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="gpu", devices=1, precision=precision, logger=False, enable_progress_bar=False)


# ---------------------------------------------------------------------------------------------- loose ends
class _ExtraBuffer(GPTModule):
    """Holds a tensor outside ``self.model``: the hooks go on the LightningModule, whose forward is never called."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def predict_step(self, batch, batch_idx):
        (idx,) = batch
        if self.mode == "generate":
            return self.model.generate(idx, max_new_tokens=self.max_new_tokens)
        return self.model(idx) * self.scale


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_module_with_tensors_outside_the_network(tmp_path, bare_ckpt, mode):
    strategy = BigModelInferenceStrategy(device_map={**CPU_DISK_MAP, "scale": "cpu"}, offload_folder=tmp_path / "off")
    module = _ExtraBuffer(mode=mode)
    outputs = bigmodel_trainer(strategy).predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    assert [name for name, _ in dispatched_modules(module)] == [""]  # the LightningModule is the dispatched root
    reference = plain_gpt()
    with torch.no_grad():
        if mode == "generate":
            expected = [reference.generate(chunk, max_new_tokens=4) for chunk in tokens().split(3)]
        else:
            expected = [reference(chunk) * 2 for chunk in tokens().split(3)]
    assert_same(outputs, expected)


def test_new_strategy_on_a_dispatched_model_reuses_its_plan(bare_ckpt):
    module = GPTModule()
    first = bigmodel_trainer(BigModelInferenceStrategy(device_map=CPU_DISK_MAP)).predict(
        module, token_loader(), ckpt_path=str(bare_ckpt)
    )
    strategy = BigModelInferenceStrategy(device_map="sequential")  # a different request: the dispatched map wins
    second = bigmodel_trainer(strategy).predict(module, token_loader())
    assert strategy.plan == CPU_DISK_MAP and strategy.root_device == torch.device("cpu")
    assert_same(first, reference_outputs())
    assert_same(second, reference_outputs())


def test_release_on_teardown_frees_weights_and_keeps_buffers(bare_ckpt):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, checkpoint=str(bare_ckpt), release_on_teardown=True)
    module = GPTModule()
    bigmodel_trainer(strategy).predict(module, token_loader())
    assert not dispatched_modules(module)
    assert all(p.is_meta for p in module.parameters())
    assert module.model.lm_head.weight is module.model.transformer.wte.weight  # still tied
    assert not any(b.is_meta for b in module.buffers())  # non-persistent buffers are in no checkpoint: kept


class _TwoCopies(GPTModule):
    def configure_model(self):
        super().configure_model()
        if not hasattr(self, "copy"):
            self.copy = type(self.model)(self.model.config)


def test_teardown_closes_the_checkpoint_files(bare_ckpt, monkeypatch):
    closed, opened = [], []
    original_close = LazyStateDict.close
    monkeypatch.setattr(LazyStateDict, "close", lambda self: closed.append(self) or original_close(self))
    io = ShardedCheckpointIO()
    original_load = io.load_checkpoint
    monkeypatch.setattr(io, "load_checkpoint", lambda *a, **k: opened.append(original_load(*a, **k)) or opened[-1])
    module = GPTModule()
    bigmodel_trainer(BigModelInferenceStrategy(device_map=CPU_DISK_MAP, checkpoint_io=io)).predict(
        module, token_loader(), ckpt_path=str(bare_ckpt)
    )
    was_closed = lambda checkpoint: any(state is checkpoint["state_dict"] for state in closed)  # noqa: E731
    assert len(opened) == 1 and was_closed(opened[0]) and io._open == []
    assert dispatched_modules(module)  # the model itself stays dispatched (the default)
    # a load that fails before streaming (ambiguous key prefix): the file it opened is closed at teardown all the same
    with pytest.raises(ValueError, match="key_prefix="):
        bigmodel_trainer(BigModelInferenceStrategy(checkpoint_io=io)).predict(
            _TwoCopies(), token_loader(), ckpt_path=str(bare_ckpt)
        )
    assert len(opened) == 2 and was_closed(opened[1]) and io._open == []


def test_return_outputs_keeps_structure_and_cpu_tensors():
    Pair = namedtuple("Pair", "a b")
    obj = {"x": [torch.ones(1), Pair(torch.zeros(1), "s")], "y": None}
    out = return_outputs(obj, torch.device("cpu"))
    assert out["x"][0] is obj["x"][0] and out["x"][1].a is obj["x"][1].a and isinstance(out["x"][1], Pair)


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@needs_cuda
def test_gpu_module_with_tensors_outside_the_network_prefetches(tmp_path, bare_ckpt):
    device_map = {**GPU_CPU_DISK_MAP, "scale": 0}
    strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "off")
    module = _ExtraBuffer()
    spy = DeviceSpy()
    trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=1, callbacks=[spy])
    outputs = trainer.predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    found = prefetchers(module)
    assert found and not any(p.recording for p in found)  # the order was fixed after the first step
    expected = [out * 2 for out in reference_outputs()]
    assert spy.devices == [torch.device("cuda", 0)] * 2  # produced on the root device; Lightning returns them on CPU
    assert all(out.device.type == "cpu" for out in outputs)
    assert_same(outputs, expected, atol=gpu_tolerance(torch.float32)["atol"])  # GPU vs CPU float32 kernels


@needs_two_gpus
@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_two_gpus_outputs_come_back_to_the_root_device(tmp_path, bare_ckpt, mode):
    # the network ends on GPU 1 (lm_head, tied to wte on GPU 0): its outputs must come back to GPU 0
    device_map = {**{key: 0 for key in CPU_DISK_MAP}, "model.transformer.h.2": 1, "model.transformer.h.3": "cpu",
                  "model.transformer.ln_f": 1, "model.lm_head": 1, "scale": 0}  # fmt: skip
    strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "off")
    module = _ExtraBuffer(mode=mode)
    spy = DeviceSpy()
    trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=2, callbacks=[spy])
    outputs = trainer.predict(module, token_loader(), ckpt_path=str(bare_ckpt))
    assert spy.devices == [torch.device("cuda", 0)] * 2  # back on the root device; Lightning then returns them on CPU
    reference = plain_gpt()
    prompts = tokens().split(3)
    assert len(outputs) == len(prompts) == 2
    if mode == "generate":  # a near-tie may resolve the other way on a GPU: check each choice, not CPU's sequence
        for got, prompt in zip(outputs, prompts, strict=True):
            assert got.shape == (prompt.shape[0], prompt.shape[1] + 4)
            assert_greedy_consistent(reference, prompt, got)
    else:
        with torch.no_grad():
            expected = [reference(c) * 2 for c in prompts]
        assert_same(outputs, expected, atol=gpu_tolerance(torch.float32)["atol"])  # GPU vs CPU float32 kernels


def test_network_children_get_output_hooks_before_the_dispatch_hooks(tmp_path):
    """A module dispatched as a whole (it holds a tensor outside its network) gives its network child an output
    hook, first in line so it sees the caller's inputs before the dispatch hooks move them; none on one device."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
            self.register_buffer("scale", torch.tensor(2.0))

    wrapper = Wrapper()
    dispatch_model(wrapper, {"net": "cpu", "scale": "cpu"}, main_device="meta")
    before = (len(wrapper.net._forward_pre_hooks), len(wrapper.net._forward_hooks))
    assert before == (1, 1)  # the dispatch's weight hook ("cpu" weights, "meta" execution)
    hook_network_children(wrapper)  # one execution device: nothing to restore
    assert (len(wrapper.net._forward_pre_hooks), len(wrapper.net._forward_hooks)) == before
    wrapper.hf_device_map = {"net": "cpu", "scale": 1}  # as if `scale` lived on a second GPU (no CUDA touched)
    hook_network_children(wrapper)
    first = next(iter(wrapper.net._forward_pre_hooks.values()))
    assert isinstance(first.__self__, RootHook) and first.__self__.restore_outputs
    assert (len(wrapper.net._forward_pre_hooks), len(wrapper.net._forward_hooks)) == (2, 2)
    remove_dispatch(wrapper)
    assert not wrapper.net._forward_pre_hooks and not wrapper.net._forward_hooks  # removed with the dispatch


# ---------------------------------------------------------------------------------------------- untested paths
def test_offload_buffers_reaches_the_plan(tmp_path, bare_ckpt):
    """The strategy plans with its `offload_buffers`: the plain planner's map for each flag (the two differ here, so
    a strategy that drops the flag fails), and predictions equal the plain model's either way."""
    budget = {"cpu": 135_000}  # with the disk stream's reserve (two blocks), the maps of the two flags differ here
    skeleton = GPTModule()
    with init_empty_weights():
        skeleton.configure_model()
    plans = {}
    for offload_buffers in (False, True):
        strategy = BigModelInferenceStrategy(
            max_memory=budget, no_split_module_classes=["Block"], offload_buffers=offload_buffers,
            offload_folder=tmp_path / "off",
        )  # fmt: skip
        outputs = bigmodel_trainer(strategy).predict(GPTModule(), token_loader(), ckpt_path=str(bare_ckpt))
        assert_same(outputs, reference_outputs())
        expected = infer_device_map(
            skeleton, budget, no_split_module_classes=["Block"], offload_buffers=offload_buffers
        )
        assert strategy.plan == expected
        plans[offload_buffers] = expected
    assert plans[False] != plans[True]


class _Evaluated(GPTModule):
    """Logs the mean next-token loss of each batch, computed from the logits."""

    def _loss(self, batch, stage: str) -> torch.Tensor:
        (idx,) = batch
        logits = self.model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        self.log(f"{stage}_loss", loss, batch_size=idx.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        return self._loss(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._loss(batch, "test")


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_and_test_match_stock_lightning(tmp_path, bare_ckpt, stage):
    strategy = BigModelInferenceStrategy(device_map=CPU_DISK_MAP, offload_folder=tmp_path / "off")
    (got,) = getattr(bigmodel_trainer(strategy), stage)(_Evaluated(), token_loader(), ckpt_path=str(bare_ckpt))
    stock = _Evaluated()
    stock.model = plain_gpt()
    (want,) = getattr(stock_trainer(), stage)(stock, token_loader())
    key = "val_loss" if stage == "validate" else "test_loss"
    with torch.no_grad():  # and by hand, batch by batch (equal batch sizes: the mean of the means)
        model, data = plain_gpt(), tokens()
        loss = nn.functional.cross_entropy
        losses = [loss(model(c[:, :-1]).flatten(0, 1), c[:, 1:].flatten()) for c in data.split(3)]
    assert set(got) == {key} and got[key] == pytest.approx(want[key], abs=1e-6)
    assert got[key] == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    assert strategy.plan == CPU_DISK_MAP


class _Lenient(GPTModule):
    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False


def test_strict_loading_false_accepts_unexpected_keys(tmp_path):
    state = {**plain_gpt().state_dict(), "extra.weight": torch.ones(3)}
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*extra\.weight"):
        bigmodel_trainer(BigModelInferenceStrategy()).predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    outputs = bigmodel_trainer(BigModelInferenceStrategy()).predict(_Lenient(), token_loader(), ckpt_path=str(ckpt))
    assert_same(outputs, reference_outputs())


def test_strict_loading_false_still_refuses_weights_left_on_meta(tmp_path):
    state = {k: v for k, v in plain_gpt().state_dict().items() if "h.3.mlp.c_fc" not in k}
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", state)
    with pytest.raises(RuntimeError, match=r"model\.transformer\.h\.3\.mlp\.c_fc\.weight"):
        bigmodel_trainer(BigModelInferenceStrategy()).predict(_Lenient(), token_loader(), ckpt_path=str(ckpt))
