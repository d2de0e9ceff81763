"""pytest plugin: keep only the CUDA-gated tests (``-p cuda_tests`` with this folder on ``PYTHONPATH``).

A test is CUDA-gated when it carries a ``skipif`` mark whose reason starts with "needs" and names CUDA, a GPU or
NCCL (``"needs CUDA"``, ``"needs 2 CUDA GPUs"``, ``"needs NCCL"``...), and not a machine *without* them. Used by
``scripts/gpu_check.sh``.

At the end it prints one line that says how many CUDA-gated tests ran and which were skipped and why (a pass that is
dropped for want of a package must show), plus any module that could not be collected (its CUDA tests are lost);
with ``CUDA_TESTS_SUMMARY=path`` it also writes those figures as JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

_GATED = re.compile(r"^needs\b(?!.*\bwithout\b).*\b(cuda|gpus?|nccl)\b", re.IGNORECASE)  # not "needs ... without GPUs"


def is_cuda_gated(item) -> bool:
    return any(_GATED.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items) -> None:
    kept = [item for item in items if is_cuda_gated(item)]
    config.hook.pytest_deselected(items=[item for item in items if not is_cuda_gated(item)])
    items[:] = kept


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def summarise(stats: dict) -> dict:
    """Counts from pytest's terminal-reporter ``stats``: outcomes, skip reasons of CUDA-gated tests, modules skipped
    whole (a module-level skip may hide CUDA tests) and modules that could not be collected (their CUDA tests are lost).
    """
    tests = lambda key: [r for r in stats.get(key, []) if getattr(r, "when", "call") != "collect"]  # noqa: E731
    modules = lambda key: [r for r in stats.get(key, []) if getattr(r, "when", "") == "collect"]  # noqa: E731
    return {
        "passed": len(tests("passed")),
        "failed": len(tests("failed")),
        "errors": len(tests("error")),
        "skipped": len(tests("skipped")),
        "skip_reasons": dict(Counter(_skip_reason(r) for r in tests("skipped")).most_common()),
        "modules_skipped": {str(r.nodeid): _skip_reason(r) for r in modules("skipped")},
        "not_collected": sorted(str(r.nodeid) for r in modules("error")),
    }


def summary_line(summary: dict) -> str:
    line = (
        f"cuda_tests: {summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, "
        f"{summary['skipped']} skipped"
    )
    if summary["skip_reasons"]:
        line += " (" + "; ".join(f"{count} x {reason}" for reason, count in summary["skip_reasons"].items()) + ")"
    if summary["modules_skipped"]:
        line += f"; {len(summary['modules_skipped'])} modules skipped whole (" + "; ".join(
            f"{module}: {reason}" for module, reason in summary["modules_skipped"].items()
        ) + ")"
    if summary["not_collected"]:
        line += f"; NOT COLLECTED (their CUDA tests are lost): {', '.join(summary['not_collected'])}"
    return line


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    summary = summarise(terminalreporter.stats)
    terminalreporter.write_line(summary_line(summary))
    path = os.environ.get("CUDA_TESTS_SUMMARY")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
