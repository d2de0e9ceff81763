"""Quantized loading (torchao int8) on cpu and cpu+disk maps, checked against torchao's own ``quantize_`` of the plainly
loaded model (equal outputs) and against float32 (within a stated tolerance); the offload folder keyed by quantization;
planned sizes; and the bad input refused before any weight is read."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import (
    BigModelInferenceStrategy,
    DeviceMapCallback,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from lightning_bigmodel.checkpoint.loading import load_checkpoint_in_model
from lightning_bigmodel.checkpoint.reader import CheckpointReader
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.offload import disk
from lightning_bigmodel.offload.placement import DISPATCH_STATE, is_disk
from lightning_bigmodel.offload.subclass import stored_nbytes
from lightning_bigmodel.planning.device_map import infer_device_map, tensor_devices
from lightning_bigmodel.planning.sizes import compute_module_sizes
from tests.lightning_models import GPTModule, bigmodel_trainer, token_loader, tokens

# About half of these tests need torchao (they quantize); the refusals, the planning and the error naming the extra do
# not, and run without it.
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason='needs torchao (pip install "lightning-bigmodel[quantization]")',
)


def torchao_quantization():
    """``torchao.quantization``, imported when a test needs it (skips that test without torchao)."""
    return pytest.importorskip("torchao.quantization")

# int8 weight-only (per output row) against float32 on this tiny GPT: measured ~0.2% relative L2 error of the logits.
FP32_TOLERANCE = 1e-2
PRESET = "tiny"
N_LAYER = GPTConfig.preset(PRESET).n_layer
MAPS = {
    "cpu": {"": "cpu"},
    "cpu+disk": {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
        "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "disk", "lm_head": "cpu",
    },
    "disk": {"": "disk"},
}  # fmt: skip


def plain_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset(PRESET)).eval()


def torchao_int8(model: nn.Module) -> nn.Module:
    """The reference: torchao's own ``quantize_`` on a copy of the loaded model, block linears only (the tied
    ``lm_head`` is the embedding and stays float, as in our default)."""
    quantized = copy.deepcopy(model)
    torchao_quantization().quantize_(
        quantized,
        torchao_quantization().Int8WeightOnlyConfig(),
        filter_fn=_is_block_linear,
    )
    return quantized


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("transformer.h.")


def empty_gpt() -> GPT:
    with init_empty_weights():
        return GPT(GPTConfig.preset(PRESET)).eval()


def logits(model: nn.Module, x: torch.Tensor = None) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens() if x is None else x)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def ckpt(tmp_path):
    return _write(tmp_path / "ckpt", plain_gpt(), safe=True)


def _write(folder, model, safe):
    save_sharded_checkpoint(model, folder, max_shard_size=40_000, safe_serialization=safe)
    return folder


def _commits(monkeypatch) -> list[str]:
    """Names of the offload files written from now on (the folder's own test seam), manifest excluded."""
    written: list[str] = []

    def seam(stage, path):
        if stage == "committed" and path.name != disk.MANIFEST:
            written.append(path.name.removesuffix(".safetensors"))

    monkeypatch.setattr(disk, "_fault_point", seam)
    return written


@needs_torchao
@pytest.mark.parametrize("where", list(MAPS))
def test_int8_dispatch_equals_torchao_and_stays_close_to_fp32(tmp_path, ckpt, where):
    plain = plain_gpt()
    model = load_checkpoint_and_dispatch(
        empty_gpt(), ckpt, device_map=MAPS[where], offload_folder=tmp_path / "offload", quantization="int8"
    )
    out = logits(model)
    assert torch.equal(out, logits(torchao_int8(plain)))
    assert relative_error(out, logits(plain)) < FP32_TOLERANCE
    weight = model.transformer.h[1].mlp.c_fc.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    assert is_disk(weight) == (where != "cpu")  # disk weights stay quantized: views of the offload files
    if where != "cpu":  # the disk read-ahead works on their int8 inner views
        read_ahead = model.__dict__[DISPATCH_STATE].prefetcher
        assert any(t.dtype == torch.int8 for ts in read_ahead._tensors.values() for t in ts)
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.transformer.wte.weight
    assert type(model.transformer.h[0].ln_1.weight) is nn.Parameter
    plain_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    assert sum(stored_nbytes(p) for p in model.parameters()) < 0.6 * plain_bytes  # embeddings stay fp32


@needs_torchao
def test_int8_after_a_cast_from_a_bin_checkpoint(tmp_path):
    """Quantizing happens after the cast: bf16 weights quantized while streaming equal torchao on the bf16 model."""
    plain = plain_gpt()
    ckpt = _write(tmp_path / "ckpt", plain, safe=False)
    model = empty_gpt()
    load_checkpoint_in_model(
        model, ckpt, device_map=MAPS["cpu+disk"], dtype=torch.bfloat16, offload_folder=tmp_path / "off",
        quantization="int8",
    )
    reference = torchao_int8(copy.deepcopy(plain).to(torch.bfloat16))
    assert model.transformer.h[2].attn.c_attn.weight.dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(reference))


@needs_torchao
def test_offload_folder_is_reused_per_quantization_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    plain = plain_gpt()
    ckpt = _write(tmp_path / "ckpt", plain, safe=False)  # .bin: unquantized disk tensors are written too
    folder = tmp_path / "offload"
    written = _commits(monkeypatch)
    quantized = {f"transformer.h.{i}.{m}.weight" for i in range(N_LAYER) for m in ("attn.c_attn", "attn.c_proj",
                                                                                 "mlp.c_fc", "mlp.c_proj")}

    def load(**kwargs):
        written.clear()
        model = load_checkpoint_and_dispatch(
            empty_gpt(), ckpt, device_map=MAPS["disk"], offload_folder=folder, **kwargs
        )
        return logits(model), set(written)

    first, files = load(quantization="int8")
    assert quantized <= files and len(files) > len(quantized)  # biases, norms, embeddings written plain
    again, files = load(quantization="int8")
    assert files == set() and torch.equal(again, first)  # same checkpoint, same quantization: all reused
    fp32, files = load()
    assert files == quantized and torch.equal(fp32, logits(plain))  # only the quantized ones are rebuilt
    skip_h0, files = load(quantization="int8", quantization_skip_modules=["transformer.h.0"])
    assert files == {name for name in quantized if not name.startswith("transformer.h.0.")}  # h.0: fp32 reused
    reference = copy.deepcopy(plain)
    torchao_quantization().quantize_(
        reference,
        torchao_quantization().Int8WeightOnlyConfig(),
        filter_fn=lambda m, fqn: _is_block_linear(m, fqn) and not fqn.startswith("transformer.h.0."),
    )
    assert torch.equal(skip_h0, logits(reference))
    manifest = json.loads((folder / disk.MANIFEST).read_text())["tensors"]
    assert manifest["transformer.h.1.mlp.c_fc.weight"]["form"]["quantization"] == "int8"
    assert "form" not in manifest["transformer.h.0.mlp.c_fc.weight"]


@needs_torchao
def test_planned_sizes_are_the_bytes_placed(tmp_path, ckpt):
    """The planner's int8 sizes equal what an int8 load really holds, block by block."""
    planned = compute_module_sizes(empty_gpt(), quantization="int8")
    model = load_checkpoint_and_dispatch(empty_gpt(), ckpt, device_map=MAPS["cpu"], quantization="int8")
    for i in range(N_LAYER):
        block = model.transformer.h[i]
        held = sum(stored_nbytes(t) for t in [*block.parameters(), *block.buffers()])
        assert planned[f"transformer.h.{i}"] == held
    assert compute_module_sizes(model)["transformer.h.0"] == held  # a loaded model counts its quantized bytes
    rows, cols = model.transformer.h[0].mlp.c_fc.weight.shape
    assert planned["transformer.h.0.mlp.c_fc.weight"] == rows * cols + rows * 5  # int8 data, fp32 scale, int8 zero
    assert compute_module_sizes(empty_gpt())["transformer.h.0.mlp.c_fc.weight"] == rows * cols * 4


def test_int8_plan_puts_more_layers_in_ram():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("small"))
    budget = {"cpu": compute_module_sizes(model)[""] // 2}
    fp32 = infer_device_map(model, max_memory=budget, no_split_module_classes=["Block"])
    int8 = infer_device_map(model, max_memory=budget, no_split_module_classes=["Block"], quantization="int8")
    on_disk = lambda plan: sorted(key for key, device in plan.items() if device == "disk")  # noqa: E731
    assert len(on_disk(int8)) < len(on_disk(fp32)) and on_disk(fp32)


def test_plan_command_sizes_quantized_weights(capsys):
    pytest.importorskip("jsonargparse")
    from lightning_bigmodel.pl.cli import plan

    args = ["--model", "examples.gpt.GPT", "--model.config", '{"class_path": "examples.gpt.GPTConfig"}',
            "--max_memory", '{"cpu": "250MB"}', "--no_split_module_classes", '["Block"]']  # fmt: skip
    fp32 = plan(args)
    fp32_out = capsys.readouterr().out
    int8 = plan(args + ["--quantization", "int8"])
    int8_out = capsys.readouterr().out
    assert "int8 weights" in int8_out and "int8" not in fp32_out
    with torch.device("meta"):
        model = GPT(GPTConfig())

    def blocks_on_disk(plan) -> int:
        devices = tensor_devices(model, plan)
        return sum(devices[f"transformer.h.{i}.ln_1.weight"] == "disk" for i in range(model.config.n_layer))

    assert 0 < blocks_on_disk(int8) < blocks_on_disk(fp32)


@pytest.fixture
def no_weight_read(monkeypatch):
    """Fail the test if any tensor data is read from the checkpoint."""

    def refuse(self, key, *args, **kwargs):
        raise AssertionError(f"tensor {key!r} was read before the bad input was refused")

    for method in ("read", "borrow", "mmap_view"):
        monkeypatch.setattr(CheckpointReader, method, refuse)


def _refuse_opening(monkeypatch) -> None:
    def refuse(self, checkpoint, *args, **kwargs):
        raise AssertionError(f"checkpoint {checkpoint!r} was opened before the bad input was refused")

    monkeypatch.setattr(CheckpointReader, "__init__", refuse)


@pytest.fixture
def not_opened(monkeypatch):
    """Fail the test if the checkpoint is even opened (a ``.bin`` shard is unpickled when opened)."""
    _refuse_opening(monkeypatch)


def _assert_untouched(model: nn.Module) -> None:
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("bad", ["int3", "nf4", "fp8"])
def test_unknown_quantization_is_refused_before_reading(ckpt, not_opened, bad):
    model = empty_gpt()
    with pytest.raises(ValueError, match=rf"`quantization`='{bad}' is not supported.*'int8', 'int4'"):
        load_checkpoint_and_dispatch(model, ckpt, device_map=MAPS["cpu"], quantization=bad)
    _assert_untouched(model)
    with pytest.raises(ValueError, match="not supported"):
        BigModelInferenceStrategy(quantization=bad)


def test_int4_without_a_kernel_on_the_cpu_is_refused_before_reading(ckpt, not_opened):
    model = empty_gpt()
    with pytest.raises(ValueError, match=r"'int4'.*no torchao kernel for execution device\(s\) \['cpu'\].*'int8'"):
        load_checkpoint_and_dispatch(model, ckpt, device_map=MAPS["cpu+disk"], quantization="int4")
    _assert_untouched(model)


@needs_torchao
@pytest.mark.parametrize("how", ["config", "gptq", "int8_scales"])
def test_already_quantized_checkpoint_is_refused_before_reading(tmp_path, how, no_weight_read, monkeypatch):
    from safetensors.torch import save_file

    state = {k: v for k, v in plain_gpt().state_dict().items() if k != "lm_head.weight"}
    folder = tmp_path / how
    folder.mkdir()
    if how == "config":
        (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    elif how == "gptq":
        weight = state.pop("transformer.h.0.mlp.c_fc.weight")
        packed = torch.zeros(weight.shape[1] // 8, weight.shape[0], dtype=torch.int32)
        state["transformer.h.0.mlp.c_fc.qweight"] = packed
        state["transformer.h.0.mlp.c_fc.scales"] = torch.ones(1, weight.shape[0], dtype=torch.float16)
    else:
        state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].to(torch.int8)
        state["transformer.h.0.mlp.c_fc.weight_scale"] = torch.ones(128, 1)
    save_file(state, str(folder / "model.safetensors"))
    if how == "config":  # refused from config.json alone, before the checkpoint is opened
        _refuse_opening(monkeypatch)
    model = empty_gpt()
    with pytest.raises(ValueError, match=r"already quantized.*unquantized"):
        load_checkpoint_and_dispatch(model, folder, device_map=MAPS["cpu"], quantization="int8")
    _assert_untouched(model)


def test_missing_torchao_names_the_extra(ckpt, monkeypatch, not_opened):
    from lightning_bigmodel.integrations.quantization import torchao as integration

    monkeypatch.setattr(integration, "torchao_version", lambda: None)
    model = empty_gpt()
    with pytest.raises(ImportError, match=r'pip install "lightning-bigmodel\[quantization\]"'):
        load_checkpoint_and_dispatch(model, ckpt, device_map=MAPS["cpu"], quantization="int8")
    _assert_untouched(model)


def test_quantized_spill_to_disk_needs_an_offload_folder(ckpt):
    with torch.device("meta"):
        model = GPT(GPTConfig.preset(PRESET))
    budget = {"cpu": compute_module_sizes(model, quantization="int8")[""] // 2}
    with pytest.raises(ValueError, match=r"quantized model.*written once to an offload folder.*`offload_folder=`"):
        load_checkpoint_and_dispatch(empty_gpt(), ckpt, device_map="auto", max_memory=budget, quantization="int8",
                                     no_split_module_classes=["Block"])  # fmt: skip


@needs_torchao
def test_trainer_predict_int8_cpu_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = plain_gpt()
    ckpt = _write(tmp_path / "ckpt", plain, safe=True)
    strategy = BigModelInferenceStrategy(
        device_map={f"model.{key}": device for key, device in MAPS["cpu+disk"].items()},
        offload_folder=tmp_path / "offload",
        checkpoint=ckpt,
        quantization="int8",
    )
    trainer = bigmodel_trainer(strategy)
    batches = trainer.predict(GPTModule(), token_loader())
    reference = torchao_int8(plain)
    with torch.inference_mode():
        expected = [reference(idx) for (idx,) in token_loader()]
    assert all(torch.equal(out, ref) for out, ref in zip(batches, expected, strict=True))
    assert type(strategy.lightning_module.model.transformer.h[1].attn.c_attn.weight).__name__ == "Int8Tensor"
    (callback,) = [c for c in trainer.callbacks if isinstance(c, DeviceMapCallback)]  # its table shows int8 sizes
    planned = compute_module_sizes(empty_gpt(), quantization="int8")
    assert callback.module_sizes["model.transformer.h.1"] == planned["transformer.h.1"]


@needs_torchao
def test_dispatching_a_model_quantized_in_memory_to_disk(tmp_path):
    """A model quantized by torchao in memory, dispatched with disk entries: written as its inner tensors, kept int8."""
    model = torchao_int8(plain_gpt())
    expected = logits(model)
    dispatch_model(model, MAPS["cpu+disk"], offload_folder=tmp_path / "offload")
    weight = model.transformer.h[2].mlp.c_proj.weight
    assert is_disk(weight) and type(weight).__name__ == "Int8Tensor"
    assert torch.equal(logits(model), expected)


@needs_torchao
def test_cli_yaml_predict_with_int8(tmp_path, monkeypatch):
    """The YAML job with `quantization: int8` on the strategy (given on the command line here) generates the tokens of
    the plain model quantized by torchao; on a budget where float32 spills to disk."""
    pytest.importorskip("jsonargparse")
    from examples.gpt_generate import random_prompts
    from lightning_bigmodel.pl.cli import main
    from tests.test_cli import ROOT

    torch.manual_seed(123)
    reference = GPT(GPTConfig.preset("tiny")).eval()
    save_sharded_checkpoint(reference, tmp_path / "ckpt", max_shard_size="40KB")
    monkeypatch.chdir(tmp_path)
    main(["predict", "--config", str(ROOT / "configs" / "gpt_tiny.yaml"), "--ckpt_path", str(tmp_path / "ckpt"),
          "--model.init_args.random_checkpoint_dir", "null", "--trainer.strategy.init_args.quantization", "int8",
          "--trainer.strategy.init_args.max_memory", '{"cpu": "60KB"}'])  # fmt: skip
    tokens = torch.load(tmp_path / "runs" / "gpt_tokens.pt")
    prompts = random_prompts(reference.config.vocab_size, 4, 8)
    with torch.inference_mode():
        assert torch.equal(tokens, torchao_int8(reference).generate(prompts, max_new_tokens=10))
    manifest = json.loads((tmp_path / "runs" / "offload" / disk.MANIFEST).read_text())["tensors"]
    assert any(entry.get("form", {}).get("quantization") == "int8" for entry in manifest.values())


@needs_torchao
def test_release_on_teardown_then_predict_again_requantizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = plain_gpt()
    ckpt = _write(tmp_path / "ckpt", plain, safe=True)
    strategy = BigModelInferenceStrategy(device_map={"model": "cpu"}, checkpoint=ckpt, quantization="int8",
                                         release_on_teardown=True)  # fmt: skip
    module, trainer = GPTModule(), bigmodel_trainer(strategy)
    first = trainer.predict(module, token_loader())
    assert module.model.transformer.h[0].mlp.c_fc.weight.is_meta  # released: back to a plain meta tensor
    second = trainer.predict(module, token_loader())
    with torch.inference_mode():
        expected = [torchao_int8(plain)(idx) for (idx,) in token_loader()]
    assert all(torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(first, second, expected, strict=True))


def test_quantization_without_a_checkpoint_is_refused(tmp_path, monkeypatch):
    from tests.lightning_models import PlainGPTModule

    monkeypatch.chdir(tmp_path)
    strategy = BigModelInferenceStrategy(device_map={"model": "cpu"}, quantization="int8")
    with pytest.raises(ValueError, match=r"quantizes weights while a checkpoint streams in, but no checkpoint"):
        bigmodel_trainer(strategy).predict(PlainGPTModule(), token_loader())


@needs_torchao
@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the rest of the process")
def test_int8_on_simulated_gpus_with_cpu_and_disk_offload(tmp_path):
    """GPU paths on the CPU: int8 weights resident on two simulated GPUs, CPU-offloaded ones copied in as int8 by the
    hooks (then by the prefetcher), disk ones staged part by part; outputs equal torchao's on the plain model."""
    from lightning_bigmodel.simulate import simulated_gpus

    plain = plain_gpt()
    ckpt = _write(tmp_path / "ckpt", plain, safe=True)
    device_map = {
        "transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": 1,
        "transformer.h.2": "cpu", "transformer.h.3": "disk", "transformer.ln_f": 1, "lm_head": 0,
    }  # fmt: skip
    x = tokens()
    expected = logits(torchao_int8(plain), x)
    with simulated_gpus(2) as sim:
        model = load_checkpoint_and_dispatch(
            empty_gpt(), ckpt, device_map=device_map, offload_folder=tmp_path / "offload", quantization="int8"
        )
        resident = model.transformer.h[1].mlp.c_fc.weight
        assert type(resident).__name__ == "Int8Tensor" and resident.qdata.device == sim.devices[1]
        on_gpu_1 = [*model.transformer.h[1].parameters(), *model.transformer.h[1].buffers(),
                    *model.transformer.ln_f.parameters()]  # fmt: skip
        assert sim.memory_allocated(1) == sum(stored_nbytes(t) for t in on_gpu_1)  # int8 bytes on the GPU
        first, second = logits(model, x), logits(model, x)  # the second forward is prefetched
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert type(model.transformer.h[2].attn.c_attn.weight).__name__ == "Int8Tensor"  # back on the host, still int8


@needs_torchao
@pytest.mark.parametrize("name", ["llama", "mixtral", "bert"])
def test_hub_model_int8_through_transformers_conversion(tmp_path, name):
    """The quantizing step runs after transformers' conversion rules (Mixtral's experts are merged while streaming):
    cpu+disk int8 equals torchao's ``quantize_`` on the model transformers loads itself. Fused 3-D expert weights
    are not ``nn.Linear``: they stay float, as ``quantize_`` leaves them."""
    pytest.importorskip("transformers")
    from tests.hub_zoo import outputs_of, save_hub_model
    from tests.test_hub_zoo import disk_map

    hub = save_hub_model(name, tmp_path / name)
    with init_empty_weights():
        model = hub.cls(hub.config).eval()
    load_checkpoint_and_dispatch(
        model, hub.folder, device_map=disk_map(model), offload_folder=tmp_path / "off", quantization="int8"
    )
    reference = copy.deepcopy(hub.reference)
    torchao_quantization().quantize_(
        reference,
        torchao_quantization().Int8WeightOnlyConfig(),
        filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and not fqn.endswith("lm_head"),
    )
    inputs = hub.inputs()
    with torch.inference_mode():
        out, expected = outputs_of(model(**inputs)), outputs_of(reference(**inputs))
    assert torch.equal(out, expected)
    quantized = [p for p in model.parameters() if type(p).__name__ == "Int8Tensor"]
    assert quantized and any(is_disk(p) for p in quantized) and not all(is_disk(p) for p in quantized)
