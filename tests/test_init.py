"""init_empty_weights, meta_tensor_names and materialize_meta_buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel.init import init_empty_weights, materialize_meta_buffers, meta_tensor_names


def _global_hook_counts() -> tuple[int, int]:
    return len(torch_module._global_parameter_registration_hooks), len(torch_module._global_buffer_registration_hooks)


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.register_buffer("persistent", torch.arange(4.0))
        self.register_buffer("table", torch.linspace(0, 1, 5), persistent=False)
        self.register_buffer("nothing", None)


class CustomParameter(nn.Parameter):
    pass


def test_parameters_on_meta_buffers_real():
    with init_empty_weights():
        model = GPT(GPTConfig.preset("tiny"))
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    reference = GPT(GPTConfig.preset("tiny"))
    params, ref_params = list(model.named_parameters()), list(reference.named_parameters())
    assert len(params) == len(ref_params) > 0
    for (name, param), (ref_name, ref) in zip(params, ref_params, strict=True):
        assert name == ref_name and param.shape == ref.shape and param.dtype == ref.dtype
        assert type(param) is nn.Parameter and param.requires_grad
    buffers, ref_buffers = list(model.named_buffers()), list(reference.named_buffers())
    assert [name for name, _ in buffers] == [name for name, _ in ref_buffers] and buffers
    for (name, buffer), (_, ref) in zip(buffers, ref_buffers, strict=True):
        assert torch.equal(buffer, ref), name


def test_parameter_class_and_requires_grad_kept():
    with init_empty_weights():
        module = nn.Module()
        module.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        module.custom = CustomParameter(torch.ones(3))
        module.custom.tag = "kept"
    assert module.frozen.is_meta and not module.frozen.requires_grad
    assert type(module.custom) is CustomParameter and module.custom.is_meta and module.custom.tag == "kept"


def test_ties_by_assignment_survive():
    with init_empty_weights():
        model = GPT(GPTConfig.preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tie_of_an_unregistered_parameter_survives():
    shared = nn.Parameter(torch.ones(2, 2))
    with init_empty_weights():
        module = nn.Module()
        module.a = shared
        module.b = shared
    assert module.a is module.b and module.a.is_meta
    assert not shared.is_meta  # the caller's own parameter is untouched


def test_hf_tie_weights_survives():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=16)
    with init_empty_weights():
        model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.is_meta


def test_include_buffers_and_materialize():
    with init_empty_weights(include_buffers=True):
        model = WithBuffers()
    assert model.persistent.is_meta and model.table.is_meta and model.nothing is None
    assert meta_tensor_names(model) == ["linear.weight", "linear.bias", "persistent", "table"]
    model.persistent = torch.arange(4.0)  # what a checkpoint load does for persistent buffers
    assert materialize_meta_buffers(model, torch.device("cpu")) == ["table"]
    assert torch.equal(model.table, torch.linspace(0, 1, 5))
    assert meta_tensor_names(model) == ["linear.weight", "linear.bias"]


def test_materialize_casts_to_the_meta_buffers_dtype():
    with init_empty_weights(include_buffers=True):
        model = WithBuffers()
    model.persistent = torch.arange(4.0)
    model.to(torch.float16)  # precision conversion on the meta model
    materialize_meta_buffers(model, torch.device("cpu"))
    assert model.table.dtype == torch.float16 and torch.equal(model.table, torch.linspace(0, 1, 5).half())


def test_materialize_names_unknown_buffers_and_changes_nothing():
    with init_empty_weights(include_buffers=True):
        model = GPT(GPTConfig.preset("tiny"))
    with pytest.raises(RuntimeError, match=r"transformer\.h\.0\.attn\.scale.*include_buffers=False") as info:
        materialize_meta_buffers(model, torch.device("cpu"))
    assert "mask" not in str(info.value)  # non-persistent: value recorded, not unknown
    assert model.transformer.h[0].attn.mask.is_meta  # nothing changed before raising


def test_gpt_with_buffers_on_meta_matches_reference_after_load(tiny_gpt):
    with init_empty_weights(include_buffers=True):
        model = GPT(GPTConfig.preset("tiny"))
    model.load_state_dict(tiny_gpt.state_dict(), assign=True)
    materialize_meta_buffers(model, torch.device("cpu"))
    model.lm_head.weight = model.transformer.wte.weight
    assert meta_tensor_names(model) == []
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx), tiny_gpt(idx), rtol=0, atol=0)


def test_nothing_patched_after_exit():
    before = _global_hook_counts()
    register_parameter = nn.Module.register_parameter
    with init_empty_weights(include_buffers=True):
        assert _global_hook_counts() == (before[0] + 1, before[1] + 1)
    assert _global_hook_counts() == before
    assert nn.Module.register_parameter is register_parameter
    layer = nn.Linear(2, 2)
    layer.register_buffer("b", torch.ones(1))
    assert not layer.weight.is_meta and not layer.b.is_meta


def test_exception_inside_still_unregisters():
    before = _global_hook_counts()
    with pytest.raises(RuntimeError, match="boom"):
        with init_empty_weights(include_buffers=True):
            raise RuntimeError("boom")
    assert _global_hook_counts() == before
    assert not nn.Linear(2, 2).weight.is_meta


def test_nested_contexts_innermost_wins():
    before = _global_hook_counts()
    with init_empty_weights(include_buffers=True):
        with init_empty_weights():
            inner = WithBuffers()
        outer = WithBuffers()
        assert outer.persistent.is_meta and outer.linear.weight.is_meta
    assert inner.linear.weight.is_meta and not inner.persistent.is_meta
    assert _global_hook_counts() == before
    assert not nn.Linear(1, 1).weight.is_meta


def test_memory_free_construction():
    config = GPTConfig(n_layer=2, n_head=4, n_embd=1024, vocab_size=50257)
    with init_empty_weights():
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) > 70_000_000
    assert all(p.is_meta for p in model.parameters())
