"""Render ``GPU_CHECK.md`` and ``GPU_CHECK.json`` from what ``scripts/gpu_check.sh`` has recorded so far.

Called after every pass, so a run cut short still leaves a report of the passes that finished. Inputs, in the log
folder: ``env.json`` (interpreter, torch, CUDA, driver, GPUs), ``passes.jsonl`` (one line per finished pass),
``<pass>.section.md`` (the pass's excerpt for the report) and ``<pass>.json`` (its raw figures, when it writes any).
Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def render(logs: Path, out: Path, planned: list[str]) -> None:
    env = _read_json(logs / "env.json") or {}
    passes = []
    if (logs / "passes.jsonl").exists():
        passes = [json.loads(line) for line in (logs / "passes.jsonl").read_text().splitlines() if line.strip()]
    for record in passes:
        record["figures"] = _read_json(logs / f"{record['name']}.json")
    done = {record["name"] for record in passes}
    pending = [name for name in planned if name not in done]
    lines = [
        "# GPU check",
        "",
        f"`bash scripts/gpu_check.sh`, {env.get('date', '?')}, commit {env.get('commit', '?')}: "
        f"{env.get('gpus_torch', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
        f"driver {env.get('driver', '?')}, Python {env.get('python', '?')}; "
        f"{sum(r['seconds'] for r in passes)} s in the passes so far.",
        "",
        "| pass | result | seconds (cap) | command |",
        "| --- | --- | --- | --- |",
    ]
    for r in passes:
        lines.append(f"| {r['name']} | {r['result']} | {r['seconds']} ({r['cap']}) | `{r['command']}` |")
    for name in pending:
        lines.append(f"| {name} | not run (yet) | - | - |")
    for r in passes:
        section = logs / f"{r['name']}.section.md"
        if section.exists():
            lines += ["", f"## {r['name']}", "", section.read_text(encoding="utf-8").rstrip()]
    (out / "GPU_CHECK.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"environment": env, "passes": passes, "not_run": pending}
    (out / "GPU_CHECK.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    render(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else [])
