"""Measuring tools used inside a worker process: memory sampling, forward timing, folder sizes, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

_STATUS = "/proc/self/status"
_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def read_status() -> dict[str, int]:
    """Memory fields of ``/proc/self/status`` in bytes (empty where the file does not exist)."""
    out: dict[str, int] = {}
    try:
        with open(_STATUS) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` = 5). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemorySampler:
    """Background thread that records the peak of ``RssAnon``, ``RssFile`` and ``VmRSS`` every ``interval`` seconds.

    ``VmHWM`` (reset at ``start``) catches the true peak of the total RSS between samples; anonymous RSS has no
    kernel high-water mark, so its peak is the sampled maximum.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.hwm_reset = False

    def _sample(self) -> None:
        for key, value in read_status().items():
            if value > self.peak.get(key, 0):
                self.peak[key] = value

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def start(self) -> "MemorySampler":
        self.hwm_reset = reset_peak_rss()
        self.baseline = read_status()
        self.peak = dict(self.baseline)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        """Stop sampling; return peak growth over the baseline, in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        base = self.baseline
        total_peak = max(self.peak.get("VmRSS", 0), self.peak.get("VmHWM", 0) if self.hwm_reset else 0)
        return {
            "peak_anon_growth": self.peak.get("RssAnon", 0) - base.get("RssAnon", 0),
            "peak_file_growth": self.peak.get("RssFile", 0) - base.get("RssFile", 0),
            "peak_total_growth": total_peak - base.get("VmRSS", 0),
            "baseline_rss": base.get("VmRSS", 0),
        }


def time_calls(
    fn: Callable[[], object], warmup: int, iters: int, sync: Callable[[], None], budget_s: float = 30.0, min_iters: int = 3
) -> dict[str, object]:
    """Median wall time of ``fn`` over ``iters`` calls after ``warmup`` untimed calls.

    Stops early (after at least ``min_iters`` timed calls) once the timed calls have taken ``budget_s``.
    """
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        if len(times) >= min_iters and sum(times) > budget_s:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def folder_bytes(folder: Optional[str]) -> dict[str, int]:
    """Apparent size and allocated size (``du``) of every file under ``folder``; zeros when it does not exist."""
    apparent = allocated = files = 0
    if folder and os.path.isdir(folder):
        for root, _, names in os.walk(folder):
            for name in names:
                st = os.stat(os.path.join(root, name))
                apparent += st.st_size
                allocated += st.st_blocks * 512
                files += 1
    return {"apparent": apparent, "allocated": allocated, "files": files}


def read_files(paths: list[Path]) -> int:
    """Read ``paths`` once so the page cache is warm for every case alike. Returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def machine_info() -> dict[str, object]:
    """CPU model, cores, RAM, GPU (when torch sees one) and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": sys.version.split()[0],
    }
    info.update(versions())
    return info


def versions() -> dict[str, str]:
    """Versions of the packages the benchmark compares (``missing`` where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "lightning", "accelerate", "safetensors", "lightning-bigmodel"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    try:
        import torch

        out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - a broken CUDA set-up is reported, not fatal
        out["cuda_device"] = "unavailable"
    return out
