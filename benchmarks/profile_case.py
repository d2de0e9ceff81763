"""Profile one case's steady-state forward (or its load) with cProfile, to explain a missed target.

Run after ``python -m benchmarks.run`` has built the checkpoints::

    python -m benchmarks.profile_case --lib accelerate --size gpt2 --map disk --shape decode
    python -m benchmarks.profile_case --lib ours --size gpt2 --map resident --what load
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import tempfile
from pathlib import Path

import torch

from benchmarks.cases import _IMPORTS, LOADERS, make_inputs
from benchmarks.measure import MemorySampler
from examples.gpt import GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_case", description=__doc__)
    p.add_argument("--lib", choices=sorted(LOADERS), default="ours")
    p.add_argument("--size", default="gpt2")
    p.add_argument("--fmt", choices=["safetensors", "bin"], default="safetensors")
    p.add_argument("--map", choices=["resident", "disk"], default="disk")
    p.add_argument("--shape", choices=["decode", "prefill"], default="decode")
    p.add_argument("--what", choices=["forward", "load"], default="forward")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "out"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ["torch._dynamo", *_IMPORTS[args.lib]]:
        importlib.import_module(name)  # as in the worker: imports are not part of any figure

    info = json.loads((Path(args.cache_dir) / "checkpoints" / args.size / "done.json").read_text())
    with tempfile.TemporaryDirectory() as offload:
        spec = {"lib": args.lib, "size": args.size, "fmt": args.fmt, "map": args.map, "ckpt": info["folders"][args.fmt],
                "model_bytes": info["model_bytes"], "offload_dir": offload}
        prof = cProfile.Profile()
        if args.what == "load":
            sampler = MemorySampler().start()
            prof.enable()
            model = LOADERS[args.lib](spec)
            prof.disable()
            print({k: f"{v / 1e6:.1f} MB" for k, v in sampler.stop().items()})
        else:
            model = LOADERS[args.lib](spec)
            x = make_inputs(GPTConfig.preset(args.size))[args.shape]
            with torch.inference_mode():
                model(x)
                prof.enable()
                for _ in range(args.iters):
                    model(x)
                prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
