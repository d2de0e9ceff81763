"""Simulated GPUs on a machine with CUDA: run them in a process of their own, with CUDA hidden.

The simulated GPUs register a PyTorch PrivateUse1 backend, and once one is registered PyTorch's own accelerator
choice prefers it over CUDA for the rest of the process: ``Tensor.is_pinned()``, ``pin_memory()`` and
``torch.empty(..., pin_memory=True)`` then ask the simulated backend, and the CUDA tests after it go wrong. So in a
process that sees CUDA no test may enter ``simulated_gpus``:

- an autouse fixture makes entering it skip the test (before anything is registered), and
- at the end of the session every test skipped so (or by a "shadows CUDA" skip mark) runs again, in one pytest
  subprocess with ``CUDA_VISIBLE_DEVICES=""``; its failures fail the session and its summary is printed.

On a machine without CUDA nothing changes. The conftest imports the hooks and the fixture from here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REASON = "simulated GPUs need a CUDA-free process: this test runs again in one at the end of the session"
_SUBPROCESS = "LIGHTNING_BIGMODEL_SIMULATED_SUBPROCESS"
_RERUN: list[str] = []


# Asked once, at import: tests patch `torch.cuda.is_available` (some to raise), and the report hook below runs while
# their patches are in place.
_CUDA = torch.cuda.is_available()


def _must_isolate() -> bool:
    return os.environ.get(_SUBPROCESS) != "1" and _CUDA


@pytest.fixture(autouse=True)
def _simulated_gpus_in_a_cuda_free_process(monkeypatch):
    if _must_isolate():
        from lightning_bigmodel.simulate import _backend

        def refuse(module):
            pytest.skip(REASON)

        monkeypatch.setattr(_backend, "ensure_registered", refuse)
    yield


def _rerun_reason(report) -> bool:
    if not report.skipped or not isinstance(report.longrepr, (tuple, list)):
        return False
    reason = str(report.longrepr[2]).lower()
    return REASON.lower() in reason or ("shadow" in reason and "cuda" in reason)


def pytest_runtest_logreport(report) -> None:
    if _must_isolate() and _rerun_reason(report) and report.nodeid not in _RERUN:
        _RERUN.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    """In the main process (not an xdist worker): run the collected simulated-GPU tests with CUDA hidden."""
    if not _RERUN or hasattr(session.config, "workerinput"):
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", _SUBPROCESS: "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if len(_RERUN) > 20 and session.config.pluginmanager.hasplugin("xdist"):
        command += ["-n", "4"]
    done = subprocess.run(
        [*command, *_RERUN], cwd=str(session.config.rootpath), env=env, capture_output=True, text=True
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = done.stdout.strip().splitlines()
    if reporter is not None:
        reporter.write_sep("=", f"{len(_RERUN)} simulated-GPU tests, rerun with CUDA hidden")
        reporter.write_line("\n".join(lines[-40:]))
    if done.returncode != 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
