"""pytest plugin: keep only the CUDA-gated tests (``-p cuda_tests`` with this folder on ``PYTHONPATH``).

A test is CUDA-gated when it carries a ``skipif`` mark whose reason starts with "needs" and names CUDA, a GPU or
NCCL (``"needs CUDA"``, ``"needs 2 CUDA GPUs"``, ``"needs NCCL"``...). Used by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import re

_GATED = re.compile(r"^needs\b.*\b(cuda|gpus?|nccl)\b", re.IGNORECASE)


def is_cuda_gated(item) -> bool:
    return any(_GATED.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items) -> None:
    kept = [item for item in items if is_cuda_gated(item)]
    config.hook.pytest_deselected(items=[item for item in items if not is_cuda_gated(item)])
    items[:] = kept
