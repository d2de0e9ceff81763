"""PyTorch's CUDA sanitizer in every thread, for the sanitizer pass of ``scripts/gpu_check.sh``.

Why: the races this library can make are between streams (a prefetched copy on a side stream read by the compute
stream without waiting for it; a pipelined micro-batch on another stream). compute-sanitizer's ``racecheck`` sees
shared-memory hazards inside one kernel only, and ``TORCH_CUDA_SANITIZER=1`` (CSAN, which does check stream order)
watches the thread that imported torch only: its dispatch mode is per thread, and the prefetch and pipeline copies run
in worker threads. With ``BIGMODEL_CSAN_ALL_THREADS=1`` the sanitizer is enabled and its dispatch mode is pushed in
every thread started afterwards (``threading.Thread.run``), so those copies are checked too; an unsynchronised access
raises ``torch.cuda._sanitizer.CUDASanitizerErrors`` in the test.

Proof that the pass can fail: ``BIGMODEL_PLANT_RACE=1`` turns every ``torch.cuda.Stream.wait_event`` into a no-op
(the prefetch's and the pipeline's waits included), e.g.
``BIGMODEL_PLANT_RACE=1 GPU_CHECK_PASSES=sanitizer bash scripts/gpu_check.sh`` must fail; and the canary test
``test_gpu_correctness_integration.py::test_the_sanitizer_catches_a_prefetched_copy_read_without_a_wait`` plants the
same race in every sanitizer pass and passes only when the sanitizer reports it.

The conftest imports :func:`pytest_configure` from here; without the variables nothing happens.
"""

from __future__ import annotations

import os
import threading
from typing import Any

ALL_THREADS = "BIGMODEL_CSAN_ALL_THREADS"
PLANT_RACE = "BIGMODEL_PLANT_RACE"


def active() -> bool:
    """Whether the sanitizer watches every thread in this process."""
    return os.environ.get(ALL_THREADS) == "1" and getattr(threading.Thread.run, "_csan_every_thread", False)


def push_in_every_thread(mode: Any) -> None:
    """Push the dispatch mode ``mode`` in every thread started from now on, for the whole life of the thread."""
    from torch.utils._python_dispatch import _pop_mode, _push_mode

    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        _push_mode(mode)
        try:
            original(self)
        finally:
            _pop_mode()

    run._csan_every_thread = True  # type: ignore[attr-defined]
    threading.Thread.run = run  # type: ignore[method-assign]


def plant_race() -> None:
    """Make every ``torch.cuda.Stream.wait_event`` do nothing: streams then read what others may still be writing."""
    import torch

    torch.cuda.Stream.wait_event = lambda self, event: None  # type: ignore[method-assign]


def pytest_configure(config) -> None:
    if os.environ.get(ALL_THREADS) == "1":
        import torch

        if torch.cuda.is_available():
            from torch.cuda._sanitizer import cuda_sanitizer, enable_cuda_sanitizer

            if not cuda_sanitizer.enabled:
                enable_cuda_sanitizer()
            push_in_every_thread(cuda_sanitizer.dispatch)
    if os.environ.get(PLANT_RACE) == "1":
        plant_race()
