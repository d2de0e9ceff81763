"""Micro-batch pipelining: forward time of one GPT batch, unsplit against split into micro-batches.

With two or more GPUs the GPT is dispatched with its blocks spread evenly over them (embeddings on the
first, final norm and head on the last) and the pipeline can overlap the devices. With one GPU or none
there is nothing to overlap: the script still runs (on the CPU it fakes a device map over ``--fake-devices``
devices, every tensor on the CPU), checks that outputs equal the unsplit batch, and reports the cost of
splitting and scheduling, labelled "overlap not measurable".

Run::

    python -m benchmarks.pipeline_bench --threads 1         # CPU: small preset, fake 2-device map
    python -m benchmarks.pipeline_bench --preset gpt2-large --batch 32 --seq 256   # all visible GPUs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import dispatch_model
from lightning_bigmodel.pipeline import MicroBatchPipeline


def spread_map(config: GPTConfig, devices: int) -> dict[str, int]:
    """Blocks split evenly over ``devices``; embeddings on the first, final norm and head on the last."""
    device_map = {"transformer.wte": 0, "transformer.wpe": 0}
    for i in range(config.n_layer):
        device_map[f"transformer.h.{i}"] = i * devices // config.n_layer
    device_map.update({"transformer.ln_f": devices - 1, "lm_head": devices - 1})
    return device_map


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], torch.Tensor], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, all devices synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def build(args: argparse.Namespace) -> tuple[GPT, torch.device, str]:
    """The GPT, where its inputs go, and a label saying what can overlap."""
    torch.manual_seed(0)
    config = GPTConfig.preset(args.preset)
    config.tie_weights = False  # keep the head on the last device without a cross-device tie
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.gpus is not None:
        gpus = min(gpus, args.gpus)
    model = GPT(config).eval().requires_grad_(False)
    if gpus >= 2:
        model = model.to(getattr(torch, args.dtype))
        dispatch_model(model, spread_map(config, gpus))
        return model, torch.device("cuda", 0), f"{gpus} GPUs ({torch.cuda.get_device_name(0)})"
    if gpus == 1:
        model = model.to("cuda", getattr(torch, args.dtype))
        return model, torch.device("cuda", 0), "1 GPU: overlap not measurable (nothing to overlap with)"
    model.hf_device_map = spread_map(config, args.fake_devices)  # fake devices, all on the CPU
    return model, torch.device("cpu"), f"no GPU: overlap not measurable (fake {args.fake_devices}-device map on CPU)"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="GPT preset (default: gpt2 on GPUs, small on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on GPUs, 16 on CPU)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sample")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--gpus", type=int, default=None, help="use at most this many GPUs (default: all)")
    parser.add_argument("--fake-devices", type=int, default=2, help="devices of the fake map on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs: 1 is steadiest)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.preset = args.preset or ("gpt2" if on_gpu else "small")
    args.batch = args.batch or (32 if on_gpu else 16)

    model, device, label = build(args)
    seq = min(args.seq, model.config.block_size)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    rows = []
    with torch.inference_mode():
        reference = model(ids)
        base = time_ms(lambda: model(ids), args.warmup, args.repeats)
        rows.append({"micro_batches": 1, "ms": base, "speedup": 1.0, "max_abs_diff": 0.0})
        for n in args.micro_batches:
            with MicroBatchPipeline(model, micro_batches=n) as pipe:
                out = pipe(ids)
                diff = (out.float() - reference.float()).abs().max().item()
                ms = time_ms(lambda: pipe(ids), args.warmup, args.repeats)
            rows.append({"micro_batches": n, "ms": ms, "speedup": base / ms, "max_abs_diff": diff})

    print(f"GPT {args.preset}, batch {args.batch} x {seq} tokens, {label}")
    print(f"{'micro-batches':>13} {'ms/batch':>10} {'speedup':>8} {'max |diff|':>11}")
    for row in rows:
        print(f"{row['micro_batches']:>13} {row['ms']:>10.1f} {row['speedup']:>7.2f}x {row['max_abs_diff']:>11.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": label, "preset": args.preset, "batch": args.batch, "seq": seq, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
