"""Markdown report of ``benchmarks.limit_run``: one row per case, with the disk-bound estimate of the same moment."""

from __future__ import annotations

from typing import Any, Optional

GiB = 2**30


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _s(n: Optional[float]) -> str:
    return "-" if n is None else f"{n:.2f} s"


def estimate(result: dict[str, Any], reference: dict[str, Any], shape: str) -> Optional[float]:
    """Disk-bound time of one ``shape`` forward: bytes the map puts on disk / cold read bandwidth + resident time."""
    resident = reference.get(f"{shape}_s")
    streamed = (result.get("map_bytes") or {}).get("disk", 0)
    if resident is None or not result.get("read_bandwidth") or "map_bytes" not in result:
        return None
    return streamed / result["read_bandwidth"] + resident


def _diff(result: dict[str, Any]) -> str:
    diffs = result.get("max_abs_diff") or {}
    if not diffs:
        return "-"
    worst = max(diffs.values())
    return f"{'yes' if worst <= 1e-5 else 'NO'} ({worst:.1e})"


def _row(name: str, result: dict[str, Any], reference: dict[str, Any]) -> str:
    cells = [name, result.get("status", "-")]
    if result.get("status") != "completed" and result.get("stage"):
        cells[-1] += f" (at {result['stage']})"
    detected = result.get("detected") or {}
    budget = result.get("max_memory")
    cells.append(
        f"given {_gib(budget['cpu'])}" if isinstance(budget, dict) else
        f"None -> {_gib(detected.get('cpu'))}" + (f" ({detected['source']})" if "source" in detected else "")
    )  # fmt: skip
    cells += [_gib(result.get("peak_bytes")), _s(result.get("load_s"))]
    maps = result.get("map_bytes") or {}
    cells += [_gib(maps.get("cpu")), _gib(maps.get("disk"))]
    for shape in ("decode", "prefill"):
        took, floor = result.get(f"{shape}_s"), estimate(result, reference, shape)
        ratio = f"{took / floor:.2f}x" if took and floor else "-"
        cells += [_s(took), _s(floor), ratio]
    faults = result.get("decode_major_faults")
    cells.append("-" if faults is None else f"{faults:.0f}")
    resident = result.get("cpu_weights_resident")
    cells.append("-" if resident is None or not maps.get("cpu") else f"{resident:.2f}")
    cells.append(f"{result['read_bandwidth'] / 1e9:.2f}" if result.get("read_bandwidth") else "-")
    cells.append(_diff(result))
    return "| " + " | ".join(cells) + " |"


def render(results: dict[str, Any], command: str, size: str) -> str:
    """The report as Markdown."""
    reference = results.get("reference") or {}
    info = results.get("info") or {}
    limits = [r["limit"] for r in results.values() if isinstance(r, dict) and "limit" in r]
    lines = [
        "# Larger-than-memory benchmark (memory cgroup)",
        "",
        f"Command: `{command}`",
        "",
        f"Model: GPT `{size}`, {info.get('params', 0) / 1e6:.0f}M parameters, {_gib(info.get('model_bytes'))} fp32, "
        f"shards of {info.get('shard_limit', 0) / 1e6:.0f} MB. Limit: {_gib(limits[0] if limits else None)} per case "
        f"(a fresh cgroup each). Load average before/after: {results.get('load_before')} / {results.get('load_after')}.",
        "",
        f"Reference (plain PyTorch outside the limit, resident): decode {_s(reference.get('decode_s'))}, "
        f"prefill {_s(reference.get('prefill_s'))}, status {reference.get('status')}.",
        "",
        "Estimate = bytes on disk / cold read bandwidth (measured just before the case, page cache of the checkpoint "
        "dropped) + the resident forward time. Decode: batch 1 x 8 tokens; prefill: batch 1 x 128 tokens; medians. "
        "Major faults: `ru_majflt` per timed decode. CPU weights resident: the smallest `mincore` fraction over the "
        "file-backed weights placed on cpu, after the forwards (1.00: none was evicted).",
        "",
        "| case | status | max_memory | peak cgroup memory | load | on cpu | on disk | decode | decode estimate "
        "| decode / estimate | prefill | prefill estimate | prefill / estimate | major faults per decode "
        "| cpu weights resident after | cold read GB/s | equal to plain |",
        "| --- " * 17 + "|",
    ]
    for name, result in results.items():
        if isinstance(result, dict) and "limit" in result:
            lines.append(_row(name, result, reference))
    failures = [(n, r) for n, r in results.items() if isinstance(r, dict) and "limit" in r and r.get("error")]
    if failures:
        lines += ["", "Errors:", ""]
        lines += [f"- {name}: {r['error'][:300]}" for name, r in failures]
    return "\n".join(lines) + "\n"
