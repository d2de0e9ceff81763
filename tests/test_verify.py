"""verify: a dispatched model's outputs against a CPU reference streamed block by block from the checkpoint, on
simulated GPUs, with a correct dispatch (passes) and faults planted in one hook (caught and named)."""

from __future__ import annotations

import re

import pytest
import torch
from models import BufferNet, TiedLM, UntiedMLP, example_input, make_reference

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, save_sharded_checkpoint
from lightning_bigmodel import verify as verify_module
from lightning_bigmodel.offload.hooks import WeightHook
from lightning_bigmodel.simulate import simulated_gpus
from lightning_bigmodel.verify import verify_dispatch

simulated = pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the process")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MAPS = {
    UntiedMLP: {"inp": 0, "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": 1, "out": 1},
    TiedLM: {"wte": 0, "blocks.0": "cpu", "blocks.1": 1, "blocks.2": "disk", "ln_f": 1, "head": 1},
    BufferNet: {"a": 0, "mid": "cpu", "b": "disk"},
}


def dispatched(cls, tmp_path, device_map=None):
    checkpoint = save_sharded_checkpoint(make_reference(cls), tmp_path / "ckpt")
    with init_empty_weights():
        model = cls()
    device_map = device_map or MAPS[cls]
    model = load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=tmp_path / "off")
    return model, checkpoint


def weight_hook(model, name: str) -> WeightHook:
    (hook,) = [
        h.__self__
        for module in model.modules()
        for h in module._forward_pre_hooks.values()
        if isinstance(getattr(h, "__self__", None), WeightHook) and h.__self__.name == name
    ]
    return hook


@simulated
@pytest.mark.parametrize("cls", [UntiedMLP, TiedLM, BufferNet])
def test_a_correct_dispatch_passes_and_the_model_is_left_as_it_was(tmp_path, cls):
    reference = make_reference(cls)
    with simulated_gpus(2) as sim:
        model, checkpoint = dispatched(cls, tmp_path)
        x = example_input(cls).to(sim.devices[0])
        hooks_before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        report = verify_dispatch(model, checkpoint, x, no_split_module_classes=["Block"])
        assert report.ok and report.checked >= len(MAPS[cls]), report
        assert str(report).startswith(f"verify: the {report.checked} module outputs of the dispatched model match")
        assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks_before
        with torch.inference_mode():
            got = model(x).cpu()
        with torch.inference_mode():
            for _ in range(2 if cls is BufferNet else 1):  # BufferNet counts its calls: the reference catches up
                want = reference(example_input(cls))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@simulated
def test_a_stale_offloaded_copy_is_caught_and_named_with_its_device(tmp_path):
    with simulated_gpus(2) as sim:
        model, checkpoint = dispatched(UntiedMLP, tmp_path)
        host = weight_hook(model, "blocks.0").entries  # blocks.0 is offloaded to "cpu" and computes on GPU 0
        fc = next(e for e in host if e.host.shape == (32, 16))
        with torch.no_grad():
            fc.host.mul_(0.5)  # the RAM copy no longer matches the checkpoint
        report = verify_dispatch(model, checkpoint, example_input(UntiedMLP).to(sim.devices[0]),
                                 no_split_module_classes=["Block"])  # fmt: skip
    assert not report.ok
    first = report.first
    assert (first.name, first.kind, first.call, first.dtype) == ("blocks.0", "Block", 0, "float32")
    assert first.device == f'"cpu" (computed on {sim.devices[0]})' and first.relative > 1e-2
    assert "module `blocks.0` (Block, call 1) on \"cpu\" (computed on" in str(report)
    assert "every module before it matches" in str(report)


@simulated
def test_a_fault_in_one_hook_on_the_second_gpu_is_caught(tmp_path, monkeypatch):
    with simulated_gpus(2) as sim:
        model, checkpoint = dispatched(TiedLM, tmp_path)
        hook = weight_hook(model, "blocks.2")  # on "disk", computing on GPU 0
        real = hook.fetch
        monkeypatch.setattr(hook, "prefetcher", None)
        monkeypatch.setattr(hook, "fetch", lambda index: real(index).flip(0))  # rows in the wrong order
        report = verify_dispatch(model, checkpoint, example_input(TiedLM).to(sim.devices[1]))
    assert not report.ok and report.first.name.startswith("blocks.2"), report
    assert str(sim.devices[0]) in report.first.device


@simulated
def test_the_reference_streams_one_block_at_a_time(tmp_path, monkeypatch):
    loaded, peak = [0], [0]
    load, unload = verify_module._Loader.load, verify_module._Loader.unload

    def counting_load(self, module, args):
        load(self, module, args)
        loaded[0] += sum(t.numel() for table, attr, _ in self.saved[-1] for t in [table[attr]])
        peak[0] = max(peak[0], loaded[0])

    def counting_unload(self):
        loaded[0] -= sum(table[attr].numel() for table, attr, _ in self.saved[-1])
        unload(self)

    monkeypatch.setattr(verify_module._Loader, "load", counting_load)
    monkeypatch.setattr(verify_module._Loader, "unload", counting_unload)
    with simulated_gpus(2) as sim:
        model, checkpoint = dispatched(UntiedMLP, tmp_path)
        report = verify_dispatch(model, checkpoint, example_input(UntiedMLP).to(sim.devices[0]),
                                 no_split_module_classes=["Block"])  # fmt: skip
    block = sum(p.numel() for p in make_reference(UntiedMLP).blocks[0].parameters())
    total = sum(p.numel() for p in make_reference(UntiedMLP).parameters())
    assert report.ok and loaded[0] == 0
    assert peak[0] <= block + 16 < total  # one block (its layer norm's buffers aside), never the model


@needs_cuda
@pytest.mark.parametrize("cls", [UntiedMLP, TiedLM, BufferNet])
def test_verify_passes_a_cuda_split_with_cpu_and_disk_offload_and_prefetch(tmp_path, cls):
    """The twin of the simulated tests on a real GPU: GPU 0 plus "cpu" and "disk" entries (prefetched on a side
    stream after the first forward), checked on the second call too."""
    device_map = {key: (0 if value == 1 else value) for key, value in MAPS[cls].items()}
    model, checkpoint = dispatched(cls, tmp_path, device_map)
    x = example_input(cls).cuda()
    for _ in range(2):
        report = verify_dispatch(model, checkpoint, x, no_split_module_classes=["Block"])
        assert report.ok, report


def test_verify_refuses_quantized_weights(tmp_path):
    pytest.importorskip("torchao")
    reference = make_reference(UntiedMLP)
    checkpoint = save_sharded_checkpoint(reference, tmp_path / "ckpt")
    with init_empty_weights():
        model = UntiedMLP()
    load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"}, quantization="int8")
    with pytest.raises(ValueError, match="verify compares with the checkpoint's float weights.*quantized"):
        verify_dispatch(model, checkpoint, example_input(UntiedMLP))


# ---------------------------------------------------------------------- the strategy's `verify=True`
TRAINER_MAP = {"model.transformer.wte": 0, "model.transformer.wpe": 0, "model.transformer.h.0": 0,
               "model.transformer.h.1": 1, "model.transformer.h.2": "cpu", "model.transformer.h.3": "disk",
               "model.transformer.ln_f": 1, "model.lm_head": 0}  # fmt: skip


def _predict_with_verify(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning_models import GPTModule, plain_gpt, token_loader, write_bare_checkpoint

    from lightning_bigmodel import BigModelInferenceStrategy

    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy(device_map=TRAINER_MAP, offload_folder=tmp_path / "offload", verify=True,
                                         no_split_module_classes=["Block"])  # fmt: skip
    trainer = pl.Trainer(accelerator="gpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    return trainer.predict(GPTModule(), token_loader(), ckpt_path=str(checkpoint))


@simulated
def test_strategy_verify_passes_a_correct_dispatch_and_predicts_as_usual(tmp_path, caplog):
    from lightning_models import reference_outputs

    with simulated_gpus(2), caplog.at_level("INFO"):
        outputs = _predict_with_verify(tmp_path)
    for got, want in zip(outputs, reference_outputs(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("module outputs of the dispatched model match the CPU reference" in m for m in messages), messages


@simulated
def test_strategy_verify_stops_on_a_stale_copy_naming_the_block_and_its_device(tmp_path, monkeypatch):
    real = WeightHook.fetch

    def stale(self, index):  # the offloaded "cpu" block's copy on the GPU is not what its weights say
        copy = real(self, index)
        return copy * 0.5 if self.name == "transformer.h.2" else copy

    monkeypatch.setattr(WeightHook, "fetch", stale)
    with simulated_gpus(2) as sim, pytest.raises(RuntimeError) as info:
        _predict_with_verify(tmp_path)
    message = str(info.value)
    assert message.startswith("verify: module `model.transformer.h.2` (Block, call 1) on \"cpu\" (computed on "
                              f"{sim.devices[0]}) diverges from the CPU reference"), message  # fmt: skip
    assert "Stopped before writing predictions" in message


def test_strategy_verify_with_quantization_is_refused_at_once():
    pytest.importorskip("lightning.pytorch")
    from lightning_bigmodel import BigModelInferenceStrategy

    with pytest.raises(ValueError, match="`verify=True` compares with the checkpoint's float weights"):
        BigModelInferenceStrategy(verify=True, quantization="int8")


# ---------------------------------------------------------------------- `lightning-bigmodel verify --config ...`
def test_verify_command_checks_the_first_batch_of_a_config_and_writes_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("jsonargparse")
    from pathlib import Path

    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel.pl.cli import main

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(123)
    save_sharded_checkpoint(GPT(GPTConfig.preset("tiny")).eval(), tmp_path / "ckpt", max_shard_size="40KB")
    monkeypatch.chdir(tmp_path)
    main(["verify", "--config", str(root / "configs" / "gpt_tiny.yaml"), "--ckpt_path", str(tmp_path / "ckpt"),
          "--model.init_args.random_checkpoint_dir", "null"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"verify: the \d+ module outputs of the dispatched model match the CPU reference", out), out
    assert not (tmp_path / "runs" / "gpt_tokens.pt").exists()  # the config's prediction writer was left out


def test_verify_from_the_yaml_strategy_settings_of_a_predict_run(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse")
    from pathlib import Path

    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel.pl.cli import predict

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(123)
    save_sharded_checkpoint(GPT(GPTConfig.preset("tiny")).eval(), tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    cli = predict(["--config", str(root / "configs" / "gpt_tiny.yaml"), "--ckpt_path", str(tmp_path / "ckpt"),
                   "--model.init_args.random_checkpoint_dir", "null", "--trainer.strategy.init_args.verify", "true"])
    report = cli.trainer.strategy.verify_report
    assert report.ok and report.checked > 0, report
    assert (tmp_path / "runs" / "gpt_tokens.pt").exists()  # a predict run with verify still writes its predictions


@simulated
def test_verify_a_transformers_llama_split_over_simulated_gpus_and_cpu(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    checkpoint = save_sharded_checkpoint(transformers.LlamaForCausalLM(config).eval(), tmp_path / "ckpt")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 1,
                  "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}  # fmt: skip
    with simulated_gpus(2) as sim:
        with init_empty_weights():
            model = transformers.LlamaForCausalLM(config)
        load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map)
        ids = torch.arange(10).reshape(2, 5).to(sim.devices[0])
        report = verify_dispatch(model, checkpoint, ids, no_split_module_classes=["LlamaDecoderLayer"])
    assert report.ok and report.checked >= 7, report  # embeddings, 3 layers, norm, rotary, head (ModelOutput inside)
