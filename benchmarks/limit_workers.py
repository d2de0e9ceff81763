"""The worker processes of ``benchmarks.limit_run``: one case alone, or a case paired with the resident reference.

Why pairs: this machine's two cores are shared with other machines' work (steal time of 30-70% was seen, and a resident
decode of gpt2-large took 0.8 s, then 2.3 s, a minute apart), and its storage swings as much. A floor measured once
per run, minutes away from the forward it judges, says more about the moment than about the library. In a pair the
case (inside its memory cgroup) and plain PyTorch (the whole model resident, outside) take turns: before each of the
case's timed forwards, the reference runs the same forward, then the checkpoint is read cold for one second or so with
``O_DIRECT`` into huge pages (the fastest way measured here, around the page cache: the case's resident pages stay),
then the case runs. Each forward is then judged against the floor of its own moment.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.cases_limit import PACE
from benchmarks.worker import MARKER

ROOT = Path(__file__).resolve().parent.parent
PROBE_BYTES = 2**30  # read before each paired forward to measure the disk's bandwidth of the moment


def worker_command(spec: dict[str, Any], cgroup: Any = None) -> list[str]:
    """The command running ``spec`` in a fresh interpreter, inside ``cgroup`` (a ``limit_run.Cgroup``) when given."""
    python = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    if cgroup is None:
        return python
    # the shell joins the cgroup, then becomes the worker: nothing runs outside the limit
    return ["sh", "-c", f'echo $$ > "{cgroup.path / "cgroup.procs"}" && exec "$@"', "sh", *python]


def _finish(result: dict[str, Any], lines: list[str], returncode: Optional[int], timeout: int, cgroup: Any) -> None:
    """Fill ``result`` from the worker's last result line, or say how it ended, and its status."""
    found = [line for line in lines if line.startswith(MARKER)]
    if found:
        result.update(json.loads(found[-1][len(MARKER) :]))
    elif returncode is None:
        result["error"] = f"timed out after {timeout} s"
    else:
        result["error"] = f"exited with {returncode} before reporting"
    if cgroup is not None:
        result["peak_bytes"], result["oom_kills"] = cgroup.peak(), cgroup.oom_kills()
    killed = returncode is not None and returncode in (-9, 137)
    result["status"] = "completed" if result.get("ok") else "OOM-killed" if killed and result.get("oom_kills") else "failed"


def run_worker(spec: dict[str, Any], timeout: int, cgroup: Any = None) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter, inside ``cgroup`` when given; the result, or how it ended."""
    start = time.perf_counter()
    try:
        done = subprocess.run(worker_command(spec, cgroup), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, returncode = done.stdout, done.returncode
    except subprocess.TimeoutExpired as err:
        output, returncode = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""), None
    result: dict[str, Any] = {"wall_s": time.perf_counter() - start, "returncode": returncode}
    _finish(result, output.splitlines(), returncode, timeout, cgroup)
    return result


class _Worker:
    """A paced worker: its stdout read line by line, ``go`` sent on its stdin."""

    def __init__(self, spec: dict[str, Any], cgroup: Any = None) -> None:
        self.proc = subprocess.Popen(
            worker_command({**spec, "paced": True}, cgroup), cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.lines: list[str] = []

    def next_pace(self) -> Optional[str]:
        """Read on to the worker's next pace line (``"<shape> <i>"``); ``None`` once it has exited."""
        assert self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith(PACE):
                return line[len(PACE) :]
        self.proc.wait()
        return None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_paired(
    spec: dict[str, Any], reference: dict[str, Any], timeout: int, cgroup: Any, probe: Any
) -> dict[str, Any]:
    """Run the case ``spec`` inside ``cgroup`` and the resident ``reference`` outside it in turns (see the module
    docstring); ``probe()`` reads the checkpoint cold and returns bytes/s. The case's result gets ``paired``: per
    shape, the case's, the reference's times and the bandwidth measured before each of the case's forwards.
    The reference loads first (and warms up), alone; the case loads after it, alone."""
    ref, case = _Worker({**reference, "write_ref": False, "compare": False}), None
    timer = threading.Timer(timeout, lambda: [w.kill() for w in (ref, case) if w is not None])
    timer.start()
    start = time.perf_counter()
    bandwidths: dict[str, list[float]] = {}
    try:
        ref_pace = ref.next_pace()
        case = _Worker(spec, cgroup)
        while (pace := case.next_pace()) is not None:
            if ref_pace != pace:
                raise RuntimeError(f"the reference is at {ref_pace!r} where the case is at {pace!r}")
            ref.go()
            ref_pace = ref.next_pace()  # its forward is done (and, after its last, it has exited)
            bandwidths.setdefault(pace.split()[0], []).append(probe())
            case.go()
    finally:
        timer.cancel()
        for worker in (ref, case):
            if worker is not None:
                worker.kill()
    result: dict[str, Any] = {"wall_s": time.perf_counter() - start, "returncode": case.proc.returncode}
    _finish(result, case.lines, case.proc.returncode, timeout, cgroup)
    ref_result: dict[str, Any] = {}
    _finish(ref_result, ref.lines, ref.proc.returncode, timeout, None)
    result["paired"] = {
        shape: {
            "case_s": result.get(f"{shape}_times_s", []), "reference_s": ref_result.get(f"{shape}_times_s", []),
            "bandwidth": values,
        }
        for shape, values in bandwidths.items()
    }  # fmt: skip
    return result
