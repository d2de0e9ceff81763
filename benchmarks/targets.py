"""The targets of issue 4, checked against one run's figures: one Markdown row each, PASS / MISS / NOT MEASURED."""

from __future__ import annotations

from typing import Optional


def _value(results: dict, case_id: str, key: str) -> tuple[Optional[float], str]:
    entry = results.get(case_id)
    if entry is None:
        return None, f"`{case_id}` not run"
    r = entry["result"]
    if not r.get("ok"):
        return None, f"`{case_id}` failed at {r.get('stage')}"
    value = r.get(key)
    return (value, "") if isinstance(value, (int, float)) else (None, f"`{case_id}` has no {key}")


def _row(label: str, num: tuple, den: Optional[tuple], limit: float, at_least: bool = False, unit: str = "x") -> str:
    """``num / den`` (or ``num`` alone) against ``limit``; ``at_least`` flips the comparison."""
    value, why = num
    if den is not None and value is not None:
        d, why_d = den
        value, why = (value / d, "") if d else (None, why_d or "zero reference")
    bound = f"{'≥' if at_least else '≤'} {limit:g}{unit}"
    if value is None:
        return f"| {label} | - | {bound} | NOT MEASURED ({why}) |"
    ok = value >= limit if at_least else value <= limit
    shown = f"{value:.3f}{unit}" if unit == "x" else f"{value:.3f} {unit}"
    return f"| {label} | {shown} | {bound} | {'PASS' if ok else '**MISS**'} |"


def _equal_row(results: dict, size: str) -> str:
    cases = [(cid, e["result"]) for cid, e in results.items()
             if cid.startswith(f"{size}/") and e["spec"]["lib"] in ("ours", "trainer")]
    ran = [(cid, r) for cid, r in cases if r.get("ok") and r.get("max_abs_diff")]
    if not ran:
        return "| outputs of every ours / Trainer case equal plain PyTorch | - | ≤ 1e-5 (GPU 1e-3) | NOT MEASURED |"
    worst = {cid: max(r["max_abs_diff"].values()) for cid, r in ran}
    bad = [cid for cid, d in worst.items() if d > (1e-3 if "gpu" in cid or "offload" in cid else 1e-5)]
    status = "PASS" if not bad else f"**MISS** ({', '.join(bad)})"
    return (f"| outputs of every ours / Trainer case equal plain PyTorch | {len(ran)}/{len(cases)} cases compared, "
            f"worst {max(worst.values()):.1e} | ≤ 1e-5 (GPU 1e-3) | {status} |")


def target_rows(results: dict, size: str) -> list[str]:
    """Rows for the Markdown targets table of issue 4 at checkpoint size ``size``."""
    c = lambda lib, fmt, map_: f"{size}/{lib}/{fmt}/{map_}"  # noqa: E731
    v = lambda lib, fmt, map_, key: _value(results, c(lib, fmt, map_), key)  # noqa: E731
    entry = results.get(c("ours", "bin", "resident"))
    nbytes = (float(entry["spec"]["model_bytes"]), "") if entry else (None, "no .bin case")
    rows = [
        _row("decode forward, disk-offloaded / plain resident", v("ours", "safetensors", "disk", "decode_s"),
             v("plain", "safetensors", "resident", "decode_s"), 1.15),
        _row("decode forward, accelerate disk / ours disk (speed-up)", v("accelerate", "safetensors", "disk", "decode_s"),
             v("ours", "safetensors", "disk", "decode_s"), 1.8, at_least=True),
        _row("prefill forward, disk-offloaded / plain resident", v("ours", "safetensors", "disk", "prefill_s"),
             v("plain", "safetensors", "resident", "prefill_s"), 1.05),
        _row("peak anon RSS growth loading .bin into CPU / model bytes", v("ours", "bin", "resident", "peak_anon_growth"),
             nbytes, 1.05),
        _row("the same, the library's import counted", v("ours", "bin", "resident", "paid_peak_anon_growth"),
             nbytes, 1.05),
    ]
    for map_ in ("resident", "disk"):
        rows.append(_row(f"peak total RSS loading safetensors ({map_}), ours / accelerate",
                         v("ours", "safetensors", map_, "peak_total_growth"),
                         v("accelerate", "safetensors", map_, "peak_total_growth"), 1.0))
    for fmt in ("safetensors", "bin"):
        for map_ in ("resident", "disk"):
            rows.append(_row(f"load time {fmt} ({map_}), ours / accelerate", v("ours", fmt, map_, "load_s"),
                             v("accelerate", fmt, map_, "load_s"), 1.0))
            rows.append(_row(f"load time {fmt} ({map_}) with the import counted, ours / accelerate",
                             v("ours", fmt, map_, "paid_load_s"), v("accelerate", fmt, map_, "paid_load_s"), 1.0))
    rows.append(_row("empty init of the ~10B GPT", _value(results, "empty_init/ours", "init_s"), None, 1.0, unit="s"))
    rows.append(_row("device-map planning, ~10,000 modules", _value(results, "plan/ours", "plan_s"), None, 1.0, unit="s"))
    if c("ours", "safetensors", "cpu_offload") in results:
        rows.append(_row("GPU: cpu-offloaded decode, accelerate / ours (speed-up)",
                         v("accelerate", "safetensors", "cpu_offload", "decode_s"),
                         v("ours", "safetensors", "cpu_offload", "decode_s"), 2.0, at_least=True))
    rows.append(_equal_row(results, size))
    return rows
