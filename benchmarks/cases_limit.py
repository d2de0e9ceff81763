"""The larger-than-memory case, run by ``benchmarks.worker`` inside a memory cgroup (see ``benchmarks.limit_run``).

One library loads a GPT with ``device_map="auto"`` under the case's budget (``None``: the library detects it), then
the case measures the first decode-shaped forward, steady decode (batch 1, 8 tokens) and prefill (batch 4, 128
tokens) forwards, the bytes each forward really reads from storage (``read_bytes`` of ``/proc/self/io``: page cache
hits are not counted), what the map puts on disk, and the difference of the outputs from plain PyTorch computed
outside the limit. For ours, also what the disk stream keeps resident (:class:`~lightning_bigmodel.offload.readahead.
ReadAhead`).
"""

from __future__ import annotations

import gc
import importlib
import itertools
import resource
import time
from typing import Any, Optional

import torch

from benchmarks.cases import NO_SPLIT, _IMPORTS, compare, load_plain, map_summary
from benchmarks.measure import time_calls
from examples.gpt import GPT, GPTConfig


def limit_inputs(config: GPTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Decode-shaped (1 x 8 tokens) and prefill-shaped (4 x 128 tokens) batches."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "decode": torch.randint(0, config.vocab_size, (1, 8), generator=gen),
        "prefill": torch.randint(0, config.vocab_size, (4, min(128, config.block_size)), generator=gen),
    }


def storage_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (``read_bytes`` of ``/proc/self/io``); 0 elsewhere."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stream_stats(model: torch.nn.Module) -> dict[str, Any]:
    """What ours' disk stream holds: resident subset, the room it had, its buffers (empty for other libraries)."""
    state = model.__dict__.get("_bigmodel_dispatch")
    stream = getattr(state, "prefetcher", None)
    if stream is None or not hasattr(stream, "kept_bytes"):
        return {}
    return {
        "kept_bytes": stream.kept_bytes, "kept_room": stream.kept_room, "release": stream.release,
        "buffers": stream.pool.made, "buffer_bytes": stream.buffer_bytes,
    }  # fmt: skip


def _load(spec: dict[str, Any], input_shape: Optional[str]) -> torch.nn.Module:
    """``load_checkpoint_and_dispatch`` of the case's library; ours plans for ``input_shape`` when given (the largest
    batch the case runs, as a user would pass it)."""
    lib = spec["lib"]
    if lib == "plain":
        return load_plain({**spec, "map": "resident"})
    if lib == "ours":
        from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

        planning = {"input_shape": input_shape} if input_shape else {}
        if spec.get("in_order"):  # the plan as the greedy walk leaves it: resident blocks first, not spread
            import lightning_bigmodel.planning.device_map as device_map_module

            device_map_module.interleave_resident = lambda raw, planner: raw
    else:
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        planning = {}
    with init_empty_weights():
        model = GPT(GPTConfig.preset(spec["size"]))
    model.lm_head.weight = model.transformer.wte.weight  # accelerate's empty init unties it; a no-op for ours
    return load_checkpoint_and_dispatch(
        model,
        spec["ckpt"],
        device_map="auto",
        max_memory=spec["max_memory"],
        no_split_module_classes=NO_SPLIT,
        offload_folder=spec["offload_dir"],
        **planning,
    ).eval()


def _detected(lib: str) -> Any:
    """The CPU budget the library detects here (inside the cgroup), before loading."""
    if lib == "ours":
        from lightning_bigmodel.planning.budget import detect_cpu_memory

        cpu = detect_cpu_memory()
        return {"cpu": cpu.budget, "source": cpu.source}
    if lib == "accelerate":
        from accelerate.utils import get_max_memory

        return {"cpu": int(get_max_memory()["cpu"])}
    return None


def _cpu_resident(model: torch.nn.Module) -> float:
    """After the forwards: the smallest fraction of pages in memory (``mincore``) over the weights placed on "cpu"."""
    from lightning_bigmodel.offload.pages import is_file_backed, resident_fraction
    from lightning_bigmodel.offload.placement import is_disk

    device_map = getattr(model, "hf_device_map", None) or {"": "cpu"}
    fractions = [1.0]
    for prefix, device in device_map.items():
        if device != "cpu":
            continue
        for param in (model.get_submodule(prefix) if prefix else model).parameters():
            if not is_disk(param) and is_file_backed(param):
                fractions.append(resident_fraction(param))
    return min(fractions)


def _compact(shape: str, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """What is compared with plain PyTorch, small enough to hold under the limit: the logits of the last 8 positions
    whole, and a float64 sum over the vocabulary at every position (the 4 x 128 prefill logits take 103 MB for
    gpt2-large; holding them, a copy and the reference's would cost the model 300 MB of its limit)."""
    return {shape: logits[:, -8:].float().clone(), f"{shape}_sums": _sums(logits)}


def _sums(logits: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """``torch.sum(logits, dim=-1, dtype=torch.float64)``, ``rows`` positions at a time: the sum with a dtype converts
    its whole input first, a float64 copy of the logits (206 MB for the 4 x 128 prefill of gpt2-large) inside the
    limit; a few rows at a time it is a few MB."""
    sums = torch.empty(logits.shape[:-1], dtype=torch.float64)
    for index in itertools.product(*(range(n) for n in logits.shape[:-2])):
        for start in range(0, logits.shape[-2], rows):
            chunk = logits[index][start : start + rows]
            sums[index][start : start + rows] = torch.sum(chunk, dim=-1, dtype=torch.float64)
    return sums


def _report_so_far(result: dict[str, Any], stage: str) -> None:
    """Print the figures measured so far as the worker's result line: if the limit kills the process later (say in
    the prefill), the runner still reports the decode it reached (it reads the last such line)."""
    import json

    from benchmarks.worker import MARKER

    print(MARKER + json.dumps({**result, "stage": stage}, default=str), flush=True)


PACE = "BENCH_PACE "


def _paced_calls(fn: Any, shape: str, iters: int) -> dict[str, Any]:
    """``iters`` timed calls of ``fn``, each started when the runner says so: before each, a line ``BENCH_PACE
    <shape> <i>`` on stdout, then a line read from stdin (see ``benchmarks.limit_run.run_paired``)."""
    import statistics
    import sys

    times = []
    for i in range(iters):
        print(f"{PACE}{shape} {i}", flush=True)
        if not sys.stdin.readline():
            raise RuntimeError("the runner closed the pacing pipe")
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def run_limit_case(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Load under the limit, then time forwards; fills ``result`` as it goes (a kill leaves the stage reached)."""
    inputs = limit_inputs(GPTConfig.preset(spec["size"]))
    for name in _IMPORTS[spec["lib"]]:
        importlib.import_module(name)
    result["detected"] = _detected(spec["lib"])
    if spec.get("plan_largest_batch"):  # the prefill batch, the largest this case runs
        result["input_shape"] = "x".join(str(n) for n in inputs["prefill"].shape)
    gc.collect()
    result["stage"] = "load"
    start = time.perf_counter()
    model = _load(spec, result.get("input_shape"))
    result["load_s"] = time.perf_counter() - start
    result["map_bytes"] = map_summary(model)
    result["stage"] = "first output"
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        outputs["decode"] = model(inputs["decode"]).float()  # 1 x 8 x vocab: small, kept whole
        result["first_output_s"] = time.perf_counter() - start
        result["stage"] = "forward"
        for shape, iters in (("decode", spec["decode_iters"]), ("prefill", spec["prefill_iters"])):
            x = inputs[shape]
            outputs.update(_compact(shape, model(x)))  # warm-up, and the output compared below
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
            read = storage_read_bytes()
            if spec.get("paced"):
                timing = _paced_calls(lambda: model(x), shape, iters)
            else:
                timing = time_calls(lambda: model(x), 0, iters, lambda: None, budget_s=120.0, min_iters=iters)
            result[f"{shape}_major_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults) / iters
            result[f"{shape}_read_bytes"] = (storage_read_bytes() - read) / len(timing["times_s"])
            result[f"{shape}_s"] = timing["median_s"]
            result[f"{shape}_times_s"] = timing["times_s"]
            result["stream"] = _stream_stats(model)
            _report_so_far(result, f"{shape} measured")
    result["cpu_weights_resident"] = _cpu_resident(model)
    result["stream"] = _stream_stats(model)
    result["stage"] = "compare"
    if spec.get("write_ref"):
        torch.save(outputs, spec["ref_path"])
    elif spec.get("compare", True):
        result["max_abs_diff"] = compare(outputs, spec["ref_path"])
