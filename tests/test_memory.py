"""Size strings, budgets, module sizes and tied groups: pure, on meta models, never touching CUDA."""

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from models import meta_gpt
from lightning_bigmodel.planning.budget import get_max_memory
from lightning_bigmodel.planning.sizes import compute_module_sizes, find_tied_parameters, parse_size




@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 0),
        (123, 123),
        ("123", 123),
        ("10GiB", 10 * 2**30),
        ("10GB", 10 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * 2**29),
        ("0.29GB", 290_000_000),
        ("2KiB", 2048),
        ("3MiB", 3 * 2**20),
        ("1TiB", 2**40),
        ("4KB", 4000),
        ("2TB", 2 * 10**12),
        ("7B", 7),
        ("10gib", 10 * 2**30),
        ("10 GiB", 10 * 2**30),
        ("  5 mb ", 5 * 10**6),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "GB", "abc", "10XB", "1.2.3GB", "10 G iB", "-1GB", "-5", -1, True, None, [1]])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="Memory size") as err:
        parse_size(size)
    assert repr(size) in str(err.value)
    assert "GiB" in str(err.value) and "GB" in str(err.value)  # the accepted forms


@pytest.fixture
def no_cuda(monkeypatch):
    """Make every CUDA query used for detection raise."""

    def boom(*args, **kwargs):
        raise AssertionError("CUDA was touched")

    for name in ("is_available", "device_count", "mem_get_info", "get_device_properties", "init"):
        monkeypatch.setattr(torch.cuda, name, boom)


def test_get_max_memory_normalises_without_cuda(no_cuda):
    budget = get_max_memory({"cpu": "1GB", "disk": "2GiB", "cuda:2": 5, "0": "1KiB", torch.device("cuda", 1): 7})
    assert budget == {0: 1024, 1: 7, 2: 5, "cpu": 10**9, "disk": 2 * 2**30}
    assert list(budget) == [0, 1, 2, "cpu", "disk"]


def test_get_max_memory_cpu_only_budget_without_cuda(no_cuda):
    assert get_max_memory({"cpu": 100}) == {"cpu": 100}


@pytest.mark.parametrize("key", ["meta", "gpu", "cuda:x", -1, "xpu:0"])
def test_get_max_memory_rejects_unknown_keys(no_cuda, key):
    with pytest.raises(ValueError, match="`max_memory` has an unknown key") as err:
        get_max_memory({key: 10})
    assert repr(key) in str(err.value)


def test_get_max_memory_rejects_repeated_device_and_bad_size(no_cuda):
    with pytest.raises(ValueError, match="twice"):
        get_max_memory({0: 10, "cuda:0": 20})
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\].*'lots'"):
        get_max_memory({"cpu": "lots"})


def test_get_max_memory_detects_cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    budget = get_max_memory()
    assert list(budget) == ["cpu"] and budget["cpu"] > 0


def test_get_max_memory_detects_gpus_with_headroom(monkeypatch):
    total = 80 * 2**30
    free = {0: 70 * 2**30, 1: 2**29}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (free[index], total))
    budget = get_max_memory()
    assert list(budget) == [0, 1, "cpu"]
    assert budget[0] == 70 * 2**30 - 8 * 2**30  # 10% of 80 GiB kept back
    assert budget[1] == 0  # less free than the headroom


def _reference_sizes(model, dtype=None):
    """Bytes per prefix from the state dict of a real model (ties appear once there, under their first name)."""
    sizes = {}
    seen = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        itemsize = tensor.element_size()
        if dtype is not None and tensor.is_floating_point():
            itemsize = min(itemsize, torch.empty((), dtype=dtype).element_size())
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            prefix = ".".join(parts[:depth])
            sizes[prefix] = sizes.get(prefix, 0) + tensor.numel() * itemsize
    return sizes


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float64, torch.int8])
def test_compute_module_sizes_matches_real_model(dtype):
    torch.manual_seed(0)
    real = GPT(GPTConfig.preset("tiny"))
    sizes = compute_module_sizes(meta_gpt(), dtype)
    assert sizes == _reference_sizes(real, dtype)
    assert sizes == compute_module_sizes(real, dtype)


def test_compute_module_sizes_counts_tied_once_and_dtype_shrinks_floats_only():
    config = GPTConfig.preset("tiny")
    model = meta_gpt()
    sizes = compute_module_sizes(model)
    emb = config.vocab_size * config.n_embd * 4
    assert sizes["transformer.wte"] == emb and sizes["transformer.wte.weight"] == emb
    assert "lm_head" not in sizes  # its only tensor is the tied embedding, owned by transformer.wte
    untied = compute_module_sizes(meta_gpt(tie_weights=False))
    assert untied[""] == sizes[""] + emb
    half = compute_module_sizes(model, torch.float16)
    mask = config.block_size**2  # bool buffer: never shrinks
    assert half["transformer.h.0.attn.mask"] == mask
    assert half["transformer.h.0.attn.c_attn.weight"] * 2 == sizes["transformer.h.0.attn.c_attn.weight"]
    assert compute_module_sizes(model, torch.float64) == sizes  # never grows


def test_compute_module_sizes_shared_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a
            self.register_buffer("stat", torch.zeros(3, dtype=torch.int64))

    sizes = compute_module_sizes(Shared())
    assert sizes[""] == (16 + 4) * 4 + 3 * 8
    assert sizes["a"] == 80 and "b" not in sizes and sizes["stat"] == 24


def test_find_tied_parameters():
    assert find_tied_parameters(meta_gpt()) == [["transformer.wte.weight", "lm_head.weight"]]
    assert find_tied_parameters(meta_gpt(tie_weights=False)) == []
    three = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3), "c": nn.Linear(3, 3)})
    three["c"].weight = three["a"].weight
    three["b"].bias = three["a"].bias
    assert find_tied_parameters(three) == [["a.weight", "c.weight"], ["a.bias", "b.bias"]]
