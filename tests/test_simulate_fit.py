"""Plans that fit at run time: with an input shape, every device's simulated peak stays within its budget, for every
policy; with small activations the plan keeps (nearly) all the GPU bytes of the plan made without one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import LinearLM
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.fitting import infer_device_map
from lightning_bigmodel.planning.device_map import POLICIES
from lightning_bigmodel.planning.sizes import compute_module_sizes
from lightning_bigmodel.planning.table import bytes_per_device
from lightning_bigmodel.simulate import simulate_memory

KB = 1000
NO_SPLIT = ["Linear"]  # whole layers, as with `no_split_module_classes=["LlamaDecoderLayer"]`
BUDGET = {0: 600 * KB, 1: 600 * KB, "cpu": 10_000 * KB}


class LM(LinearLM):
    def __init__(self, width: int = 128, vocab: int = 256, layers: int = 24) -> None:
        super().__init__(width, vocab, layers)


@pytest.fixture(scope="module")
def model() -> LM:
    with init_empty_weights():
        return LM()


def _ids(shape) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


def _over(memory) -> dict:
    return {device: usage["peak"] - BUDGET[device] for device, usage in memory.items() if device in BUDGET and usage["peak"] > BUDGET[device]}


@pytest.mark.parametrize("policy", POLICIES)
def test_planned_with_the_input_shape_every_peak_fits(model, policy):
    weights_only = infer_device_map(model, BUDGET, no_split_module_classes=NO_SPLIT, policy=policy)
    assert _over(simulate_memory(model, weights_only, _ids((2, 24)), max_new_tokens=4)), "the check would prove nothing"
    fitted = infer_device_map(
        model, BUDGET, no_split_module_classes=NO_SPLIT, policy=policy, input_shape="2x24", max_new_tokens=4
    )
    memory = simulate_memory(model, fitted, _ids((2, 24)), max_new_tokens=4)
    assert not _over(memory), (fitted, memory)
    assert any(isinstance(device, int) for device in fitted.values())


@pytest.mark.parametrize("policy", POLICIES)
def test_small_activations_keep_the_gpu_bytes_of_the_weights_only_plan(policy):
    with init_empty_weights():
        model = LM(width=64, layers=64)  # layers of 2.8% of a GPU, as a 70B layer is of 80 GB: staging is small too
    sizes = compute_module_sizes(model)
    before = bytes_per_device(infer_device_map(model, BUDGET, no_split_module_classes=NO_SPLIT, policy=policy), sizes)
    after = bytes_per_device(infer_device_map(
        model, BUDGET, no_split_module_classes=NO_SPLIT, policy=policy, input_shape=(1, 1)
    ), sizes)
    gpu_bytes = lambda placed: sum(n for label, n in placed.items() if label not in ("cpu", "disk"))  # noqa: E731
    assert gpu_bytes(after) >= 0.95 * gpu_bytes(before), (before, after)


def test_no_plan_fits_names_the_device_and_the_fix(model):
    with pytest.raises(ValueError, match=r"No device map keeps the simulated peak of a batch of \(64, 512\).*cpu by"):
        infer_device_map(model, BUDGET, no_split_module_classes=NO_SPLIT, input_shape="64x512")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"input_shape": "4by2048"}, r"`input_shape='4by2048'` does not parse"), ({"max_new_tokens": 3}, r"needs `input_shape`")],
)
def test_bad_planning_input_is_named(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        infer_device_map(model, BUDGET, **kwargs)


def test_detected_gpu_budgets_keep_only_the_context_when_activations_are_simulated(monkeypatch):
    from lightning_bigmodel.planning import budget

    total = 80 * 2**30
    monkeypatch.setattr(budget, "gpu_count", lambda: 2)
    monkeypatch.setattr(budget, "memory_info", lambda index: (total, total))
    fixed = budget.get_max_memory(None)
    simulated = budget.get_max_memory(None, simulated_activations=True)
    assert fixed[0] == fixed[1] == total - total // 10  # 10% kept back for the context and the activations
    assert simulated[0] == simulated[1] == total - 2**30  # the context only: the plan reserves what it simulates


def test_the_plan_table_places_what_the_simulation_counts_as_weights():
    """One number per fact: the table's "placed" (buffers of offloaded modules on the execution device) is the
    simulation's "weights" on every device; the module sizes alone differed by those buffers."""
    from models import meta_gpt
    from lightning_bigmodel.planning.sizes import compute_buffer_sizes
    from lightning_bigmodel.planning.table import moved_buffers, render_table

    model = meta_gpt("small", tie_weights=False)
    sizes = compute_module_sizes(model)
    budget = {0: int(0.35 * sizes[""]), 1: int(0.3 * sizes[""]), "cpu": int(0.2 * sizes[""])}
    device_map = infer_device_map(model, budget, no_split_module_classes=["Block"], input_shape="2x16")
    memory = simulate_memory(model, device_map, _ids((2, 16)))
    placed = bytes_per_device(device_map, sizes)
    moved = moved_buffers(device_map, compute_buffer_sizes(model))
    assert moved and any(placed[label] != memory[key]["weights"] for key, label in ((0, "cuda:0"), ("cpu", "cpu")))
    for device, usage in memory.items():
        label = f"cuda:{device}" if isinstance(device, int) else device
        assert placed.get(label, 0) + moved.get(label, 0) == usage["weights"], (label, placed, moved, memory)
    table = render_table(device_map, sizes, budget, buffer_sizes=compute_buffer_sizes(model))
    header = next(line for line in table.splitlines() if line.startswith("device") and "placed" in line)
    assert header.split()[:3] == ["device", "placed", "buffers"], table
