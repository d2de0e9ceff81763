"""``scripts/gpu_check.sh``: on a machine without CUDA it says so in one line and exits 0; the plugin that picks the
CUDA-gated tests recognises their marks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cuda_tests import is_cuda_gated  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_without_cuda_the_check_prints_one_line_and_exits_0(tmp_path):
    report = tmp_path / "GPU_CHECK.md"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(report)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check on this machine."
    ]
    assert not report.exists()


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def _item(*reasons: str) -> SimpleNamespace:
    marks = [SimpleNamespace(kwargs={"reason": reason}) for reason in reasons]
    return SimpleNamespace(iter_markers=lambda name: marks if name == "skipif" else [])


@pytest.mark.parametrize(
    ("reasons", "gated"),
    [
        (["needs CUDA"], True),
        (["needs 2 CUDA GPUs"], True),
        (["needs a CUDA GPU"], True),
        (["needs 2 GPUs"], True),
        (["needs NCCL"], True),
        (["the simulation registers a PrivateUse1 backend, which shadows CUDA for the rest of the process"], False),
        (["needs transformers"], False),
        ([], False),
    ],
)
def test_cuda_gated_tests_are_recognised(reasons, gated):
    assert is_cuda_gated(_item(*reasons)) is gated

