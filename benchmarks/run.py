"""One command for the whole benchmark: ``python -m benchmarks.run [--quick] [--sizes small,gpt2] [--repeat N]``.

Builds (or reuses) the checkpoints under ``--cache-dir``, runs every case in a fresh process (``benchmarks.worker``),
round-robin over ``--repeat`` rounds, and writes the Markdown report (``--out``) plus the raw JSON next to the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import machine_info, read_files
from benchmarks.worker import MARKER

ROOT = Path(__file__).resolve().parent.parent
FULL_ITERS = {"decode": [3, 20], "prefill": [1, 5]}
SMALL_ITERS = {"decode": [3, 30], "prefill": [2, 10]}
QUICK_ITERS = {"decode": [1, 3], "prefill": [1, 2]}
LIBS = ("plain", "accelerate", "ours", "trainer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--sizes", default=None, help="comma-separated GPT presets (default: small,gpt2; quick: tiny)")
    p.add_argument("--quick", action="store_true", help="tiny model, few iterations, small micro cases (< 60 s)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every case (medians are reported)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"), help="Markdown report path")
    p.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "out"), help="checkpoints, offload, raw JSON")
    p.add_argument("--libs", default=",".join(LIBS), help=f"subset of {','.join(LIBS)}")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    p.add_argument("--timeout", type=int, default=600, help="seconds before a case is killed and reported")
    p.add_argument("--no-micro", action="store_true", help="skip the empty-init and planning cases")
    p.add_argument("--notes", default=None, help="Markdown appended to the report when the file exists (default: "
                   "benchmarks/NOTES.md, the analysis of the full run; none with --quick)")
    p.add_argument("--report-only", action="store_true", help="re-write --out from <cache-dir>/results.json, no runs")
    p.add_argument("--only", default=None, help="run only the cases whose id contains this text (e.g. 'bin/resident')")
    return p.parse_args(argv)


def _maps(cuda: bool, lib: str) -> list[str]:
    if lib == "plain":
        return ["resident"] + (["resident_gpu"] if cuda else [])
    return ["resident", "disk"] + (["resident_gpu", "cpu_offload"] if cuda else [])


def load_specs(size: str, info: dict, args: argparse.Namespace, cuda: bool, libs: list[str]) -> list[dict]:
    """Every load-and-forward case of one checkpoint size; the plain safetensors case first (it writes the reference)."""
    cache = Path(args.cache_dir)
    iters = QUICK_ITERS if args.quick else SMALL_ITERS if info["model_bytes"] < 50 * 10**6 else FULL_ITERS
    ref = str(cache / "ref" / f"{size}.pt")
    specs = []
    for lib in libs:
        for fmt in ("safetensors",) if (args.quick and lib == "trainer") else ("safetensors", "bin"):
            for map_name in _maps(cuda, lib):
                fwd = iters if fmt == "safetensors" else {"decode": iters["decode"]} if map_name != "resident" else None
                if lib == "plain" and fmt == "bin":
                    fwd = None
                case_id = f"{size}/{lib}/{fmt}/{map_name}"
                specs.append({
                    "kind": "trainer" if lib == "trainer" else "load", "id": case_id, "lib": lib, "size": size,
                    "fmt": fmt, "map": map_name, "ckpt": info["folders"][fmt], "shards": info["shards"][fmt],
                    "model_bytes": info["model_bytes"], "threads": args.threads, "fwd": fwd, "ref_path": ref,
                    "write_ref": lib == "plain" and fmt == "safetensors" and map_name == "resident",
                    "offload_dir": str(cache / "offload" / case_id.replace("/", "-")),
                })
    specs.sort(key=lambda s: not s["write_ref"])
    return specs


def micro_specs(args: argparse.Namespace, libs: list[str]) -> list[dict]:
    from benchmarks.cases_micro import INIT_CONFIG, PLAN_CONFIG, QUICK_INIT_CONFIG, QUICK_PLAN_CONFIG

    init_cfg = QUICK_INIT_CONFIG if args.quick else INIT_CONFIG
    plan_cfg = QUICK_PLAN_CONFIG if args.quick else PLAN_CONFIG
    specs = []
    for lib in ("ours", "accelerate", "torch_meta"):
        if lib in libs or (lib == "torch_meta" and not args.quick):
            specs.append({"kind": "empty_init", "id": f"empty_init/{lib}", "lib": lib, "config": init_cfg})
    for lib in ("ours", "accelerate"):
        if lib in libs:
            specs.append({"kind": "plan", "id": f"plan/{lib}", "lib": lib, "config": plan_cfg})
    for spec in specs:
        spec["threads"] = args.threads
    return specs


def reuse_specs(size: str, info: dict, args: argparse.Namespace) -> list[dict]:
    """Reloading a reused offload folder (``.bin`` checkpoint, every weight on disk): checksums verified vs not."""
    case_id = f"{size}/ours/reuse"
    return [{"kind": "reuse", "id": case_id, "lib": "ours", "size": size, "ckpt": info["folders"]["bin"],
             "shards": info["shards"]["bin"], "threads": args.threads, "rounds": 1 if args.quick else 3,
             "offload_dir": str(Path(args.cache_dir) / "offload" / case_id.replace("/", "-"))}]


def run_worker(spec: dict, timeout: int) -> dict[str, Any]:
    """Run one case in a fresh interpreter; a crash, kill or timeout becomes ``{"ok": False, "error": ...}``."""
    if spec.get("offload_dir"):
        shutil.rmtree(spec["offload_dir"], ignore_errors=True)
    if spec.get("shards"):
        read_files([Path(p) for p in spec["shards"]])  # warm page cache for every case alike
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "stage": "timeout", "error": f"killed after {timeout} s (--timeout)"}
    finally:
        if spec.get("offload_dir"):
            shutil.rmtree(spec["offload_dir"], ignore_errors=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
            break
    else:
        tail = (proc.stderr or proc.stdout)[-1500:]
        result = {"ok": False, "stage": "crash", "error": f"worker exited with {proc.returncode}: {tail}"}
    result["process_s"] = time.perf_counter() - start
    return result


def summarise(spec: dict, result: dict) -> str:
    if not result.get("ok"):
        return f"FAILED at {result.get('stage')}: {result.get('error', '')[:200]}"
    bits = []
    for key, unit, scale in (("load_s", "s", 1), ("decode_s", "ms", 1e3), ("prefill_s", "ms", 1e3),
                             ("init_s", "s", 1), ("plan_s", "s", 1), ("reuse_s", "s", 1),
                             ("reuse_unverified_s", "s", 1)):
        if key in result:
            bits.append(f"{key[:-2]} {result[key] * scale:.3g} {unit}")
    if "peak_anon_growth" in result and spec.get("model_bytes"):
        bits.append(f"anon peak {result['peak_anon_growth'] / spec['model_bytes']:.2f}x model")
    return ", ".join(bits)


def merge(runs: list[dict]) -> dict[str, Any]:
    """Over the successful rounds: the minimum of each time (``*_s``: the least disturbed round on a shared machine),
    the median of every other number. The first failure when no round succeeded."""
    good = [r for r in runs if r.get("ok")]
    if not good:
        return runs[0]
    merged = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            pick = min if key.endswith("_s") else statistics.median
            merged[key] = pick(r[key] for r in good if key in r)
    merged["repeats_ok"] = len(good)
    merged["repeats"] = len(runs)
    return merged


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.notes is None:
        args.notes = "" if args.quick else str(ROOT / "benchmarks" / "NOTES.md")
    if args.report_only:
        return rewrite_report(args)
    import torch

    from benchmarks.checkpoints import build_checkpoints
    from benchmarks.report import write_report

    command = " ".join(["python -m benchmarks.run"] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    sizes = (args.sizes or ("tiny" if args.quick else "small,gpt2")).split(",")
    libs = [lib for lib in args.libs.split(",") if lib]
    cuda = torch.cuda.is_available()
    cache = Path(args.cache_dir)
    (cache / "ref").mkdir(parents=True, exist_ok=True)
    for ref in (cache / "ref").glob("*.pt"):
        ref.unlink()  # references come from this run only
    started, load_before = time.time(), os.getloadavg()
    infos, specs = {}, []
    for size in sizes:
        print(f"checkpoints for {size} ...", flush=True)
        infos[size] = build_checkpoints(size, cache)
        specs += load_specs(size, infos[size], args, cuda, ["plain"] + [lib for lib in libs if lib != "plain"])
        if "ours" in libs:
            specs += reuse_specs(size, infos[size], args)
    if not args.no_micro:
        specs += micro_specs(args, libs)
    if args.only:
        specs = [spec for spec in specs if args.only in spec["id"]]
    runs: dict[str, list[dict]] = {s["id"]: [] for s in specs}
    total = len(specs) * args.repeat
    for round_ in range(args.repeat):
        for i, spec in enumerate(specs):
            result = run_worker(spec, args.timeout)
            runs[spec["id"]].append(result)
            n = round_ * len(specs) + i + 1
            print(f"[{n}/{total}] {spec['id']}: {summarise(spec, result)}", flush=True)
    results = {s["id"]: {"spec": s, "result": merge(runs[s["id"]]), "runs": runs[s["id"]]} for s in specs}
    meta = {"command": command, "machine": machine_info(), "checkpoints": infos, "threads": args.threads,
            "repeat": args.repeat, "quick": args.quick, "wall_s": time.time() - started, "cuda": cuda,
            "loadavg": [load_before[0], os.getloadavg()[0]], "placement": placement_lines(args.quick)}
    (cache / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    write_report(Path(args.out), meta, results, Path(args.notes) if args.notes else None)
    print(f"wrote {args.out} and {cache / 'results.json'} in {meta['wall_s']:.0f} s", flush=True)
    return 0


def placement_lines(quick: bool = False) -> list[str]:
    """The placement-vs-accelerate table (pure planning on meta models, in this process: seconds; ``quick``: policy
    ``auto`` only)."""
    from benchmarks.placement import all_cells, markdown

    return markdown(all_cells(("auto",) if quick else ("auto", "balanced", "balanced_low_0", "sequential")))


def rewrite_report(args: argparse.Namespace) -> int:
    """Merge the stored rounds again and re-write the report (after changing the report, without re-running)."""
    from benchmarks.report import write_report

    data = json.loads((Path(args.cache_dir) / "results.json").read_text())
    for entry in data["results"].values():
        if entry.get("runs"):
            entry["result"] = merge(entry["runs"])
    write_report(Path(args.out), data["meta"], data["results"], Path(args.notes) if args.notes else None)
    print(f"wrote {args.out} from {Path(args.cache_dir) / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
