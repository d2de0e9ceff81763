"""Micro cases, each in a fresh worker process: empty init of a ~10B-parameter GPT, and device-map planning.

``empty_init``: wall time of building the GPT inside each library's ``init_empty_weights`` (``torch.device("meta")``
as the floor). ``plan``: wall time of planning a budget that sends half of a ~10,000-module meta GPT to disk.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.cases import NO_SPLIT
from benchmarks.checkpoints import model_bytes
from benchmarks.measure import MemorySampler
from examples.gpt import GPT, GPTConfig

# 40 blocks of width 4608: 12 * 4608**2 * 40 + embeddings, about 10.4B parameters.
INIT_CONFIG = dict(vocab_size=50257, block_size=1024, n_layer=40, n_head=36, n_embd=4608)
QUICK_INIT_CONFIG = dict(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=256)
# 9 modules per block: 1111 blocks + 7 outer modules = 10,006 modules.
PLAN_CONFIG = dict(vocab_size=1000, block_size=16, n_layer=1111, n_head=2, n_embd=64)
QUICK_PLAN_CONFIG = dict(vocab_size=1000, block_size=16, n_layer=50, n_head=2, n_embd=64)


def _init_context(lib: str):
    if lib == "ours":
        from lightning_bigmodel import init_empty_weights

        return init_empty_weights()
    if lib == "accelerate":
        from accelerate import init_empty_weights

        return init_empty_weights()
    if lib == "torch_meta":
        return torch.device("meta")
    raise ValueError(f"Unknown `lib` {lib!r} for empty_init; choose ours, accelerate or torch_meta.")


def run_empty_init(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Time ``GPT(config)`` inside the library's empty-init context; report parameters and RSS growth."""
    config = GPTConfig(**spec["config"])
    context = _init_context(spec["lib"])  # imports happen before the clock starts
    sampler = MemorySampler().start()
    start = time.perf_counter()
    with context:
        model = GPT(config)
    result["init_s"] = time.perf_counter() - start
    result.update(sampler.stop())
    result["params"] = sum(p.numel() for p in model.parameters())
    result["params_on_meta"] = all(p.is_meta for p in model.parameters())
    result["tied"] = model.lm_head.weight is model.transformer.wte.weight


def run_plan(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Time planning ``max_memory={"cpu": model_bytes // 2}`` (rest to disk) on a meta GPT of many modules."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**spec["config"]))
    nbytes = model_bytes(model)
    result["modules"] = sum(1 for _ in model.modules())
    budget = {"cpu": nbytes // 2}
    if spec["lib"] == "ours":
        from lightning_bigmodel import infer_device_map

        plan = lambda: infer_device_map(model, max_memory=budget, no_split_module_classes=NO_SPLIT)  # noqa: E731
    elif spec["lib"] == "accelerate":
        from accelerate import infer_auto_device_map

        plan = lambda: infer_auto_device_map(model, max_memory=budget, no_split_module_classes=NO_SPLIT)  # noqa: E731
    else:
        raise ValueError(f"Unknown `lib` {spec['lib']!r} for plan; choose ours or accelerate.")
    start = time.perf_counter()
    device_map = plan()
    result["plan_s"] = time.perf_counter() - start
    devices = [str(d) for d in device_map.values()]
    result["map_entries"] = len(device_map)
    result["map_devices"] = {d: devices.count(d) for d in sorted(set(devices))}
