"""Larger-than-memory benchmark under a memory cgroup: ``python -m benchmarks.limit_run [--size gpt2-large] [--quick]``.

Each case runs in a fresh worker process that moves itself into a new memory cgroup limited to ``--limit`` (default:
about half the model) before Python starts: ours with ``max_memory=None`` from safetensors and from ``.bin`` shards
(planned with ``input_shape`` set to the largest batch the case runs, the 4 x 128 prefill, as a user would pass it),
ours with an explicit CPU budget (``--explicit``), accelerate with the budget ours detected and with
``max_memory=None``, and plain PyTorch. Before each case the page cache of the checkpoint and offload files is dropped
(``POSIX_FADV_DONTNEED``) and the cold read bandwidth of the checkpoint is measured three ways (plain sequential
reads, ``madvise(WILLNEED)``, ``O_DIRECT`` into huge pages), so every forward is compared with the physical floor of
the same moment at the fastest of them (see :mod:`benchmarks.limit_report`): the bytes that cannot stay under the limit
(model bytes - (limit - ``--margin``)) read at that bandwidth, or the resident forward (plain PyTorch outside the limit)
when that is longer. Before the cases, the checkpoint's bytes are read cold by page faults, by ``madvise(WILLNEED)``,
by large ``preadv`` calls, and with ``O_DIRECT`` into 4 KiB pages and into huge pages (the streaming engine's way),
with the mean size of the device's read requests for each.
Needs root (or a delegated cgroup) on Linux; otherwise the report says why it was skipped.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from benchmarks.checkpoints import build_checkpoints
from benchmarks.limit_workers import PROBE_BYTES, run_paired, run_worker
from benchmarks.measure import machine_info

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.limit_run", description=__doc__)
    p.add_argument("--size", default="gpt2-large", help="GPT preset (default gpt2-large: 774M parameters, fp32)")
    p.add_argument("--limit", default=None, help="cgroup memory limit in bytes (default: 52%% of the model's bytes)")
    p.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "out"), help="checkpoints, offload folders, JSON")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_limit.md"), help="Markdown report path")
    p.add_argument("--decode-iters", type=int, default=3)
    p.add_argument("--prefill-iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900, help="seconds before a case is killed and reported")
    p.add_argument(
        "--cases", default="ours-safetensors,ours-explicit,ours-bin,accelerate-same-budget,accelerate-detected,plain"
    )
    p.add_argument("--explicit", default="600MB", help="the CPU budget of the case ours-explicit")
    p.add_argument("--quick", action="store_true", help="gpt2-medium (1.4 GB), 2 decodes, 1 prefill: about 1/3 the time")
    p.add_argument("--margin", type=int, default=450 * 2**20, help="bytes of the limit for interpreter, torch, activations")
    p.add_argument("--unpaired", action="store_true", help="time each case's forwards back to back, against a floor "
                   "measured once before it, instead of in turns with the resident reference (see benchmarks.limit_workers)")
    p.add_argument("--shard-mb", type=int, default=500, help="shard size of the checkpoints (default 500 MB, the issue's; "
                   "a folder of their own beside benchmarks.run's)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ cgroups
def memory_hierarchy() -> tuple[Optional[tuple[int, Path]], str]:
    """``((version, mount point), "")`` of a memory cgroup hierarchy this process can use, else ``(None, why)``."""
    if not sys.platform.startswith("linux"):
        return None, "not Linux"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        after = line.split(" - ", 1)[1].split()
        point = Path(line.split()[4])
        if after[0] == "cgroup" and "memory" in after[-1].split(","):
            found = (1, point)
        elif after[0] == "cgroup2" and "memory" in (point / "cgroup.subtree_control").read_text().split():
            found = (2, point)
        else:
            continue
        probe = point / f"bench-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as err:
            return None, f"cannot create a cgroup under {point} ({err}): run as root"
        return found, ""
    return None, "no memory cgroup hierarchy is mounted (v1 `memory` or v2 with the memory controller enabled)"


class Cgroup:
    """A fresh memory cgroup limited to ``limit`` bytes; read its peak and OOM kills, then remove it."""

    def __init__(self, version: int, point: Path, limit: int) -> None:
        self.version, self.path = version, point / f"bench-limit-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self._write("memory.max" if version == 2 else "memory.limit_in_bytes", str(limit))
        if version == 2:
            self._write("memory.swap.max", "0", missing_ok=True)
        self.limit = int(self._read("memory.max" if version == 2 else "memory.limit_in_bytes"))

    def _write(self, name: str, text: str, missing_ok: bool = False) -> None:
        try:
            (self.path / name).write_text(text)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text().strip()
        except OSError:
            return ""

    def peak(self) -> Optional[int]:
        text = self._read("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        return int(text) if text.isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ the page cache
def _files(*folders: Optional[str]) -> list[Path]:
    out: list[Path] = []
    for folder in folders:
        if folder and os.path.isdir(folder):
            out += [Path(root) / name for root, _, names in os.walk(folder) for name in names]
    return out


def evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache (only these files: the rest of the machine keeps its cache)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _page_touch(buffer) -> int:
    import numpy as np

    return int(np.frombuffer(buffer, dtype=np.uint8)[:: mmap.PAGESIZE].sum())


METHODS = ("page faults", "madvise(WILLNEED)", "preadv", "O_DIRECT, 4 KiB pages", "O_DIRECT, huge pages")
CASE_METHODS = ("sequential read", "madvise(WILLNEED)", "O_DIRECT, huge pages")  # measured before each case


def _read_by(method: str, paths: list[Path], nbytes: int, chunk: int = 32 * 2**20) -> int:
    """Read up to ``nbytes`` of ``paths`` by ``method``; returns the bytes read."""
    from lightning_bigmodel.offload._anonymous import huge_page_map

    total = 0
    # Both page-aligned (what O_DIRECT needs); the second in 2 MiB pages where the kernel allows, like the stream's
    # buffers: an O_DIRECT read into 4 KiB pages is split into small device requests.
    buffer = huge_page_map(chunk) if method in ("O_DIRECT, huge pages", "sequential read") else mmap.mmap(-1, chunk)
    for path in paths:
        size = min(path.stat().st_size, nbytes - total)
        if size <= 0:
            break
        flags = os.O_RDONLY | (os.O_DIRECT if method.startswith("O_DIRECT") else 0)
        fd = os.open(path, flags)
        try:
            if method in ("page faults", "madvise(WILLNEED)"):
                with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapping:
                    if method == "madvise(WILLNEED)":
                        mapping.madvise(mmap.MADV_WILLNEED, 0, size - size % mmap.PAGESIZE or mmap.PAGESIZE)
                    _page_touch(memoryview(mapping)[:size])
                total += size
            else:
                step = 16 * 2**20 if method == "sequential read" else chunk  # plain 16 MiB reads, read-ahead on
                offset = 0
                while offset < size:
                    count = os.preadv(fd, [memoryview(buffer)[: min(step, -(-(size - offset) // 4096) * 4096)]], offset)
                    if count <= 0:
                        break
                    offset += count
                total += min(offset, size)
        finally:
            os.close(fd)
    return total


def _device_stat(path: Path) -> Optional[Path]:
    """``/sys/dev/block/MAJ:MIN/stat`` of the block device holding ``path``, when there is one."""
    dev = path.stat().st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.exists() else None


def _reads_done(stat: Optional[Path]) -> Optional[tuple[int, int]]:
    """``(read requests completed, sectors read)`` of the device so far."""
    if stat is None:
        return None
    fields = stat.read_text().split()
    return int(fields[0]), int(fields[2])


def read_methods(paths: list[Path], nbytes: int, methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, float]]:
    """Cold reads of the same bytes by each method: page faults on a map, a map advised ``MADV_WILLNEED``, large
    ``preadv`` calls into a reused buffer, ``O_DIRECT`` reads into 4 KiB pages and into huge pages (the stream's
    way), and plain 16 MiB sequential reads. Per method: ``bandwidth`` (bytes/s) and, where the device's counters
    can be read, ``request_kib`` (the mean size of its read requests: other processes' reads are counted too)."""
    out: dict[str, dict[str, float]] = {}
    stat = _device_stat(paths[0])
    for method in methods:
        evict(paths)
        before, start = _reads_done(stat), time.perf_counter()
        try:
            done = _read_by(method, paths, nbytes)
        except OSError as err:  # e.g. O_DIRECT refused (tmpfs)
            print(f"  {method}: {err}", flush=True)
            continue
        out[method] = {"bandwidth": done / (time.perf_counter() - start)}
        after = _reads_done(stat)
        if before and after and after[0] > before[0]:
            out[method]["request_kib"] = (after[1] - before[1]) * 512 / 1024 / (after[0] - before[0])
    evict(paths)
    return out


def cold_read_bandwidth(paths: list[Path], nbytes: int = GiB) -> tuple[float, dict[str, dict[str, float]]]:
    """The fastest cold read of up to ``nbytes`` of ``paths`` by :data:`CASE_METHODS` (the bandwidth the disk gives
    now, whichever way reads it best), and each method's figures."""
    methods = read_methods(paths, nbytes, CASE_METHODS)
    return max(m["bandwidth"] for m in methods.values()), methods


# ------------------------------------------------------------------------------------------------ running cases
def direct_probe(paths: list[Path], nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s reading up to ``nbytes`` of ``paths`` with ``O_DIRECT`` into huge pages, without evicting anything
    first (``O_DIRECT`` reads the disk whatever the page cache holds): a paired case's resident pages stay."""
    start = time.perf_counter()
    done = _read_by("O_DIRECT, huge pages", paths, nbytes)
    return done / (time.perf_counter() - start)


def case_specs(args: argparse.Namespace, info: dict, cache: Path) -> dict[str, dict[str, Any]]:
    common = {
        "kind": "limit", "size": args.size, "threads": args.threads, "ref_path": str(cache / "limit-ref" / f"limit-{args.size}.pt"),
        "decode_iters": args.decode_iters, "prefill_iters": args.prefill_iters,
    }  # fmt: skip
    folders = info["folders"]

    def spec(lib: str, fmt: str, max_memory: Any = None) -> dict[str, Any]:
        offload = str(cache / "offload" / f"limit-{lib}-{fmt}")
        return {**common, "lib": lib, "fmt": fmt, "ckpt": folders[fmt], "max_memory": max_memory, "offload_dir": offload}

    return {
        "reference": {**spec("plain", "safetensors"), "write_ref": True},
        # the detected budget, planned for the largest batch the case runs (`input_shape=`, as a user would)
        "ours-safetensors": {**spec("ours", "safetensors"), "plan_largest_batch": True},
        "ours-explicit": spec("ours", "safetensors", {"cpu": args.explicit}),
        # ours-safetensors with the resident blocks first, as planned before they were spread among the disk ones
        "ours-in-order": {**spec("ours", "safetensors"), "plan_largest_batch": True, "in_order": True},
        "ours-bin": {**spec("ours", "bin"), "plan_largest_batch": True},
        "ours-no-input-shape": spec("ours", "safetensors"),  # the detected budget planned without the batch's shape
        "accelerate-same-budget": spec("accelerate", "safetensors"),  # budget filled in from ours' detection
        "accelerate-detected": spec("accelerate", "safetensors"),
        "plain": spec("plain", "safetensors"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size, args.decode_iters, args.prefill_iters = "gpt2-medium", 2, 1
    cache = Path(args.cache_dir)
    (cache / "limit-ref").mkdir(parents=True, exist_ok=True)  # not "ref": benchmarks.run clears that one
    found, why = memory_hierarchy()
    out = Path(args.out)
    header = {"command": "python -m benchmarks.limit_run " + " ".join(argv if argv is not None else sys.argv[1:])}
    if found is None:
        out.write_text(_skipped(header["command"], why))
        print(f"skipped: {why}")
        return 0
    info = build_checkpoints(args.size, cache, shard_bytes=args.shard_mb * 10**6)
    limit = int(args.limit) if args.limit else int(info["model_bytes"] * 0.52)
    if args.quick and not args.limit:
        limit = GiB  # half of gpt2-medium leaves too little beside the interpreter and a 4 x 128 prefill
    specs = case_specs(args, info, cache)
    shards = [Path(p) for p in info["shards"]["safetensors"]]
    results: dict[str, Any] = {"machine": machine_info(), "load_before": os.getloadavg(), "info": info}
    results["floor"] = {"limit_bytes": limit, "margin": args.margin}
    print("read methods (cold) ...", flush=True)
    results["read_methods"] = read_methods(shards, min(GiB, info["model_bytes"] // 2))
    print({k: f"{v['bandwidth'] / 1e9:.2f} GB/s" for k, v in results["read_methods"].items()}, flush=True)
    print("reference (plain, outside the limit) ...", flush=True)
    results["reference"] = run_worker(specs["reference"], args.timeout, None)
    for name in args.cases.split(","):
        if name not in specs:
            raise SystemExit(f"unknown case {name!r}; known: {', '.join(n for n in specs if n != 'reference')}")
        spec = dict(specs[name])
        if name == "accelerate-same-budget":
            detected = (results.get("ours-safetensors") or {}).get("detected") or {}
            if "cpu" not in detected:
                continue
            spec["max_memory"] = {"cpu": detected["cpu"]}
        shutil.rmtree(spec["offload_dir"], ignore_errors=True)
        evict(_files(*info["folders"].values()))
        bandwidth, methods = cold_read_bandwidth(shards)
        cgroup = Cgroup(found[0], found[1], limit)
        print(f"{name} under {cgroup.limit / GiB:.2f} GiB (cold read {bandwidth / 1e9:.2f} GB/s) ...", flush=True)
        try:
            if args.unpaired:
                result = run_worker(spec, args.timeout, cgroup)
            else:
                result = run_paired(spec, specs["reference"], args.timeout, cgroup, lambda: direct_probe(shards))
        finally:
            cgroup.remove()
        result.update(limit=cgroup.limit, read_bandwidth=bandwidth, read_methods=methods, max_memory=spec["max_memory"])
        results[name] = result
        print(f"  {result['status']}: {result.get('error', '')[:200]}", flush=True)
        shutil.rmtree(spec["offload_dir"], ignore_errors=True)
    results["load_after"] = os.getloadavg()
    (cache / f"limit-{args.size}.json").write_text(json.dumps(results, indent=1, default=str))
    from benchmarks.limit_report import render

    out.write_text(render(results, header["command"], args.size))
    print(out.read_text())
    return 0


def _skipped(command: str, why: str) -> str:
    return f"# Larger-than-memory benchmark\n\nSkipped: {why}.\n\nCommand: `{command}`\n"


if __name__ == "__main__":
    raise SystemExit(main())
