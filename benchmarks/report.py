"""Turn the merged case results into ``RESULTS.md``: targets of issue 4, headline ratios, then every raw figure."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Optional

from benchmarks.targets import target_rows

MB = 10**6
CPU_TOL, GPU_TOL = 1e-5, 1e-3
COMBOS = [("safetensors", "resident"), ("bin", "resident"), ("safetensors", "disk"), ("bin", "disk"),
          ("safetensors", "resident_gpu"), ("safetensors", "cpu_offload")]


def get(results: dict, case_id: str, key: str) -> Optional[float]:
    """A figure of one case, or ``None`` when the case is absent, failed, or lacks the figure."""
    entry = results.get(case_id)
    if not entry or not entry["result"].get("ok"):
        return None
    value = entry["result"].get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "MB":
        return f"{value / MB:.1f} MB" if abs(value) >= 10 * MB else f"{value / MB:.3g} MB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g}"


def _plain_ref(size: str, fmt_: str, map_: str) -> str:
    return f"{size}/plain/{fmt_}/{'resident_gpu' if map_ in ('resident_gpu', 'cpu_offload') else 'resident'}"


def _figure_rows(results: dict, size: str) -> list[str]:
    """One row per (figure, format, map): each library's value, then ours/accelerate and ours/plain."""
    figures = [("import time", "import_s", "s"), ("import anon RSS growth", "import_anon_growth", "MB"),
               ("load time", "load_s", "s"), ("load time, import counted", "paid_load_s", "s"),
               ("peak anon RSS growth", "peak_anon_growth", "MB"),
               ("peak anon RSS growth, import counted", "paid_peak_anon_growth", "MB"),
               ("peak total RSS growth", "peak_total_growth", "MB"),
               ("RSS growth after first output", "rss_after_first_output_growth", "MB"),
               ("time to first output", "first_output_s", "s"),
               ("decode forward (1x8)", "decode_s", "s"), ("prefill forward (4x128)", "prefill_s", "s")]
    rows = []
    for label, key, unit in figures:
        for fmt_, map_ in COMBOS:
            vals = {lib: get(results, f"{size}/{lib}/{fmt_}/{map_}", key) for lib in ("accelerate", "ours", "trainer")}
            if all(v is None for v in vals.values()):
                continue
            plain = get(results, _plain_ref(size, fmt_, map_), key)
            rows.append(f"| {label} | {fmt_} | {map_} | {fmt(plain, unit)} | {fmt(vals['accelerate'], unit)} | "
                        f"{fmt(vals['ours'], unit)} | {fmt(vals['trainer'], unit)} | "
                        f"**{fmt(ratio(vals['ours'], vals['accelerate']), 'x')}** | {fmt(ratio(vals['ours'], plain), 'x')} | "
                        f"{fmt(ratio(vals['trainer'], vals['accelerate']), 'x')} |")
    for fmt_ in ("safetensors", "bin"):
        vals = {}
        for lib in ("accelerate", "ours", "trainer"):
            entry = results.get(f"{size}/{lib}/{fmt_}/disk")
            ok = entry and entry["result"].get("ok") and "offload_folder" in entry["result"]
            vals[lib] = entry["result"]["offload_folder"]["allocated"] if ok else None
        rows.append(f"| bytes written to offload_folder | {fmt_} | disk | - | {fmt(vals['accelerate'], 'MB')} | "
                    f"{fmt(vals['ours'], 'MB')} | {fmt(vals['trainer'], 'MB')} | "
                    f"**{fmt(ratio(vals['ours'], vals['accelerate']), 'x')}** | - | - |")
    return rows


def headline(results: dict, size: str, info: dict) -> list[str]:
    lines = [f"### {size}: {info['params'] / 1e6:.1f}M parameters, {info['model_bytes'] / MB:.1f} MB, "
             f"shards of at most {info['shard_limit'] / MB:.1f} MB", "",
             "plain = plain PyTorch, fully resident, same format (the reference for every map). "
             "disk = `max_memory={\"cpu\": model_bytes // 2}`, rest to disk. Lower is better everywhere.", "",
             "| figure | format | map | plain | accelerate | ours | ours (Trainer) | ours/accelerate | ours/plain | Trainer/accelerate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += _figure_rows(results, size)
    lines += ["", "Offloaded / resident forward time (each library against its own resident map, and against plain):", "",
              "| library | decode disk/own resident | decode disk/plain | prefill disk/own resident | prefill disk/plain | "
              "decode cpu_offload/GPU resident | prefill cpu_offload/GPU resident |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for lib in ("accelerate", "ours", "trainer"):
        cells = []
        for key in ("decode_s", "prefill_s"):
            disk = get(results, f"{size}/{lib}/safetensors/disk", key)
            cells += [fmt(ratio(disk, get(results, f"{size}/{lib}/safetensors/resident", key)), "x"),
                      fmt(ratio(disk, get(results, f"{size}/plain/safetensors/resident", key)), "x")]
        for key in ("decode_s", "prefill_s"):
            off = get(results, f"{size}/{lib}/safetensors/cpu_offload", key)
            cells.append(fmt(ratio(off, get(results, f"{size}/plain/safetensors/resident_gpu", key)), "x"))
        lines.append(f"| {lib} | " + " | ".join(cells) + " |")
    return lines + [""]


def _equality(result: dict, map_: str) -> str:
    diffs = result.get("max_abs_diff")
    if not diffs:
        return "-"
    worst = max(diffs.values())
    tol = GPU_TOL if map_ in ("resident_gpu", "cpu_offload") else CPU_TOL
    return f"{'yes' if worst <= tol else '**NO**'} ({worst:.1e})"


def raw_table(results: dict) -> list[str]:
    lines = ["| case | ok | load | anon peak | total peak | first output | decode | prefill | offload folder | "
             "map (bytes per device) | equal to plain (max abs diff) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case_id, entry in results.items():
        spec, r = entry["spec"], entry["result"]
        if spec["kind"] not in ("load", "trainer"):
            continue
        off = r.get("offload_folder", {}).get("allocated")
        mapping = ", ".join(f"{d}: {fmt(b, 'MB')}" for d, b in sorted(r.get("map_bytes", {}).items()))
        lines.append(f"| {case_id} | {'yes' if r.get('ok') else 'FAILED (' + str(r.get('stage')) + ')'} | "
                     f"{fmt(r.get('load_s'), 's')} | {fmt(r.get('peak_anon_growth'), 'MB')} | "
                     f"{fmt(r.get('peak_total_growth'), 'MB')} | {fmt(r.get('first_output_s'), 's')} | "
                     f"{fmt(r.get('decode_s'), 's')} | {fmt(r.get('prefill_s'), 's')} | {fmt(off, 'MB')} | "
                     f"{mapping or '-'} | {_equality(r, spec['map'])} |")
    return lines + [""]


def micro_table(results: dict) -> list[str]:
    lines = ["| case | ours | accelerate | torch.device(\"meta\") | ours/accelerate | size |", "| --- | --- | --- | --- | --- | --- |"]
    for kind, key, what in (("empty_init", "init_s", "params"), ("plan", "plan_s", "modules")):
        vals = {lib: get(results, f"{kind}/{lib}", key) for lib in ("ours", "accelerate", "torch_meta")}
        size = next((results[f"{kind}/{lib}"]["result"].get(what) for lib in vals
                     if f"{kind}/{lib}" in results and results[f"{kind}/{lib}"]["result"].get(what)), None)
        size_txt = "-" if size is None else f"{size / 1e6:,.1f}M params" if what == "params" else f"{size:,} modules"
        lines.append(f"| {kind} | {fmt(vals['ours'], 's')} | {fmt(vals['accelerate'], 's')} | "
                     f"{fmt(vals['torch_meta'], 's')} | **{fmt(ratio(vals['ours'], vals['accelerate']), 'x')}** | {size_txt} |")
    return lines + [""]


def reuse_table(results: dict) -> list[str]:
    """Reloading a reused offload folder with its checksums verified (as shipped) and without."""
    lines = ["| size | offload folder | reuse, verified | reuse, not verified | verified/not | load + first forward, "
             "verified | not verified | verified/not |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case_id, entry in results.items():
        r = entry["result"]
        if entry["spec"].get("kind") != "reuse" or not r.get("ok"):
            continue
        nbytes = r.get("offload_bytes", {}).get("apparent", 0)
        lines.append(f"| {entry['spec']['size']} | {nbytes / 2**20:.1f} MiB | {fmt(r['reuse_s'], 's')} | "
                     f"{fmt(r['reuse_unverified_s'], 's')} | **{fmt(ratio(r['reuse_s'], r['reuse_unverified_s']), 'x')}** | "
                     f"{fmt(r.get('reuse_ready_s'), 's')} | {fmt(r.get('reuse_unverified_ready_s'), 's')} | "
                     f"{fmt(ratio(r.get('reuse_ready_s'), r.get('reuse_unverified_ready_s')), 'x')} |")
    return lines + [""] if len(lines) > 2 else []


def failures(results: dict) -> list[str]:
    lines = []
    for case_id, entry in results.items():
        r = entry["result"]
        if not r.get("ok"):
            first = str(r.get("error", "")).strip().splitlines()[0][:300] if r.get("error") else "no error text"
            lines.append(f"- `{case_id}` failed at {r.get('stage')}: {first}")
    return lines or ["- none"]


def bin_table(results: dict, checkpoints: dict) -> list[str]:
    """Anonymous RSS growth while loading the ``.bin`` checkpoint to the CPU, as a multiple of the model's bytes."""
    rows, found = [], False
    for size, info in checkpoints.items():
        cells = []
        for lib in ("ours", "accelerate"):
            growth = get(results, f"{size}/{lib}/bin/resident", "peak_anon_growth")
            found = found or growth is not None
            cells.append("-" if growth is None else f"{growth / info['model_bytes']:.2f}x")
        rows.append(f"| {size} | {info['model_bytes'] / 2**20:.0f} MiB | " + " | ".join(cells) + " |")
    if not found:
        return []
    return ["## Loading a `.bin` checkpoint to the CPU", "",
            "Peak anonymous RSS growth during the load over the model's bytes (ours uses the tensors "
            "`torch.load(mmap=True, weights_only=True)` maps, in place).", "",
            "| size | model | ours | accelerate |", "| --- | --- | --- | --- |", *rows, ""]


def write_report(path: Path, meta: dict, results: dict, notes: Optional[Path] = None) -> None:
    """Write the Markdown report to ``path``, with ``notes`` (when the file exists) appended."""
    m = meta["machine"]
    lines = ["# Benchmark results", "",
             f"Command: `{meta['command']}` ({datetime.date.today().isoformat()}, {meta['wall_s'] / 60:.1f} min, "
             f"{meta['repeat']} round(s): times are the best round, memory the median round; 1-minute load average {meta['loadavg'][0]:.1f} "
             f"at the start, {meta['loadavg'][1]:.1f} at the end on {meta['machine']['cores']} cores).", "",
             "Every case runs in a fresh process with `torch.set_num_threads(%d)`; forwards run under "
             "`torch.inference_mode()` and are medians after warm-up. **Load times are warm-cache**: the runner reads "
             "each case's checkpoint files once before starting it. RSS growth is over the process's RSS just before "
             "the load (anonymous: sampled every 5 ms; total: `VmHWM` after resetting it)." % meta["threads"], "",
             "| machine | |", "| --- | --- |",
             f"| CPU | {m['cpu']} ({m['cores']} cores) |", f"| RAM | {m['ram_bytes'] / 2**30:.1f} GiB |",
             f"| GPU | {m.get('cuda_device')} |", f"| OS | {m['os']} |"]
    for name in ("python", "torch", "lightning", "accelerate", "safetensors", "lightning-bigmodel"):
        lines.append(f"| {name} | {m.get(name)} |")
    target_size = "gpt2" if "gpt2" in meta["checkpoints"] else list(meta["checkpoints"])[-1]
    lines += ["", f"## Targets of issue 4 (size `{target_size}`)", "",
              "| target | measured | limit | result |", "| --- | --- | --- | --- |"]
    lines += target_rows(results, target_size)
    lines += ["", "## Headline ratios", ""]
    for size, info in meta["checkpoints"].items():
        lines += headline(results, size, info)
    lines += ["## Empty init and device-map planning", ""] + micro_table(results)
    lines += bin_table(results, meta["checkpoints"])
    if meta.get("placement"):
        lines += ["## Placement vs accelerate", "",
                  "GPU bytes of our plan and accelerate's on the same meta model and budget (`python -m "
                  "benchmarks.placement` prints this table alone; the test table is tests/test_placement_vs_accelerate.py). "
                  "Ours may hold one offloaded layer less (the prefetch slot, depth 2), or run its offloaded layers on "
                  "the CPU (execution `cpu`, no room kept on any GPU) where room for one on a GPU would leave a GPU "
                  "without modules; a plan *over budget* cannot hold one offloaded layer and the offloaded buffers "
                  "beside its modules on its execution GPU.", ""]
        lines += meta["placement"]
    reuse = reuse_table(results)
    if reuse:
        lines += ["## Reusing an offload folder (checksums verified in the background)", ""] + reuse
    lines += ["## Every case", ""] + raw_table(results)
    lines += ["## Failures", ""] + failures(results) + [""]
    if notes is not None and notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
