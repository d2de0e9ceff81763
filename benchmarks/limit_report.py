"""Markdown report of ``benchmarks.limit_run``: one row per case, each against the physical floor of the same moment.

The physical floor is what no library can beat under the limit: the bytes that cannot stay in memory, read at the
disk's bandwidth. Usable memory is the limit less a margin for the interpreter, torch and the activations
(``--margin``, 450 MiB by default); the bytes that cannot stay are the model's bytes less that; they are read at the
fastest cold read measured just before the case (plain sequential reads, ``madvise(WILLNEED)`` or ``O_DIRECT`` into
huge pages, whichever was fastest then). A forward cannot be faster than those reads, nor than the
same forward with the whole model resident (plain PyTorch outside the limit): the floor of a forward is the larger.
"""

from __future__ import annotations

from typing import Any, Optional

GiB = 2**30
DECODE_TARGET, PREFILL_TARGET, READ_SLACK = 1.3, 1.3, 1.10  # the targets of the issue, as ratios to the floor


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _gb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(n: Optional[float]) -> str:
    return "-" if n is None else f"{n:.2f} s"


def floor_bytes(results: dict[str, Any], limit: int) -> int:
    """Bytes of the model that cannot stay in ``limit``: model bytes - (limit - margin)."""
    floor = results.get("floor") or {}
    model = (results.get("info") or {}).get("model_bytes", 0)
    return max(0, model - (limit - floor.get("margin", 450 * 2**20)))


def floor_seconds(results: dict[str, Any], result: dict[str, Any], shape: str) -> Optional[float]:
    """The floor of one ``shape`` forward in ``result``'s case: max(floor bytes / cold bandwidth, resident time)."""
    resident = (results.get("reference") or {}).get(f"{shape}_s")
    if resident is None or not result.get("read_bandwidth") or "limit" not in result:
        return None
    return max(floor_bytes(results, result["limit"]) / result["read_bandwidth"], resident)


def paired_ratios(results: dict[str, Any], result: dict[str, Any], shape: str, bandwidth: Optional[float] = None):
    """``(median floor s, median ratio)`` of a paired case's ``shape`` forwards, each against its own floor:
    max(floor bytes / the bandwidth read just before it (or ``bandwidth``), the reference's same forward just before
    it); ``None`` for a case run unpaired."""
    import statistics

    pair = (result.get("paired") or {}).get(shape) or {}
    times = list(zip(pair.get("case_s", []), pair.get("reference_s", []), pair.get("bandwidth", [])))
    if not times or "limit" not in result:
        return None
    limit_floor = floor_bytes(results, result["limit"])
    floors = [max(limit_floor / (bandwidth or read), ref) for _, ref, read in times]
    return statistics.median(floors), statistics.median(took / floor for (took, _, _), floor in zip(times, floors))


def fastest_read(results: dict[str, Any]) -> Optional[float]:
    """The fastest cold read of the whole run (every method, every case's own measurement): the cold bandwidth the
    disk showed it can give. A floor at the case's own cold read alone flatters the case when the disk was slow just
    then (shared storage swings 0.35-1.5 GB/s within minutes)."""
    seen = [bandwidth(v) for v in (results.get("read_methods") or {}).values()]
    seen += [r["read_bandwidth"] for r in results.values() if isinstance(r, dict) and r.get("read_bandwidth")]
    for r in results.values():  # the reads before each paired forward
        for pair in ((r.get("paired") or {}).values() if isinstance(r, dict) else ()):
            seen += pair.get("bandwidth", [])
    return max(seen, default=None)


def bandwidth(method: Any) -> float:
    """Bytes/s of one read method's figures (a number in runs recorded before request sizes were)."""
    return method["bandwidth"] if isinstance(method, dict) else method


def _method(name: str, method: Any) -> str:
    kib = method.get("request_kib") if isinstance(method, dict) else None
    return f"{name} {bandwidth(method) / 1e9:.2f}" + (f" ({kib:.0f} KiB requests)" if kib else "")


def _diff(result: dict[str, Any]) -> str:
    diffs = result.get("max_abs_diff") or {}
    if not diffs:
        return "-"
    worst = max(diffs.values())
    return f"{'yes' if worst <= 1e-5 else 'NO'} ({worst:.1e})"


def _row(name: str, result: dict[str, Any], results: dict[str, Any]) -> str:
    cells = [name, result.get("status", "-")]
    if result.get("status") != "completed" and result.get("stage"):
        cells[-1] += f" (at {result['stage']})"
    detected = result.get("detected") or {}
    budget = result.get("max_memory")
    cells.append(
        f"given {budget['cpu']}" if isinstance(budget, dict) else
        f"None -> {_gib(detected.get('cpu'))}" + (f" ({detected['source']})" if "source" in detected else "")
    )  # fmt: skip
    if result.get("input_shape"):
        cells[-1] += f", `input_shape={result['input_shape']!r}`"
    cells += [_gib(result.get("peak_bytes")), _s(result.get("load_s"))]
    maps, stream = result.get("map_bytes") or {}, result.get("stream") or {}
    cells += [_gib(maps.get("cpu")), _gib(maps.get("disk")), _gib(stream.get("kept_bytes"))]
    limit_floor = floor_bytes(results, result["limit"]) if "limit" in result else None
    read = result.get("decode_read_bytes")
    cells += [_gb(read), f"{read / limit_floor:.2f}x" if read is not None and limit_floor else "-"]
    for shape in ("decode", "prefill"):
        took, floor = result.get(f"{shape}_s"), floor_seconds(results, result, shape)
        paired = paired_ratios(results, result, shape)
        if paired is not None:  # each forward against the floor of its own moment (medians)
            cells += [_s(took), _s(paired[0]), f"{paired[1]:.2f}x"]
        else:
            cells += [_s(took), _s(floor), f"{took / floor:.2f}x" if took and floor else "-"]
        if shape == "decode":  # the same decode against the floor at the run's fastest cold read
            fast, resident = fastest_read(results), (results.get("reference") or {}).get("decode_s")
            strict = paired_ratios(results, result, shape, fast) if fast else None
            if strict is None:
                floor = max(limit_floor / fast, resident) if fast and limit_floor and resident is not None else None
                cells.append(f"{took / floor:.2f}x" if took and floor else "-")
            else:
                cells.append(f"{strict[1]:.2f}x")
    methods = result.get("read_methods") or {}
    best = max(methods, key=lambda m: bandwidth(methods[m]), default=None)
    cells.append(
        f"{result['read_bandwidth'] / 1e9:.2f}" + (f" ({best})" if best else "") if result.get("read_bandwidth") else "-"
    )
    cells.append(_diff(result))
    return "| " + " | ".join(cells) + " |"


def render(results: dict[str, Any], command: str, size: str) -> str:
    """The report as Markdown."""
    reference = results.get("reference") or {}
    info = results.get("info") or {}
    limits = [r["limit"] for r in results.values() if isinstance(r, dict) and "limit" in r]
    limit = limits[0] if limits else (results.get("floor") or {}).get("limit_bytes")
    margin = (results.get("floor") or {}).get("margin", 450 * 2**20)
    lines = [
        "# Larger-than-memory benchmark (memory cgroup)",
        "",
        f"Command: `{command}`",
        "",
        f"Model: GPT `{size}`, {info.get('params', 0) / 1e6:.0f}M parameters, {_gb(info.get('model_bytes'))} fp32, "
        f"shards of {info.get('shard_limit', 0) / 1e6:.0f} MB. Limit: {_gib(limit)} per case (a fresh cgroup each). "
        f"Load average before/after: {results.get('load_before')} / {results.get('load_after')}.",
        "",
        f"Reference (plain PyTorch outside the limit, resident): decode {_s(reference.get('decode_s'))}, "
        f"prefill {_s(reference.get('prefill_s'))}, status {reference.get('status')}.",
        "",
        f"Physical floor: usable memory = limit - {margin / 2**20:.0f} MiB (interpreter, torch, activations) = "
        f"{_gib(limit - margin if limit else None)}; bytes that cannot stay = model - usable = "
        f"{_gb(floor_bytes(results, limit) if limit else None)} per forward (target: read at most {READ_SLACK:.2f}x "
        f"that). Floor of a forward = max(those bytes / the fastest cold read measured just before the case, the "
        f"resident forward); the column 'at fastest read' uses the fastest cold read of the whole run instead. "
        f"Paired cases (the default) take turns with the resident reference: each of the case's forwards is judged "
        f"against max(those bytes / an `O_DIRECT` cold read of 1 GiB made just before it, the reference's same forward "
        f"made just before it), and the floor and ratio shown are the medians of those. Targets: decode <= {DECODE_TARGET}x, prefill <= {PREFILL_TARGET}x the floor. Decode: "
        "1 x 8 tokens; prefill: 4 x 128 tokens; medians. Read per decode: `read_bytes` of `/proc/self/io` (storage "
        "reads, page-cache hits not counted). Kept: disk layers the stream holds resident beyond the CPU budget.",
        "",
    ]
    methods = results.get("read_methods") or {}
    if methods:
        lines += [
            "Cold read of the checkpoint's bytes by method (GB/s): "
            + ", ".join(_method(name, value) for name, value in methods.items())
            + ". The engine reads each streamed layer with `O_DIRECT` (one read per run of adjacent tensors, into reused "
            "buffers in huge pages, around the page cache) and the resident subset with `preadv` from the page cache. "
            "Request sizes are the device's mean over the read (other processes' reads included).",
            "",
        ]
    lines += [
        "| case | status | max_memory | peak cgroup memory | load | on cpu | on disk | kept | read per decode "
        "| read / floor bytes | decode | decode floor | decode / floor | decode / floor at fastest read | prefill | prefill floor | prefill / floor "
        "| cold read GB/s (fastest way) | equal to plain |",
        "| --- " * 19 + "|",
    ]
    for name, result in results.items():
        if isinstance(result, dict) and "limit" in result:
            lines.append(_row(name, result, results))
    failures = [(n, r) for n, r in results.items() if isinstance(r, dict) and "limit" in r and r.get("error")]
    if failures:
        lines += ["", "Errors:", ""]
        lines += [f"- {name}: {r['error'][:300]}" for name, r in failures]
    return "\n".join(lines) + "\n"
