"""Quantization requests without torchao: names, which weights, their bytes, already quantized checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_bigmodel.integrations.quantization import (
    QuantizationSpec,
    quantized_nbytes,
    quantized_weights,
    resolve_quantization,
)
from lightning_bigmodel.integrations.quantization.prequantized import check_not_prequantized
from lightning_bigmodel.offload.subclass import decode_context, encode_context
from tests.models import meta_gpt


@pytest.mark.parametrize("bad", ["int3", "INT8x", "fp8", 8, ""])
def test_unknown_name_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match=r"`quantization`=.*not supported.*\['int8', 'int4'\]"):
        resolve_quantization(bad)


def test_names_and_skip_lists():
    assert resolve_quantization(None) is None
    assert resolve_quantization(" Int8 ") == QuantizationSpec("int8", ("lm_head",))
    assert resolve_quantization("int4", []).skip_modules == ()
    with pytest.raises(ValueError, match="`quantization_skip_modules`.*without `quantization`"):
        resolve_quantization(None, ["lm_head"])
    with pytest.raises(ValueError, match="must be a list of module names"):
        resolve_quantization("int8", "lm_head")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 64)
        self.attn = nn.MultiheadAttention(64, 2)  # its out_proj is a NonDynamicallyQuantizableLinear
        self.body = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.odd = nn.Linear(100, 8)  # 100 input features: no int4 group of 128 fits
        self.lm_head = nn.Linear(64, 10, bias=False)
        self.tied = nn.Linear(64, 10, bias=False)
        self.tied.weight = self.emb.weight


def test_which_weights_are_quantized():
    with torch.device("meta"):
        net = _Net()
    int8 = quantized_weights(net, resolve_quantization("int8"))
    assert int8 == {"body.0.weight": (64, 64), "body.1.weight": (64, 64), "odd.weight": (8, 100)}
    asked_head = quantized_weights(net, resolve_quantization("int8", []))
    assert set(asked_head) == set(int8) | {"lm_head.weight"}  # the tied one never: it is the embedding
    skipped = quantized_weights(net, resolve_quantization("int8", ["body.1", "odd"]))
    assert set(skipped) == {"body.0.weight", "lm_head.weight"}  # a list given replaces the default ["lm_head"]
    assert quantized_weights(net, resolve_quantization("int4")) == {}  # 64 and 100 are not multiples of 128
    assert quantized_weights(net, None) == {}


def test_gpt_quantizes_the_block_linears_only():
    model = meta_gpt("tiny")
    names = quantized_weights(model, resolve_quantization("int8"))
    assert len(names) == 4 * model.config.n_layer
    assert all(name.startswith("transformer.h.") and name.endswith(".weight") for name in names)


def test_bytes_per_quantized_weight():
    int8 = resolve_quantization("int8")
    assert quantized_nbytes(int8, 3072, 768) == 3072 * 768 + 3072 * 5  # int8 data, fp32 scale, int8 zero point
    int4 = resolve_quantization("int4")
    # tinygemm pads 768 input features to 1024; 6 groups of 128 ... of the padded width: 8 groups
    assert quantized_nbytes(int4, 3072, 768) == 3072 * 1024 // 2 + 8 * 3072 * 4


def test_context_round_trip_for_offload_manifests():
    context = {"block_size": [1, 64], "dtype": torch.bfloat16, "act_quant_kwargs": None, "reduce_range": False}
    encoded = encode_context(context)
    assert json.loads(json.dumps(encoded)) == encoded
    assert decode_context(encoded) == context
    with pytest.raises(TypeError, match="cannot store"):
        encode_context({"granularity": object()})


def test_config_json_quantization_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ValueError, match=r"already quantized.*quant_method 'gptq'.*unquantized"):
        check_not_prequantized(tmp_path, [("h.0.weight", torch.float16)], "ckpt")


@pytest.mark.parametrize(
    "keys, shown",
    [
        ({"h.0.qweight": torch.int32, "h.0.qzeros": torch.int32, "h.0.scales": torch.float16}, "GPTQ/AWQ"),
        ({"h.0.weight": torch.int8, "h.0.SCB": torch.float32}, "bitsandbytes int8"),
        ({"h.0.weight": torch.uint8, "h.0.weight.absmax": torch.float32}, "bitsandbytes 4-bit"),
        ({"h.0.weight": torch.int8, "h.0.scale": torch.float32}, "int8 weight with scales"),
        ({"h.0.weight": torch.float8_e4m3fn}, "float8_e4m3fn weight"),
    ],
)
def test_quantized_tensor_names_are_refused(tmp_path, keys, shown):
    with pytest.raises(ValueError, match=rf"looks already quantized.*{shown}"):
        check_not_prequantized(tmp_path, keys.items(), "ckpt")


def test_plain_checkpoints_pass(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    keys = {"h.0.weight": torch.float32, "norm.scale": torch.float32, "ids": torch.int64, "mask": torch.uint8}
    check_not_prequantized(tmp_path, keys.items(), "ckpt")  # a float model's own int buffers are fine
