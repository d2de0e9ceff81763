"""CPU-offloaded decode and prefill of a model larger than the GPU budget: ours against accelerate, in one interpreter.

The figures a user of one GPU wants: a GPT-NeoX-20B-shaped GPT (``--shape 20b``: 44 blocks of width 6144, vocabulary
50432, 20.2B parameters, 40.5 GB in bfloat16) with random weights, given a GPU budget it does not fit
(``--gpu-gib``, default 20), so most blocks stay in RAM and are copied in for every forward. Both libraries load the
same checkpoint with the same device map (ours plans it, blocks kept whole) and run the same inputs:

- decode-shaped forward: 1 sequence x 1 token (what each generated token costs: transfer-bound);
- prefill-shaped forward: 2 sequences x 256 tokens.

Each is the median of ``--repeats`` forwards after one warm-up (which also teaches our prefetch its order). Figures:
load seconds, milliseconds per forward, ours / accelerate ratios, the largest difference between the two libraries'
logits (bf16), and the decode forward's host-to-device rate as a share of the bare pinned bandwidth
(``offloaded bytes / decode time / pinned GB/s``; 1.0 = the bus is the only cost).

The random weights are written once, as one safetensors shard per block, by a pool of threads (each shard's values
drawn on the GPU), into ``--scratch`` (default: /dev/shm when it has room, else the temporary folder; fewer blocks
when neither has room, said in the output); the folder is deleted at the end unless ``--keep``. ``--shape gpt2``
(124M, budget half the model) is the quick cross-check. The JSON is rewritten after each library, so a run cut short
keeps what finished. Needs a CUDA GPU (exits 2 without one).

Run::

    python -m benchmarks.gpu_bigmodel --shape 20b --json big.json
    python -m benchmarks.gpu_bigmodel --shape gpt2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

from examples.gpt import GPT, GPTConfig

SHAPES = {
    "20b": dict(n_layer=44, n_head=64, n_embd=6144, vocab_size=50432, block_size=256),  # GPT-NeoX-20B's widths
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "tiny": dict(vocab_size=97, block_size=64, n_layer=4, n_head=2, n_embd=32),  # the CPU test of the writer
}
INPUTS = {"decode": (1, 1), "prefill": (2, 256)}
NO_SPLIT = ["Block"]
STD = 0.02


def gpt_config(shape: str, n_layer: Optional[int] = None) -> GPTConfig:
    fields = dict(SHAPES[shape])
    if n_layer is not None:
        fields["n_layer"] = n_layer
    return GPTConfig(**fields)


def shard_specs(config: GPTConfig, dtype: torch.dtype) -> dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """{shard file: {tensor name: (shape, dtype)}}: one shard per block, one for the rest (lm_head is tied to wte)."""
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    shards: dict[str, dict] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        parts = name.split(".")
        shard = f"block-{int(parts[2]):03d}.safetensors" if parts[:2] == ["transformer", "h"] else "rest.safetensors"
        shards.setdefault(shard, {})[name] = (tuple(tensor.shape), tensor.dtype)
    return shards


def _random_tensor(name: str, shape, dtype, generator: torch.Generator, device: str, config: GPTConfig) -> torch.Tensor:
    if name.endswith(".scale"):  # the attention's 1/sqrt(head size), a persistent buffer
        return torch.full(shape, (config.n_embd // config.n_head) ** -0.5, dtype=dtype)
    if "ln_" in name:
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32 if device == "cpu" else dtype)
    return values.mul_(STD).to("cpu", dtype)


def write_random_checkpoint(folder: Path, config: GPTConfig, dtype: torch.dtype, workers: int = 16) -> dict:
    """Write random weights for ``config`` as safetensors shards plus an HF index, the shards in parallel threads
    (values drawn on the GPU when there is one). Reuses ``folder`` when its index says it holds this shape."""
    from safetensors.torch import save_file

    key = {"config": vars(config), "dtype": str(dtype), "std": STD}
    index_path = folder / "model.safetensors.index.json"
    metadata = json.loads(index_path.read_text()).get("metadata", {}) if index_path.exists() else {}
    if metadata.get("written_for") == json.dumps(key):
        return {"reused": True, "seconds": 0.0, "bytes": metadata["total_size"]}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    specs = shard_specs(config, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()

    def write(item: tuple[int, tuple[str, dict]]) -> int:
        seed, (shard, tensors) = item
        generator = torch.Generator(device=device).manual_seed(seed)
        state = {
            name: _random_tensor(name, shape, dt, generator, device, config) for name, (shape, dt) in tensors.items()
        }
        save_file(state, str(folder / shard), metadata={"format": "pt"})
        return sum(t.numel() * t.element_size() for t in state.values())

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(specs)))) as pool:
        total = sum(pool.map(write, enumerate(sorted(specs.items()))))
    weight_map = {name: shard for shard, tensors in specs.items() for name in tensors}
    index = {"metadata": {"total_size": total, "written_for": json.dumps(key)}, "weight_map": weight_map}
    index_path.write_text(json.dumps(index, indent=1))
    return {"reused": False, "seconds": time.perf_counter() - start, "bytes": total}


def scratch_folder(requested: Optional[str], shape: str, need: int) -> tuple[Path, int]:
    """Where the checkpoint goes and how many bytes it may take: the requested folder, else /dev/shm when it has room
    for the checkpoint plus 25%, else the temporary folder. A checkpoint already there counts as room."""
    if requested:
        path = Path(requested)
    else:
        shm = Path("/dev/shm")
        room = shutil.disk_usage(shm).free if shm.is_dir() and os.access(shm, os.W_OK) else 0
        path = (shm if room > need * 1.25 else Path(tempfile.gettempdir())) / f"lbm_gpu_bigmodel_{shape}"
    path.parent.mkdir(parents=True, exist_ok=True)
    held = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
    return path, shutil.disk_usage(path.parent).free + held


def median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_ours(config: GPTConfig, checkpoint: Path, device_map: dict) -> torch.nn.Module:
    from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = GPT(config).to(torch.bfloat16)
    return load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, strict=True).eval()


def load_accelerate(config: GPTConfig, checkpoint: Path, device_map: dict) -> torch.nn.Module:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = GPT(config).to(torch.bfloat16)
    model.lm_head.weight = model.transformer.wte.weight  # accelerate's empty init unties it on assignment
    return load_checkpoint_and_dispatch(model, str(checkpoint), device_map=device_map).eval()


def unload(library: str, model: torch.nn.Module) -> None:
    if library == "ours":
        from lightning_bigmodel.pl.loader import release

        release(model)  # hooks off, pinned RAM given back
    else:
        from accelerate.hooks import remove_hook_from_submodules

        remove_hook_from_submodules(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def measure(library: str, config: GPTConfig, checkpoint: Path, device_map: dict, inputs: dict, repeats: int) -> dict:
    """Load with ``library``, time one warm-up then ``repeats`` forwards per input shape; return figures and logits."""
    loader = load_ours if library == "ours" else load_accelerate
    start = time.perf_counter()
    model = loader(config, checkpoint, device_map)
    torch.cuda.synchronize()
    figures: dict = {"load_s": time.perf_counter() - start}
    with torch.inference_mode():
        model(inputs["decode"])  # warm-up: our prefetcher learns the execution order on the first forward
        for shape, x in inputs.items():
            figures[f"{shape}_ms"] = 1e3 * median_s(lambda x=x: model(x), repeats)
        logits = model(inputs["prefill"])[:, -1].float().cpu()
    unload(library, model)
    return figures, logits


def plan(config: GPTConfig, gpu_bytes: int) -> tuple[dict, int, int]:
    """Our plan for the GPU budget (blocks whole, the rest in RAM), with the model's and the offloaded bytes."""
    from lightning_bigmodel import compute_module_sizes, infer_device_map, init_empty_weights

    with init_empty_weights():
        skeleton = GPT(config).to(torch.bfloat16)
    sizes = compute_module_sizes(skeleton)
    budget = {0: gpu_bytes, "cpu": sizes[""]}  # the RAM takes what the GPU cannot
    device_map = infer_device_map(skeleton, budget, no_split_module_classes=NO_SPLIT)
    offloaded = sum(sizes[key] for key, device in device_map.items() if device == "cpu")
    if not offloaded or not any(isinstance(device, int) for device in device_map.values()):
        raise RuntimeError(f"the plan {device_map} does not split the model between GPU 0 and RAM; change --gpu-gib")
    return device_map, sizes[""], offloaded


def run(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    from benchmarks.gpu_offload import pinned_bandwidth

    config = gpt_config(args.shape)
    specs = shard_specs(config, torch.bfloat16)
    nbytes = lambda shard: sum(torch.Size(shape).numel() * 2 for shape, _ in specs[shard].values())  # noqa: E731
    per_block, rest = nbytes("block-000.safetensors"), nbytes("rest.safetensors")
    folder, free = scratch_folder(args.scratch, args.shape, per_block * config.n_layer + rest)
    fits = int((free * 0.8 - rest) // per_block)
    if fits < config.n_layer:  # said in the output and in the JSON (config.n_layer)
        print(f"gpu_bigmodel: {free / 1e9:.0f} GB free at {folder.parent}: {fits} of {config.n_layer} blocks written")
        config = gpt_config(args.shape, n_layer=max(fits, 2))
    result: dict = {"shape": args.shape, "config": vars(config), "gpu": torch.cuda.get_device_name(0),
                    "inputs": {k: list(v) for k, v in INPUTS.items()}, "repeats": args.repeats,
                    "scratch": str(folder)}  # fmt: skip
    written = write_random_checkpoint(folder, config, torch.bfloat16, workers=args.workers)
    result["checkpoint"] = written
    how = "reused" if written["reused"] else f"written in {written['seconds']:.1f} s"
    print(f"gpu_bigmodel: {written['bytes'] / 1e9:.1f} GB of random bf16 weights {how} at {folder}")
    gpu_bytes = args.gpu_gib * 2**30 if args.shape == "20b" else None
    device_map, total, offloaded = plan(config, gpu_bytes or written["bytes"] // 2)
    result.update(model_bytes=total, offloaded_bytes=offloaded, gpu_budget=gpu_bytes or written["bytes"] // 2)
    result["pinned_h2d_GBps"] = pinned_bandwidth(min(offloaded, 2**30), repeats=5) / 1e9
    save(result)
    gen = torch.Generator().manual_seed(1)
    inputs = {k: torch.randint(0, config.vocab_size, shape, generator=gen).cuda() for k, shape in INPUTS.items()}
    logits = {}
    for library in args.libs.split(","):
        result[library], logits[library] = measure(library, config, folder, device_map, inputs, args.repeats)
        save(result)
    if {"ours", "accelerate"} <= set(logits):
        result["max_abs_logit_diff"] = (logits["ours"] - logits["accelerate"]).abs().max().item()
    if "ours" in result:
        rate = offloaded / (result["ours"]["decode_ms"] / 1e3)  # bytes copied in per second of a decode forward
        result["decode_share_of_pinned"] = rate / (result["pinned_h2d_GBps"] * 1e9)
    save(result)
    return result


def markdown(result: dict) -> str:
    lines = [
        f"gpu_bigmodel: {result['gpu']}, GPT {result['shape']}-shaped ({result['config']['n_layer']} blocks, width "
        f"{result['config']['n_embd']}) bf16, {result['model_bytes'] / 1e9:.1f} GB, GPU budget "
        f"{result['gpu_budget'] / 2**30:.1f} GiB: {result['offloaded_bytes'] / 1e9:.1f} GB in RAM; "
        f"pinned host-to-device {result['pinned_h2d_GBps']:.1f} GB/s",
        "",
        "| library | load s | decode ms (1 x 1) | prefill ms (2 x 256) | decode tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for library in ("ours", "accelerate"):
        if library in result:
            r = result[library]
            lines.append(f"| {library} | {r['load_s']:.1f} | {r['decode_ms']:.1f} | {r['prefill_ms']:.1f} | "
                         f"{1e3 / r['decode_ms']:.2f} |")  # fmt: skip
    if "ours" in result and "accelerate" in result:
        o, a = result["ours"], result["accelerate"]
        lines.append(f"| ours / accelerate | {o['load_s'] / a['load_s']:.2f} | {o['decode_ms'] / a['decode_ms']:.2f} | "
                     f"{o['prefill_ms'] / a['prefill_ms']:.2f} | - |")  # fmt: skip
        lines.append(f"| largest logit difference, ours vs accelerate | {result['max_abs_logit_diff']:.3g} | | | |")
    if "decode_share_of_pinned" in result:
        share = result["decode_share_of_pinned"]
        lines.append(f"| ours: decode transfer rate / pinned bandwidth | {share:.2f} | | | |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="20b", choices=["20b", "gpt2"])
    parser.add_argument("--gpu-gib", type=float, default=20.0, help="GPU budget for --shape 20b (GiB)")
    parser.add_argument("--libs", default="ours,accelerate", help="comma-separated, in order: ours, accelerate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="threads writing shards")
    parser.add_argument("--scratch", default=None, help="folder for the random checkpoint (kept)")
    parser.add_argument("--keep", action="store_true", help="keep the default scratch checkpoint for the next run")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file (after each library)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bigmodel: needs a CUDA GPU (torch.cuda.is_available() is False).", file=sys.stderr)
        raise SystemExit(2)

    def save(result: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time cap's TERM still deletes the scratch checkpoint
    try:
        result = run(args, save)
    finally:  # a checkpoint in /dev/shm holds RAM until it is deleted
        if not args.keep and not args.scratch:
            shutil.rmtree(Path("/dev/shm") / f"lbm_gpu_bigmodel_{args.shape}", ignore_errors=True)
            shutil.rmtree(Path(tempfile.gettempdir()) / f"lbm_gpu_bigmodel_{args.shape}", ignore_errors=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
