"""Quantized weights on a CUDA GPU with cpu and disk offload (skipped without CUDA): int8 everywhere, int4 where
torchao has its kernel (compute capability 8.0+, bfloat16). Each compares with torchao's own ``quantize_`` of the
plainly loaded model on the same GPU."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.offload.placement import is_disk

# Without torchao each test is collected and skipped with its reason (a module-level import skip would hide them from
# the count of CUDA tests that scripts/gpu_check.sh prints).
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("torchao") is None, reason='needs torchao (pip install "lightning-bigmodel[quantization]")'
    ),
]


def torchao_quantization():
    return pytest.importorskip("torchao.quantization")

GPU_CPU_DISK = {
    "transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": 0,
    "transformer.h.2": "cpu", "transformer.h.3": "cpu", "transformer.h.4": "disk", "transformer.h.5": "disk",
    "transformer.ln_f": 0, "lm_head": 0,
}  # fmt: skip


def _blocks(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("transformer.h.")


def _load(tmp_path, dtype, quantization):
    torch.manual_seed(0)
    plain = GPT(GPTConfig.preset("small")).eval()  # width 128: int4 groups of 128 fit
    save_sharded_checkpoint(plain, tmp_path / "ckpt", max_shard_size=200_000)
    with init_empty_weights():
        model = GPT(GPTConfig.preset("small")).eval()
    load_checkpoint_and_dispatch(
        model, tmp_path / "ckpt", device_map=GPU_CPU_DISK, dtype=dtype, offload_folder=tmp_path / "off",
        quantization=quantization,
    )
    x = torch.randint(0, plain.config.vocab_size, (2, 16), device="cuda")
    return model, plain.to(dtype), x


def _run_twice(model, x):
    with torch.inference_mode():
        return model(x), model(x)  # the second forward uses the prefetcher's learned order


def test_int8_gpu_with_cpu_and_disk_offload(tmp_path):
    model, plain, x = _load(tmp_path, torch.float32, "int8")
    reference = copy.deepcopy(plain).cuda()
    quantization = torchao_quantization()
    quantization.quantize_(reference, quantization.Int8WeightOnlyConfig(), filter_fn=_blocks)
    first, second = _run_twice(model, x)
    with torch.inference_mode():
        expected = reference(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    host = model.transformer.h[2].mlp.c_fc.weight
    assert type(host).__name__ == "Int8Tensor" and host.device.type == "cpu"  # offloaded as int8
    assert is_disk(model.transformer.h[4].mlp.c_fc.weight)


def test_int4_gpu_with_cpu_and_disk_offload(tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("torchao's int4 kernel needs compute capability 8.0+")
    model, plain, x = _load(tmp_path, torch.bfloat16, "int4")
    reference = copy.deepcopy(plain).cuda()
    config = torchao_quantization().Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    torchao_quantization().quantize_(reference, config, filter_fn=_blocks)
    first, second = _run_twice(model, x)
    with torch.inference_mode():
        expected = reference(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert type(model.transformer.h[4].mlp.c_fc.weight).__name__ == "Int4TilePackedTo4dTensor"


def test_int4_needs_bfloat16(tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("torchao's int4 kernel needs compute capability 8.0+")
    with pytest.raises(ValueError, match=r"'int4'.*bfloat16.*\['float32'\]"):
        _load(tmp_path, torch.float32, "int4")
