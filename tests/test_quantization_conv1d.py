"""int8 on transformers' GPT-2, whose linear layers are ``Conv1D`` (weight stored ``(in, out)``), and the one line a
quantization request says about what it quantized and what it left untouched."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lightning_bigmodel import (
    compute_module_sizes,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    save_sharded_checkpoint,
)
from lightning_bigmodel.integrations.quantization import resolve_quantization
from lightning_bigmodel.integrations.quantization.report import quantization_report

transformers = pytest.importorskip("transformers")
torchao_quantization = pytest.importorskip("torchao.quantization")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONFIG = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
CONV1D_PER_BLOCK = 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


def plain_gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()


def empty_gpt2() -> nn.Module:
    with init_empty_weights():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def torchao_reference(model: nn.Module) -> nn.Module:
    """Each block's Conv1D as the nn.Linear it is (weight transposed), quantized by torchao's own ``quantize_``."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, linear)
    in_blocks = lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("transformer.h.")  # noqa: E731
    # the blocks only: the lm_head is tied to the embedding and stays float
    torchao_quantization.quantize_(reference, torchao_quantization.Int8WeightOnlyConfig(), filter_fn=in_blocks)
    return reference


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % CONFIG["vocab_size"]
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("where", ["cpu", "cpu+disk"])
def test_int8_quantizes_gpt2_conv1d_and_equals_torchao_on_the_linear_form(tmp_path, where, caplog):
    plain = plain_gpt2()
    checkpoint = save_sharded_checkpoint(plain, tmp_path / "ckpt")
    device_map = {"": "cpu"} if where == "cpu" else {"transformer.wte": "cpu", "transformer.wpe": "cpu",
        "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lightning_bigmodel"):
        model = load_checkpoint_and_dispatch(
            empty_gpt2(), checkpoint, device_map=device_map, offload_folder=tmp_path / "off", quantization="int8"
        )
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Int8Tensor"]
    assert len(quantized) == CONV1D_PER_BLOCK * CONFIG["n_layer"], quantized
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)  # still a Conv1D, computing with (out, in)
    got, fp32 = logits(model), logits(plain)
    torch.testing.assert_close(got, logits(torchao_reference(plain)), rtol=0, atol=0)
    assert not torch.equal(got, fp32)  # it did quantize: int8 logits differ from float32 ...
    assert (got - fp32).norm() / fp32.norm() < 1e-2  # ... and stay close
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lightning_bigmodel.quantization"]
    assert f"{CONV1D_PER_BLOCK * CONFIG['n_layer']} weight(s) quantized (Conv1D x8;" in line, line
    assert "Embedding x2" in line and "embeddings are never quantized" in line, line


def test_plan_sizes_gpt2_conv1d_at_their_int8_bytes():
    model = empty_gpt2()
    fp32, int8 = compute_module_sizes(model), compute_module_sizes(model, quantization="int8")
    weight = "transformer.h.0.attn.c_attn.weight"  # (in=32, out=96): int8 data plus a scale and zero point per row
    assert fp32[weight] == 32 * 96 * 4 and int8[weight] == 32 * 96 + 96 * 5
    assert int8[""] < fp32[""]


def test_reload_after_release_quantizes_conv1d_again(tmp_path):
    from lightning_bigmodel.pl.loader import release

    plain = plain_gpt2()
    checkpoint = save_sharded_checkpoint(plain, tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(empty_gpt2(), checkpoint, device_map={"": "cpu"}, quantization="int8")
    first = logits(model)
    release(model)  # weights back to meta, as the strategy's teardown does
    load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"}, quantization="int8")
    torch.testing.assert_close(logits(model), first, rtol=0, atol=0)


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(8, 8, 3)


def test_a_request_that_finds_nothing_says_so_with_the_types_and_bytes_left():
    line, warn = quantization_report(NoLinear(), resolve_quantization("int8"))
    assert warn
    assert line.startswith("quantization='int8': found no weight to quantize"), line
    assert "Conv2d x1 (0.0 MiB: not a linear layer torchao quantizes)" in line and "Embedding x1" in line, line


def test_nothing_to_quantize_is_logged_as_a_warning_when_loading(tmp_path, caplog):
    model = NoLinear()
    checkpoint = save_sharded_checkpoint(model, tmp_path / "ckpt")
    with init_empty_weights():
        empty = NoLinear()
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel"):
        load_checkpoint_and_dispatch(empty, checkpoint, device_map={"": "cpu"}, quantization="int8")
    (record,) = [r for r in caplog.records if r.name == "lightning_bigmodel.quantization"]
    assert record.levelno == logging.WARNING and "found no weight to quantize" in record.getMessage()


def test_plan_command_shows_what_int8_quantizes_in_gpt2(capsys):
    pytest.importorskip("jsonargparse")
    from lightning_bigmodel.pl.cli import plan

    config = '{"class_path": "transformers.GPT2Config", "init_args": {"n_embd": 32, "n_layer": 2, "n_head": 2}}'
    plan(["--model", "transformers.GPT2LMHeadModel", "--model.config", config, "--max_memory", '{"cpu": "1GB"}',
          "--quantization", "int8"])  # fmt: skip
    out = capsys.readouterr().out
    assert "quantization='int8': 8 weight(s) quantized (Conv1D x8;" in out, out
    assert "left in the compute dtype: Embedding x2" in out, out
