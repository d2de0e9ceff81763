"""CPU-offloaded forwards on one GPU: pinned host-to-device bandwidth, the share of it an offloaded forward gets,
and how much of the transfer the prefetch hides.

A GPT (random weights, ``--dtype``) runs three ways on GPU 0, each timed as the median of ``--repeats`` forwards after
warm-up, for a decode-shaped (1 x 8 tokens) and a prefill-shaped (4 x 128) batch:

- *resident*: every weight on the GPU;
- *offloaded*: ``max_memory={0: half the model}``, blocks kept whole, the rest in pinned RAM and copied in per
  forward by the dispatch hooks, the next block prefetched on a side stream (the library's default);
- *offloaded, no prefetch*: the same map with the prefetch turned off (each block copied in when it starts).

Figures: ``pinned_h2d_GBps`` (a bare ``copy_`` of a pinned buffer as large as the offloaded weights);
``transfer_share`` = (offloaded bytes / (no-prefetch time - resident time)) / pinned bandwidth, how close the
synchronous copies come to the bus; ``overlap`` = (no-prefetch time - prefetch time) / (no-prefetch time - resident
time), the share of the transfer time the prefetch hides (1.0: all of it); ``offloaded_vs_resident`` = prefetch time /
resident time. Needs a CUDA GPU (exits 2 without one).

Run::

    python -m benchmarks.gpu_offload                       # gpt2 (124M), float16
    python -m benchmarks.gpu_offload --preset gpt2-large --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable

import torch

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import dispatch_model, infer_device_map, remove_dispatch
from lightning_bigmodel.offload.hooks import RootHook, WeightHook
from lightning_bigmodel.planning.sizes import compute_module_sizes

SHAPES = {"decode": (1, 8), "prefill": (4, 128)}


def median_s(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, the GPU synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pinned_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a host-to-device copy from pinned memory (a buffer of ``nbytes``)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    seconds = median_s(lambda: device.copy_(host, non_blocking=True), warmup=2, repeats=repeats)
    return nbytes / seconds


def disable_prefetch(model: torch.nn.Module) -> int:
    """Turn the prefetch of a dispatched model off on its hook objects (the library has no switch for it: this
    benchmark needs the synchronous copies as the baseline); return how many hooks were changed."""
    changed = 0
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for fn in hooks.values():
                owner = getattr(fn, "__self__", None)
                if isinstance(owner, (WeightHook, RootHook)) and owner.prefetcher is not None:
                    owner.prefetcher = None
                    changed += 1
    return changed


def time_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor], args: argparse.Namespace) -> dict[str, float]:
    with torch.inference_mode():
        return {shape: median_s(lambda x=x: model(x), args.warmup, args.repeats) for shape, x in inputs.items()}


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = GPTConfig.preset(args.preset)
    base = GPT(config).eval().requires_grad_(False).to(getattr(torch, args.dtype))
    total = compute_module_sizes(base)[""]
    device_map = infer_device_map(base, {0: total // 2, "cpu": 4 * total}, no_split_module_classes=["Block"])
    sizes = compute_module_sizes(base)
    if not any(isinstance(device, int) for device in device_map.values()) or "cpu" not in device_map.values():
        raise RuntimeError(f"the plan {device_map} does not split {args.preset} between GPU 0 and pinned RAM; use a larger preset")
    offloaded = sum(sizes[key] for key, device in device_map.items() if device == "cpu")
    gen = torch.Generator().manual_seed(1)
    inputs = {
        k: torch.randint(0, config.vocab_size, (batch, min(seq, config.block_size)), generator=gen).cuda()
        for k, (batch, seq) in SHAPES.items()
    }
    times = {}
    for variant in ("resident", "offloaded", "offloaded_no_prefetch"):
        model = copy.deepcopy(base)
        dispatch_model(model, {"": 0} if variant == "resident" else device_map)
        if variant == "offloaded_no_prefetch" and not disable_prefetch(model):
            raise RuntimeError("no prefetching hook found: the offloaded map did not offload anything")
        times[variant] = time_model(model, inputs, args)
        remove_dispatch(model)
        del model
        torch.cuda.empty_cache()
    bandwidth = pinned_bandwidth(max(offloaded, 1), args.repeats)
    result = {"preset": args.preset, "dtype": args.dtype, "gpu": torch.cuda.get_device_name(0),
              "model_bytes": total, "offloaded_bytes": offloaded, "pinned_h2d_GBps": bandwidth / 1e9, "times_s": times}  # fmt: skip
    for shape in SHAPES:
        resident, prefetch, sync = (times[v][shape] for v in ("resident", "offloaded", "offloaded_no_prefetch"))
        transfer = max(sync - resident, 1e-9)
        result[shape] = {
            "transfer_share": offloaded / transfer / bandwidth,
            "overlap": (sync - prefetch) / transfer,
            "offloaded_vs_resident": prefetch / resident,
        }
    return result


def markdown(result: dict) -> str:
    lines = [
        f"GPU offload ({result['gpu']}, GPT {result['preset']} {result['dtype']}, "
        f"{result['offloaded_bytes'] / 1e6:.0f} MB of {result['model_bytes'] / 1e6:.0f} MB in pinned RAM): "
        f"pinned host-to-device {result['pinned_h2d_GBps']:.1f} GB/s",
        "",
        "| shape | resident ms | offloaded ms | no prefetch ms | transfer share of pinned bandwidth | overlap | offloaded/resident |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for shape in SHAPES:
        t = {v: result["times_s"][v][shape] * 1e3 for v in ("resident", "offloaded", "offloaded_no_prefetch")}
        r = result[shape]
        lines.append(
            f"| {shape} | {t['resident']:.2f} | {t['offloaded']:.2f} | {t['offloaded_no_prefetch']:.2f} | "
            f"{r['transfer_share']:.2f} | {r['overlap']:.2f} | {r['offloaded_vs_resident']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2", help="GPT preset (examples/gpt.py)")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu_offload: needs a CUDA GPU (torch.cuda.is_available() is False).", file=sys.stderr)
        raise SystemExit(2)
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return result


if __name__ == "__main__":
    main()
