"""Load-and-forward cases, each run inside a fresh worker process (see ``benchmarks.worker``).

A case builds a GPT from a checkpoint with one library and one device map, and measures: load wall time, peak
anonymous / total RSS growth during the load, time to first output, steady-state decode- and prefill-shaped
forwards, bytes written to the offload folder, and the difference of its outputs from plain PyTorch.
"""

from __future__ import annotations

import gc
import importlib
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.measure import MemorySampler, folder_bytes, read_status, time_calls
from examples.gpt import GPT, GPTConfig

NO_SPLIT = ["Block"]
LIBRARIES = ("plain", "accelerate", "ours", "trainer")
MAPS = ("resident", "disk", "resident_gpu", "cpu_offload")
GPU_MAPS = ("resident_gpu", "cpu_offload")


def map_arguments(map_name: str, nbytes: int) -> dict[str, Any]:
    """``device_map`` / ``max_memory`` for a named map: everything in RAM or on GPU 0, half in RAM or on GPU 0."""
    if map_name == "resident":
        return {"device_map": {"": "cpu"}, "max_memory": None}
    if map_name == "resident_gpu":
        return {"device_map": {"": 0}, "max_memory": None}
    if map_name == "disk":
        return {"device_map": "auto", "max_memory": {"cpu": nbytes // 2}}
    if map_name == "cpu_offload":
        return {"device_map": "auto", "max_memory": {0: nbytes // 2, "cpu": 4 * nbytes}}
    raise ValueError(f"Unknown map {map_name!r}; choose one of {MAPS}.")


def make_inputs(config: GPTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Decode-shaped (batch 1, 8 tokens) and prefill-shaped (batch 4, 128 tokens) token batches."""
    gen = torch.Generator().manual_seed(seed)
    prefill_len = min(128, config.block_size)
    return {
        "decode": torch.randint(0, config.vocab_size, (1, min(8, config.block_size)), generator=gen),
        "prefill": torch.randint(0, config.vocab_size, (4, prefill_len), generator=gen),
    }


def _shards(folder: str, fmt: str) -> list[Path]:
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    return sorted(p for p in Path(folder).iterdir() if p.suffix == suffix)


def load_plain(spec: dict[str, Any]) -> torch.nn.Module:
    """Plain PyTorch: build the model normally, then ``load_state_dict`` shard by shard."""
    from safetensors.torch import load_file

    model = GPT(GPTConfig.preset(spec["size"]))
    loaded: set[str] = set()
    for path in _shards(spec["ckpt"], spec["fmt"]):
        if spec["fmt"] == "safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=False)
        loaded.update(state)
        del state
    missing = set(model.state_dict()) - loaded - {"lm_head.weight"}  # lm_head is tied to wte
    if missing:
        raise RuntimeError(f"plain load left {sorted(missing)[:5]} unloaded from {spec['ckpt']}")
    if spec["map"] == "resident_gpu":
        model.to("cuda")
    return model.eval()


def load_accelerate(spec: dict[str, Any]) -> torch.nn.Module:
    """accelerate: ``init_empty_weights`` + ``load_checkpoint_and_dispatch`` with the case's map and budget."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = GPT(GPTConfig.preset(spec["size"]))
    # accelerate's init_empty_weights re-creates the parameter on assignment, which unties lm_head from wte.
    model.lm_head.weight = model.transformer.wte.weight
    args = map_arguments(spec["map"], spec["model_bytes"])
    return load_checkpoint_and_dispatch(
        model,
        spec["ckpt"],
        device_map=args["device_map"],
        max_memory=args["max_memory"],
        no_split_module_classes=NO_SPLIT,
        offload_folder=spec["offload_dir"],
    ).eval()


def load_ours(spec: dict[str, Any]) -> torch.nn.Module:
    """lightning_bigmodel: ``init_empty_weights`` + ``load_checkpoint_and_dispatch``."""
    from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = GPT(GPTConfig.preset(spec["size"]))
    args = map_arguments(spec["map"], spec["model_bytes"])
    return load_checkpoint_and_dispatch(
        model,
        spec["ckpt"],
        device_map=args["device_map"],
        max_memory=args["max_memory"],
        no_split_module_classes=NO_SPLIT,
        offload_folder=spec["offload_dir"],
    ).eval()


# What each loader imports, measured apart from the load (the user pays both: see `paid_*` figures). Ours names the
# modules behind its lazy package exports, so the import is not hidden inside the timed load.
_IMPORTS = {
    "plain": ["safetensors.torch"],
    "accelerate": ["safetensors.torch", "accelerate"],
    "ours": ["safetensors.torch", "lightning_bigmodel", "lightning_bigmodel.init", "lightning_bigmodel.dispatch"],
}
LOADERS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {
    "plain": load_plain,
    "accelerate": load_accelerate,
    "ours": load_ours,
}


def map_summary(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per device in the model's ``hf_device_map`` (empty without one)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    out: dict[str, int] = {}
    for prefix, device in device_map.items():
        module = model.get_submodule(prefix) if prefix else model
        seen = set()
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out[str(device)] = out.get(str(device), 0) + t.numel() * t.element_size()
    return out


def compare(outputs: dict[str, torch.Tensor], ref_path: str) -> dict[str, Any]:
    """Max absolute difference from the plain-PyTorch reference outputs, per input shape."""
    if not ref_path or not Path(ref_path).exists():
        return {}
    ref = torch.load(ref_path, weights_only=True)
    return {k: float((v - ref[k]).abs().max()) for k, v in outputs.items() if k in ref and v.shape == ref[k].shape}


def run_load_case(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Load with ``spec['lib']``, then measure first output and forwards into ``result`` (filled as it goes)."""
    device = "cuda" if spec["map"] in GPU_MAPS else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs = {k: v.to(device) for k, v in make_inputs(GPTConfig.preset(spec["size"])).items()}
    result["stage"] = "import"
    before, start = read_status().get("RssAnon", 0), time.perf_counter()
    for name in _IMPORTS[spec["lib"]]:
        importlib.import_module(name)  # timed apart from the load
    result["import_s"] = time.perf_counter() - start
    result["import_anon_growth"] = read_status().get("RssAnon", 0) - before
    gc.collect()
    result["stage"] = "load"
    sampler = MemorySampler().start()
    start = time.perf_counter()
    model = LOADERS[spec["lib"]](spec)
    sync()
    result["load_s"] = time.perf_counter() - start
    result.update(sampler.stop())
    # as a user pays them: the library's import counted (its anonymous memory stays for the whole run)
    result["paid_load_s"] = result["import_s"] + result["load_s"]
    result["paid_peak_anon_growth"] = result["import_anon_growth"] + result.get("peak_anon_growth", 0)
    result["stage"] = "first output"
    with torch.inference_mode():
        outputs = {"decode": model(inputs["decode"]).float().cpu()}
        result["first_output_s"] = time.perf_counter() - start
    result["rss_after_first_output_growth"] = read_status().get("VmRSS", 0) - sampler.baseline.get("VmRSS", 0)
    result["offload_folder"] = folder_bytes(spec.get("offload_dir"))
    result["map_bytes"] = map_summary(model)
    result["stage"] = "forward"
    measure_forwards(model, inputs, spec, sync, outputs, result)
    result["stage"] = "compare"
    if spec.get("write_ref"):
        torch.save(outputs, spec["ref_path"])
    else:
        result["max_abs_diff"] = compare(outputs, spec.get("ref_path", ""))
    result["stage"] = "done"


def measure_forwards(model, inputs, spec, sync, outputs, result) -> None:
    """Median forward times after warm-up (``spec['fwd']`` = {shape: [warmup, iters]}); keep prefill output."""
    plan = spec.get("fwd") or {}
    with torch.inference_mode():
        if "prefill" in plan or spec.get("write_ref"):
            outputs["prefill"] = model(inputs["prefill"]).float().cpu()
        for shape, (warmup, iters) in plan.items():
            x = inputs[shape]
            timing = time_calls(lambda: model(x), warmup, iters, sync)
            result[f"{shape}_s"] = timing["median_s"]
            result[f"{shape}_times_s"] = timing["times_s"]
