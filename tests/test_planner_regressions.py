"""Planner regressions found by simulation: each plan is checked for the property that broke, and dispatched on
simulated GPUs against the same model run plainly on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_bigmodel import dispatch_model
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.planning.device_map import infer_device_map, tensor_devices
from lightning_bigmodel.simulate import simulated_gpus

KB = 1000


class LM(nn.Module):
    """An embedding, a stack of linear blocks and an untied head (``width * vocab * 4`` bytes each end)."""

    def __init__(self, width: int = 64, vocab: int = 256, layers: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _module_devices(model: nn.Module, device_map) -> dict[str, set]:
    """The devices of each module's direct tensors (parameters and buffers, not its children's)."""
    owners: dict[str, set] = {}
    for name, device in tensor_devices(model, device_map).items():
        owners.setdefault(name.rpartition(".")[0], set()).add(device)
    return owners


def _plain_and_dispatched(model_class, kwargs, device_map, ids, gpus=2):
    """The output of the model run plainly on the CPU and of the same weights dispatched under ``device_map``."""
    torch.manual_seed(0)
    plain = model_class(**kwargs).eval()
    with torch.no_grad():
        expected = plain(ids)
    with simulated_gpus(gpus):
        dispatched = model_class(**kwargs).eval()
        dispatched.load_state_dict(plain.state_dict())
        dispatch_model(dispatched, device_map)
        with torch.no_grad():
            got = dispatched(ids).cpu()
    return expected, got


BALANCED_LOW_0_BUDGET = {0: 600 * KB, 1: 600 * KB, "cpu": 10_000 * KB}


@pytest.mark.parametrize("policy", ["balanced_low_0", "balanced", "sequential"])
def test_a_module_s_direct_tensors_land_on_one_device(policy):
    with init_empty_weights():
        model = LM()
    device_map = infer_device_map(model, BALANCED_LOW_0_BUDGET, policy=policy)  # no no-split classes
    split = {owner: devices for owner, devices in _module_devices(model, device_map).items() if len(devices) > 1}
    assert not split, (split, device_map)
    assert {0, 1} <= set(device_map.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulation shadows CUDA for the rest of the process")
def test_balanced_low_0_without_no_split_classes_runs_like_the_plain_model():
    with init_empty_weights():
        device_map = infer_device_map(LM(), BALANCED_LOW_0_BUDGET, policy="balanced_low_0")
    ids = torch.randint(0, 256, (2, 5))
    expected, got = _plain_and_dispatched(LM, {}, device_map, ids)
    torch.testing.assert_close(got, expected)
