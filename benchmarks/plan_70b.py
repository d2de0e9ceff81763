"""A Llama-3-70B-shaped model planned and memory-simulated on paper: weights and peak per device, what fits, what to
change.

The model is ``transformers.LlamaForCausalLM`` built on the meta device from a Llama-3-70B-shaped ``LlamaConfig`` (80
layers, hidden 8192, 64 heads, 8 KV heads, intermediate 28672, vocabulary 128256; bfloat16 weights: 141 GB), so
nothing is allocated. For every setup and batch it plans twice with ``no_split_module_classes=["LlamaDecoderLayer"]``:

- *weights only*: ``infer_device_map`` as without an input shape; then ``simulate_memory`` runs the plan's forward and
  decode on fake tensors and reports each device's peak (activations, KV cache of ``--new-tokens`` steps, staging of
  offloaded layers);
- *fitted*: ``infer_device_map(..., input_shape=..., max_new_tokens=...)``, which re-plans until every peak fits.

Run (about 5-10 minutes on 2 cores; every simulation is timed)::

    python -m benchmarks.plan_70b --out benchmarks/PLAN_70B.md
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from lightning_bigmodel import infer_device_map, init_empty_weights
from lightning_bigmodel.simulate import simulate_memory
from lightning_bigmodel.fitting import excess, token_ids

GB = 10**9
SETUPS = {
    "8 x 80 GB": {**{gpu: 80 * GB for gpu in range(8)}, "cpu": 0},
    "4 x 80 GB": {**{gpu: 80 * GB for gpu in range(4)}, "cpu": 0},
    "2 x 24 GB + 256 GB CPU + disk": {0: 24 * GB, 1: 24 * GB, "cpu": 256 * GB},
}
BATCHES = ("1x4096", "8x2048")
NO_SPLIT = ["LlamaDecoderLayer"]


def llama_70b() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    with init_empty_weights():
        return LlamaForCausalLM(config)


def _gb(n: float) -> str:
    return f"{n / GB:.1f}"


def describe(memory: dict, budget: dict) -> dict[str, str]:
    """Compact cells: GPU weights and peaks as ``min-max`` GB (and the fullest GPU), CPU/disk, and what is over."""
    gpus = {d: u for d, u in memory.items() if isinstance(d, int)}
    cells = {}
    for what in ("weights", "peak"):
        values = [u[what] for u in gpus.values()]
        span = _gb(min(values)) if values and min(values) == max(values) else f"{_gb(min(values))}-{_gb(max(values))}"
        cells[what] = span if values else "-"
    fullest = max(gpus, key=lambda d: gpus[d]["peak"]) if gpus else None
    cells["fullest"] = f"cuda:{fullest}" if fullest is not None else "-"
    cells["host"] = ", ".join(f"{d} {_gb(u['weights'])}/{_gb(u['peak'])}" for d, u in memory.items() if not isinstance(d, int)) or "-"
    over = excess(memory, budget)
    cells["over"] = ", ".join(f"{f'cuda:{d}' if isinstance(d, int) else d} +{_gb(n)}" for d, n in over.items())
    return cells


def run_case(model: torch.nn.Module, setup: str, batch: str, new_tokens: int) -> dict[str, Any]:
    budget = SETUPS[setup]
    plan_kwargs = {"no_split_module_classes": NO_SPLIT, "dtype": torch.bfloat16, "policy": "auto"}
    started = time.perf_counter()
    plain = infer_device_map(model, budget, **plan_kwargs)
    sim_started, cpu_started = time.perf_counter(), time.process_time()
    memory = simulate_memory(model, plain, token_ids(batch), new_tokens, dtype=torch.bfloat16)
    row: dict[str, Any] = {"setup": setup, "batch": batch, "plain": describe(memory, budget),
                           "simulate_s": time.perf_counter() - sim_started, "simulate_cpu_s": time.process_time() - cpu_started}  # fmt: skip
    if excess(memory, budget):
        try:
            fitted = infer_device_map(model, budget, input_shape=batch, max_new_tokens=new_tokens, **plan_kwargs)
            row["fitted"] = describe(simulate_memory(model, fitted, token_ids(batch), new_tokens, dtype=torch.bfloat16), budget)
        except ValueError as err:
            row["fitted_error"] = str(err).split(":", 1)[0]
    row["total_s"] = time.perf_counter() - started
    return row


def markdown(rows: list[dict[str, Any]], new_tokens: int) -> str:
    lines = [
        f"Llama-3-70B shape, bfloat16 (141 GB of weights), {new_tokens} new tokens; sizes in GB (10^9 bytes); "
        "GPU columns give the range over the GPUs; `cpu w/p` is weights/peak.",
        "",
        "| setup | batch | GPU weights | GPU peak (fullest) | cpu, disk w/p | fits? | planned with `input_shape` |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        plain = row["plain"]
        fits = "yes" if not plain["over"] else f"no: {plain['over']}"
        if "fitted" in row:
            fitted = row["fitted"]
            change = f"GPU weights {fitted['weights']}, peak {fitted['peak']}; {fitted['host']}"
        elif "fitted_error" in row:
            change = row["fitted_error"]
        else:
            change = "same plan"
        lines.append(
            f"| {row['setup']} | {row['batch']} | {plain['weights']} | {plain['peak']} ({plain['fullest']}) | "
            f"{plain['host']} | {fits} | {change} |"
        )
    slowest = max(rows, key=lambda row: row["simulate_s"])
    lines += ["", f"Slowest single memory simulation: {slowest['simulate_s']:.1f} s wall, {slowest['simulate_cpu_s']:.1f} s "
              f"CPU ({slowest['setup']}, {slowest['batch']}); the whole table: {sum(r['total_s'] for r in rows):.0f} s."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of: " + ", ".join(SETUPS))
    parser.add_argument("--batches", default=",".join(BATCHES))
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    model = llama_70b()
    rows = []
    for setup in args.setups.split(","):
        for batch in args.batches.split(","):
            rows.append(run_case(model, setup.strip(), batch.strip(), args.new_tokens))
            print(f"{setup} {batch}: {rows[-1]}", flush=True)
    text = markdown(rows, args.new_tokens)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
