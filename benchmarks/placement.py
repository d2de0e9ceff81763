"""Placement vs accelerate: GPU bytes of our plan and of accelerate's on the same meta model and budget.

``python -m benchmarks.placement`` prints the table (pure planning on meta models: seconds); ``benchmarks.run`` puts it
in its report. Models: GPT untied and tied (vocabulary 2048, an embedding larger than a block), nested MLPs with and
without no-split classes, an MoE-shaped model; budgets as fractions of the model's bytes; every policy. accelerate's
plan for ``balanced``/``balanced_low_0``/``auto`` is ``infer_auto_device_map`` under ``get_balanced_memory``.

A cell is *over budget* for a library when its execution GPU (the lowest GPU of the map, where both dispatch the
offloaded layers, unless our plan executes them on the CPU) cannot hold its modules, one offloaded layer and the
offloaded buffers (which both keep there with ``offload_buffers=False``) within its budget: such a plan runs out of
memory at the first forward.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from lightning_bigmodel.planning._planner import _Planner
from lightning_bigmodel.planning.device_map import POLICIES, infer_device_map, tensor_devices
from lightning_bigmodel.planning.devices import execution_device_of


class MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stage(nn.Module):
    """A nested level: a norm and a list of MLPs."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlps = nn.ModuleList(MLP(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for mlp in self.mlps:
            x = mlp(x)
        return x


class NestedMLP(nn.Module):
    def __init__(self, width: int = 96, stages: int = 3, depth: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.stages = nn.ModuleList(Stage(width, depth) for _ in range(stages))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for stage in self.stages:
            x = stage(x)
        return self.out(x)


class MoEBlock(nn.Module):
    """A router and eight experts (every expert runs here; the planner only sees the shapes)."""

    def __init__(self, width: int, experts: int = 8) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(MLP(width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)
        return sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


class MoE(nn.Module):
    def __init__(self, width: int = 64, vocab: int = 2048, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(MoEBlock(width) for _ in range(layers))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _meta(cls, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


def _gpt(tie_weights: bool) -> nn.Module:
    from examples.gpt import GPT, GPTConfig

    config = GPTConfig.preset("small")
    config.vocab_size, config.tie_weights = 2048, tie_weights
    with torch.device("meta"):
        return GPT(config)


MODELS = {  # name -> (meta model factory, no_split_module_classes)
    "gpt-untied": (lambda: _gpt(False), ["Block"]),
    "gpt-tied": (lambda: _gpt(True), ["Block"]),
    "nested-split": (lambda: _meta(NestedMLP), None),
    "nested-no-split": (lambda: _meta(NestedMLP), ["MLP"]),
    "moe": (lambda: _meta(MoE), ["MoEBlock"]),
}
BUDGETS = {  # fractions of the model's bytes
    "roomy": {0: 0.6, 1: 0.6, "cpu": 1.0},
    "tight": {0: 0.25, 1: 0.25, 2: 0.25, "cpu": 1.5},
    "uneven": {0: 0.3, 1: 0.1, 2: 0.45, "cpu": 0.3},
    "tiny": {0: 0.05, 1: 0.05, "cpu": 2.0},
}


def model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def gpu_bytes(model: nn.Module, device_map) -> dict[int, int]:
    """Bytes of the tensors each GPU of ``device_map`` holds (each shared tensor once)."""
    devices = tensor_devices(model, device_map)
    held, seen = {}, set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) not in seen and isinstance(devices[name], int):
            held[devices[name]] = held.get(devices[name], 0) + tensor.numel() * tensor.element_size()
        seen.add(id(tensor))
    return held


def accelerate_map(model: nn.Module, budget, no_split, policy: str):
    """accelerate's plan for ``policy``: balanced budgets (``get_balanced_memory``) unless sequential."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Device 0 is not available" on a CPU-only machine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if policy != "sequential":
            budget = get_balanced_memory(
                model, max_memory=dict(budget), no_split_module_classes=no_split, low_zero=policy == "balanced_low_0"
            )
        return infer_auto_device_map(model, max_memory=dict(budget), no_split_module_classes=no_split)


def largest_offloaded_layer(model: nn.Module, device_map, no_split, buffers: bool = False) -> int:
    """The largest piece of an offloaded module brought in at once, without its buffers unless ``buffers`` (with
    ``offload_buffers=False`` they stay resident)."""
    planner = _Planner(model, no_split, None, False)
    offloaded = [key for key, device in device_map.items() if device in ("cpu", "disk")]
    return max([planner.largest(key)[0] if buffers else planner.unit(key) for key in offloaded], default=0)


def offloaded_buffer_bytes(model: nn.Module, device_map) -> int:
    """Bytes of the buffers of offloaded modules (kept on the execution device with ``offload_buffers=False``)."""
    devices = tensor_devices(model, device_map)
    return sum(b.numel() * b.element_size() for name, b in model.named_buffers() if devices[name] in ("cpu", "disk"))


def over_budget(model: nn.Module, device_map, budget, no_split) -> int:
    """Bytes by which a GPU of ``device_map`` exceeds its budget: each holds its modules, and the execution GPU also
    one offloaded layer and the offloaded buffers (see the module's docstring); 0 when every GPU fits. A plan whose
    offloaded layers execute on the CPU (``execution_device == "cpu"``) keeps nothing for them on a GPU."""
    held = gpu_bytes(model, device_map)
    if not held:
        return 0
    main = None if execution_device_of(device_map) == "cpu" else min(held)
    extra = 0 if main is None else largest_offloaded_layer(model, device_map, no_split)
    extra += 0 if main is None else offloaded_buffer_bytes(model, device_map)
    return max(0, *(held[gpu] + (extra if gpu == main else 0) - budget[gpu] for gpu in held))


def runs_within_budget(model: nn.Module, device_map, budget, no_split) -> bool:
    """Whether the execution GPU of ``device_map`` holds its modules, one offloaded layer and the offloaded buffers
    within its budget."""
    return over_budget(model, device_map, budget, no_split) == 0


def compare(model_name: str, budget_name: str, policy: str) -> dict:
    """Our plan and accelerate's for one cell: GPU bytes per GPU, our prefetch depth, the slack (one offloaded layer
    of ours, buffers included), and whether each plan runs within its execution GPU's budget."""
    make, no_split = MODELS[model_name]
    model = make()
    total = model_bytes(model)
    budget = {device: int(fraction * total) for device, fraction in BUDGETS[budget_name].items()}
    planning_log = logging.getLogger("lightning_bigmodel.planning")
    level = planning_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "too little room on the execution device" for the tiny budgets
        planning_log.setLevel(logging.ERROR)  # the empty-GPU lines
        try:
            ours = infer_device_map(model, budget, no_split_module_classes=no_split, policy=policy)
        finally:
            planning_log.setLevel(level)
    theirs = accelerate_map(model, budget, no_split, policy)
    return {
        "model": model_name, "budget": budget_name, "policy": policy, "model_bytes": total,
        "ours": gpu_bytes(model, ours), "theirs": gpu_bytes(model, theirs), "map": dict(ours),
        "depth": ours.prefetch_depth, "execution": ours.execution_device,
        "slot": largest_offloaded_layer(model, ours, no_split, buffers=True),
        "theirs_over": over_budget(model, theirs, budget, no_split),
        "theirs_fits": runs_within_budget(model, theirs, budget, no_split),
        "ours_fits": runs_within_budget(model, ours, budget, no_split),
    }  # fmt: skip


def all_cells(policies=POLICIES) -> list[dict]:
    return [compare(model, budget, policy) for model in MODELS for budget in BUDGETS for policy in policies]


def _kb(held: dict) -> str:
    return " + ".join(f"{held[gpu] / 1000:.0f}" for gpu in sorted(held)) + f" = {sum(held.values()) / 1000:.0f}" if held else "0"


def markdown(cells: list[dict]) -> list[str]:
    """The table: one row per cell, GPU bytes (kB, per GPU then total) of ours and accelerate's, and the verdict."""
    lines = ["| model | budget | policy | ours: GPU kB | execution (prefetch depth) | accelerate: GPU kB | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    empty_where_used = 0
    for cell in cells:
        ours, theirs = cell["ours"], cell["theirs"]
        empty = sorted(set(theirs) - set(ours))
        if not cell["theirs_fits"]:
            verdict = f"accelerate over budget by {cell['theirs_over'] / 1000:.0f} kB on its execution GPU" + (
                f"; **ours leaves GPU {', '.join(map(str, empty))} empty**" if empty else "")
            empty_where_used += bool(empty)
        elif empty:
            verdict, empty_where_used = "**GPU left empty that accelerate uses**", empty_where_used + 1
        elif sum(ours.values()) < sum(theirs.values()) - cell["slot"]:
            verdict = "**below accelerate by more than one layer**"
        else:
            diff = sum(ours.values()) - sum(theirs.values())
            verdict = "equal" if diff == 0 else f"{diff / 1000:+.0f} kB" + (" (prefetch slot)" if diff < 0 else "")
        execution = "cpu" if cell["execution"] == "cpu" else f"cuda:{cell['execution']} ({cell['depth']})"
        lines.append(f"| {cell['model']} | {cell['budget']} | {cell['policy']} | {_kb(ours)} | {execution} | "
                     f"{_kb(theirs)} | {verdict} |")
    over = sum(1 for cell in cells if not cell["theirs_fits"])
    on_cpu = sum(1 for cell in cells if cell["execution"] == "cpu" and cell["ours"])
    lines += ["", f"Cells where accelerate's plan is over budget at run time: {over} of {len(cells)}. "
              f"Cells with a GPU left empty that accelerate's plan uses: {empty_where_used} of {len(cells)}. "
              f"Cells where our offloaded layers execute on the CPU while the GPUs hold modules: {on_cpu}. Budgets: "
              + "; ".join(f"{name} {b}" for name, b in BUDGETS.items()) + " (fractions of the model's bytes). "
              "Execution: where our offloaded layers compute; on a GPU, the prefetch depth is the number of offloaded "
              "layers it holds at once (0: nothing offloaded).", ""]
    return lines


if __name__ == "__main__":
    print("\n".join(markdown(all_cells())))
