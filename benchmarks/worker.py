"""Fresh-process entry point: ``python -m benchmarks.worker '<spec json>'`` runs one case.

Prints one line ``BENCH_RESULT {json}`` on stdout, also when the case fails: then ``ok`` is false and
``error`` / ``stage`` say what broke where, so the runner reports the failure and moves on.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

MARKER = "BENCH_RESULT "


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the case ``spec['kind']`` and return its figures (``ok``/``error`` included)."""
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    # torch imports torch._dynamo lazily on the first random init of a meta tensor (seconds, once per process):
    # import it before any clock starts, in every case alike, so no library is charged for it.
    import torch._dynamo  # noqa: F401
    result: dict[str, Any] = {"ok": False, "stage": "import"}
    try:
        if spec["kind"] == "load":
            from benchmarks.cases import run_load_case

            run_load_case(spec, result)
        elif spec["kind"] == "limit":
            from benchmarks.cases_limit import run_limit_case

            run_limit_case(spec, result)
        elif spec["kind"] == "trainer":
            from benchmarks.cases_trainer import run_trainer_case

            run_trainer_case(spec, result)
        elif spec["kind"] == "empty_init":
            from benchmarks.cases_micro import run_empty_init

            run_empty_init(spec, result)
        elif spec["kind"] == "plan":
            from benchmarks.cases_micro import run_plan

            run_plan(spec, result)
        elif spec["kind"] == "reuse":
            from benchmarks.cases_reuse import run_reuse

            run_reuse(spec, result)
        else:
            raise ValueError(f"Unknown case kind {spec['kind']!r}")
        result["ok"] = True
        result["stage"] = "done"
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, the run goes on
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["traceback"] = traceback.format_exc()[-3000:]
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        if frame is not None:
            result["error"] += f" (raised at {Path(frame.filename).name}:{frame.lineno} in {frame.name})"
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1] if len(argv) > 1 else sys.stdin.read())
    result = run_case(spec)
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
