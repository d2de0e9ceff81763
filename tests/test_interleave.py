"""Resident blocks spread among the streamed ones when the offloaded layers compute on the CPU (planning/_interleave.py):
same bytes per device as the in-order walk, every block whole, tied blocks and GPU execution left in module order,
and the dispatched model computes what the plain model computes."""

import pytest
import torch
from torch import nn

import lightning_bigmodel.planning.device_map as device_map_module
from lightning_bigmodel import dispatch_model, remove_dispatch
from lightning_bigmodel.planning._interleave import spread_positions
from lightning_bigmodel.planning.device_map import infer_device_map
from models import meta_gpt


def _in_order(monkeypatch, *args, **kwargs):
    """The plan of the greedy walk alone (the interleaving step turned off)."""
    with monkeypatch.context() as patch:
        patch.setattr(device_map_module, "interleave_resident", lambda raw, planner: raw)
        return infer_device_map(*args, **kwargs)


def _block_devices(plan, n_layer):
    return [plan[f"transformer.h.{index}"] for index in range(n_layer)]


def _bytes_by_device(model, plan):
    from lightning_bigmodel.planning.mapping import tensor_devices

    devices, out = tensor_devices(model, plan), {}
    for name, tensor in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
        out[devices[name]] = out.get(devices[name], 0) + tensor.numel() * tensor.element_size()
    return out


@pytest.mark.parametrize(("count", "among"), [(1, 1), (1, 5), (2, 5), (7, 36), (29, 36), (5, 6), (6, 6)])
def test_spread_positions_are_distinct_and_even(count, among):
    positions = spread_positions(count, among)
    assert positions == sorted(set(positions)) and len(positions) == count
    assert 0 <= positions[0] and positions[-1] < among
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced
    assert positions[0] <= among // count  # the first in the first share, not pushed to the end


def test_cpu_execution_spreads_resident_blocks_with_the_same_bytes_per_device(monkeypatch):
    model = meta_gpt("gpt2-large")
    budget = {"cpu": 1 * 2**30}
    plan = infer_device_map(model, budget, no_split_module_classes=["Block"])
    walked = _in_order(monkeypatch, model, budget, no_split_module_classes=["Block"])
    blocks, before = _block_devices(plan, 36), _block_devices(walked, 36)
    assert plan.execution_device == "cpu" and {"cpu", "disk"} == set(blocks)
    assert before == sorted(before)  # the walk: the first blocks resident, all later ones on disk
    resident = [index for index, device in enumerate(blocks) if device == "cpu"]
    assert len(resident) == before.count("cpu") >= 2
    gaps = [b - a for a, b in zip(resident, resident[1:])]
    assert min(gaps) >= 36 // len(resident)  # no run of resident blocks: the stream reads during each one
    assert _bytes_by_device(model, plan) == _bytes_by_device(model, walked)  # the budgets hold as planned
    assert {key: value for key, value in plan.items() if ".h." not in key} == {
        key: value for key, value in walked.items() if ".h." not in key
    }  # embedding, head and final norm stay where the walk put them
    assert plan.stream_unit == walked.stream_unit and plan.reserve == walked.reserve


def test_gpu_execution_keeps_module_order():
    model = meta_gpt("small", tie_weights=False)
    block = sum(p.numel() * 4 for p in model.transformer.h[0].parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    plan = infer_device_map(model, {0: total // 2, "cpu": 2 * block}, no_split_module_classes=["Block"],
                            offload_execution="gpu")  # fmt: skip
    assert plan.execution_device == 0
    rank = {"cpu": 1, "disk": 2}
    ranks = [rank.get(device, 0) for device in plan.values()]
    assert ranks == sorted(ranks) and {"cpu", "disk"} <= set(plan.values())


class _Stack(nn.Module):
    """Identical sibling layers; the first shares its weight with the last (a tied pair inside the run)."""

    def __init__(self, layers: int = 8, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))
        self.layers[-1].weight = self.layers[0].weight

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_blocks_holding_a_tied_weight_keep_their_place(monkeypatch):
    with torch.device("meta"):
        model = _Stack()
    layer = 64 * 64 * 4
    budget = {"cpu": 3 * layer + layer // 2}
    plan = infer_device_map(model, budget)
    walked = _in_order(monkeypatch, model, budget)
    devices = [plan[f"layers.{index}"] for index in range(8)]
    before = [walked[f"layers.{index}"] for index in range(8)]
    assert devices[0] == devices[7] == before[0] == before[7] == "cpu"  # the tied pair, where the walk put it
    assert before[1:7] == ["cpu", "cpu", "disk", "disk", "disk", "disk"]
    assert devices[1:7].count("cpu") == 2 and devices[1:7] != before[1:7]  # the untied run is respread
    assert _bytes_by_device(model, plan) == _bytes_by_device(model, walked)


def test_interleaved_plan_computes_what_the_plain_model_computes(tmp_path):
    torch.manual_seed(0)
    model = _Stack(layers=10).eval()
    model.layers[-1].weight = nn.Parameter(model.layers[-1].weight.detach().clone())  # untied: all ten respread
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    plan = infer_device_map(model, {"cpu": 3 * 64 * 64 * 4})
    devices = [plan[f"layers.{index}"] for index in range(10)]
    assert devices.count("cpu") == 3 and devices[:3] != ["cpu"] * 3
    dispatched = dispatch_model(model, plan, offload_folder=tmp_path)
    with torch.no_grad():
        outputs = [dispatched(x) for _ in range(3)]  # the first forward learns the order, the others stream
    remove_dispatch(dispatched)
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
