"""Peak GPU and pinned memory of real offloaded forwards, against what the plan said (``simulate_memory``).

A GPT (random weights, float16) is planned with ``max_memory={0: half the model}`` and blocks kept whole, so part of
it sits in pinned RAM and is copied in per forward (prefetching the next block). The memory simulation's figures for
that map and batch are printed beside what the run measures:

- GPU 0: ``torch.cuda.max_memory_allocated`` over the load and three forwards, against the simulated peak;
- pinned RAM: bytes the dispatch page-locked (``lightning_bigmodel.offload.pinned.pinned_bytes``) against the planned
  ``"cpu"`` weights, and the peak of torch's caching host allocator (staging), which the plan does not hold weights in.

Exit status 1 when a measured peak is above the plan by more than ``--tolerance`` (default 10%) plus 64 MiB (the CUDA
context's allocations are not in ``max_memory_allocated``; cuBLAS workspaces are). Needs a CUDA GPU (exits 2 without).

Run::

    python -m benchmarks.gpu_memory_vs_plan                 # gpt2 (124M), batch 4 x 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

SLACK = 64 * 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_memory_vs_plan: needs a CUDA GPU.")
        return 2
    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel import (
        compute_module_sizes,
        infer_device_map,
        init_empty_weights,
        load_checkpoint_and_dispatch,
        save_sharded_checkpoint,
    )
    from lightning_bigmodel.offload import pinned
    from lightning_bigmodel.simulate import simulate_memory

    config = GPTConfig.preset(args.preset)
    with init_empty_weights():
        skeleton = GPT(config).to(torch.float16)
    total = compute_module_sizes(skeleton)[""]
    device_map = infer_device_map(skeleton, {0: total // 2, "cpu": 4 * total}, no_split_module_classes=["Block"])
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    plan = simulate_memory(skeleton, device_map, (ids,))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = save_sharded_checkpoint(GPT(config).to(torch.float16), Path(folder) / "ckpt")
        torch.cuda.reset_peak_memory_stats(0)
        torch.cuda.reset_peak_host_memory_stats()
        pinned_before = pinned.pinned_bytes()
        with init_empty_weights():
            model = GPT(config).to(torch.float16).eval()
        load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map)
        with torch.inference_mode():
            for _ in range(3):  # the first learns the prefetch order
                model(ids.cuda())
        torch.cuda.synchronize()
    gpu_peak = torch.cuda.max_memory_allocated(0)
    locked = pinned.pinned_bytes() - pinned_before
    staging = torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)
    rows = [
        ("GPU 0 peak", plan[0]["peak"], gpu_peak),
        ("pinned weights", plan.get("cpu", {}).get("weights", 0), locked),
    ]
    devices = sorted(set(device_map.values()), key=str)
    print(f"gpu_memory_vs_plan: {args.preset} float16, batch {args.batch} x {args.seq}, map over {devices}")
    print("| what | plan (bytes) | measured (bytes) | measured / plan |")
    print("| --- | --- | --- | --- |")
    over = []
    for what, planned, measured in rows:
        ratio = f"{measured / planned:.3f}" if planned else "-"
        print(f"| {what} | {planned} | {measured} | {ratio} |")
        if measured > planned * (1 + args.tolerance) + SLACK:
            over.append(what)
    print(f"| pinned staging (torch's host allocator, peak) | - | {staging} | - |")
    if args.json:
        figures = {"preset": args.preset, "batch": [args.batch, args.seq], "devices": [str(d) for d in devices],
                   "rows": [{"what": w, "plan": p, "measured": m} for w, p, m in rows], "staging_peak": staging,
                   "above_plan": over}  # fmt: skip
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)
    if over:
        print(f"gpu_memory_vs_plan: above the plan: {over}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
