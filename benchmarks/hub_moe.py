"""Loading a Hub-layout Mixtral checkpoint (per-expert tensors merged while loading): ``python -m benchmarks.hub_moe``.

A Mixtral-shaped model with random weights (default: 4 layers, 8 experts, hidden 512, expert width 1536, float32,
about 330 MB) is saved with ``save_pretrained`` in 50 MB shards (the Hub layout: ``block_sparse_moe.experts.N.w1/w2/w3``).
Each case runs in a fresh process and loads it:

- ``transformers``: ``MixtralForCausalLM.from_pretrained(folder)`` (the reference: transformers' own conversion);
- ``ours cpu``: ``init_empty_weights`` + ``load_checkpoint_and_dispatch(device_map={"": "cpu"})``;
- ``ours cpu+disk``: the same with the second half of the layers on ``"disk"`` (empty offload folder), then ``reused``
  (the converted expert tensors already in the offload folder).

Reported per case: the time to build the model on meta (ours; ``from_pretrained`` builds inside its load), the load
time, anonymous RSS growth at its peak during build and load and right after them (``/proc/self/status``
``RssAnon``, sampled every 2 ms), and the transient (peak minus final) next to the largest converted tensor (one
layer's fused ``gate_up_proj``). Logits of every case are compared with the reference's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "HUB_MOE_RESULT "
CASES = ("transformers", "ours-cpu", "ours-disk", "ours-disk-reused")
SHAPE = dict(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)  # fmt: skip


def _config():
    import transformers

    return transformers.MixtralConfig(**SHAPE)


def build(folder: Path) -> None:
    """Save the random model in the Hub layout once."""
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.MixtralForCausalLM(_config()).save_pretrained(folder, max_shard_size="50MB")


def _case(case: str, folder: Path, offload: Path) -> dict:
    import torch
    import transformers

    from benchmarks.measure import MemorySampler
    from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    torch.set_num_threads(2)
    with init_empty_weights():  # warm-up: import the modelling code outside the measured window
        transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**SHAPE, "num_hidden_layers": 1}))
    sampler = MemorySampler(interval=0.002).start()
    start = time.perf_counter()
    if case == "transformers":
        model = transformers.MixtralForCausalLM.from_pretrained(folder)
        built = start
    else:
        with init_empty_weights():
            model = transformers.MixtralForCausalLM(_config())
        built = time.perf_counter()
        layers = SHAPE["num_hidden_layers"]
        device_map = {"": "cpu"}
        if case != "ours-cpu":
            device_map.update({f"model.layers.{i}": "disk" for i in range(layers // 2, layers)})
        load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=offload)
    done = time.perf_counter()
    memory = sampler.stop()
    final_anon = _anon() - sampler.baseline.get("RssAnon", 0)
    with torch.no_grad():
        logits = model.eval()(torch.arange(16).reshape(2, 8)).logits
    return {"case": case, "build_s": built - start, "load_s": done - built, **memory, "final_anon": final_anon,
            "logits": logits.flatten()[:64].tolist()}  # fmt: skip


def _anon() -> int:
    from benchmarks.measure import read_status

    return read_status().get("RssAnon", 0)


def _run_case(case: str, folder: Path, offload: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.hub_moe", "--case", case, "--folder", str(folder),
               "--offload", str(offload)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    raise RuntimeError(f"case {case} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-1500:]}")


def _report(results: list[dict]) -> str:
    h, e, i = SHAPE["hidden_size"], SHAPE["num_local_experts"], SHAPE["intermediate_size"]
    largest = e * 2 * i * h * 4
    reference = results[0]["logits"]
    mib = 2**20
    lines = [f"Mixtral-shaped, {SHAPE}; largest converted tensor (one layer's gate_up_proj): {largest / mib:.1f} MiB",
             "", "| case | build s | load s | peak anon growth MiB | final anon growth MiB | transient MiB | transient / largest "
             "| logits equal |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        transient = r["peak_anon_growth"] - r["final_anon"]
        lines.append(f"| {r['case']} | {r['build_s']:.2f} | {r['load_s']:.2f} | {r['peak_anon_growth'] / mib:.1f} | "
                     f"{r['final_anon'] / mib:.1f} | {transient / mib:.1f} | {transient / largest:.2f} | "
                     f"{r['logits'] == reference} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "out" / "hub_moe"))
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--folder")
    parser.add_argument("--offload")
    parser.add_argument("--out", help="also write the Markdown report here")
    args = parser.parse_args()
    if args.case:  # one case, in this (fresh) process
        print(MARKER + json.dumps(_case(args.case, Path(args.folder), Path(args.offload))), flush=True)
        return
    cache = Path(args.cache_dir)
    folder, offload = cache / "mixtral", cache / "offload"
    build(folder)
    if offload.exists():
        import shutil

        shutil.rmtree(offload)
    report = f"Command: `python -m benchmarks.hub_moe`\n\n" + _report([_run_case(case, folder, offload) for case in CASES])
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
