"""``scripts/gpu_check.sh`` and its helpers, on a machine without CUDA: it says what the machine is, then either that
there is nothing to check (exit 0) or, when a GPU is listed but torch cannot use it, one clear error line (non-zero);
the plugin that picks the CUDA-gated tests recognises their marks and counts the skipped ones with their reasons; the
report is rewritten as each pass completes, so a run cut short still reports (torch made to report a GPU); the 20B
benchmark's random checkpoint loads the same in ours and in accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cuda_tests import is_cuda_gated  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the check")


def run_check(tmp_path: Path, *, extra_path: str = "", pythonpath: str = "", **env: str) -> subprocess.CompletedProcess:
    """``bash scripts/gpu_check.sh OUT`` with a bare PATH (plus ``extra_path`` first) and this interpreter."""
    environment = {"PATH": f"{extra_path}:/usr/bin:/bin" if extra_path else "/usr/bin:/bin", "PYTHON": sys.executable,
                   "HOME": str(tmp_path), **env}  # fmt: skip
    if pythonpath:
        environment["PYTHONPATH"] = pythonpath
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=environment)  # fmt: skip


def fake_nvidia_smi(folder: Path) -> Path:
    """An ``nvidia-smi`` that lists one H100 with driver 580 (the query gpu_check.sh makes)."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 580.65.06"\n')
    script.chmod(0o755)
    return folder


@no_cuda
def test_without_cuda_it_says_what_the_machine_is_then_that_there_is_nothing_to_check(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.splitlines()
    assert first.startswith("gpu_check: python ") and f"torch {torch.__version__}" in first and "torch sees 0" in first
    assert last == "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check on this machine."
    assert done.stderr == "" and not (tmp_path / "out").exists()


@no_cuda
def test_gpus_listed_by_nvidia_smi_but_none_in_torch_fail_with_one_line(tmp_path):
    done = run_check(tmp_path, extra_path=str(fake_nvidia_smi(tmp_path / "bin")))
    assert done.returncode != 0
    assert "driver 580.65.06" in done.stdout and "nvidia-smi GPUs: NVIDIA H100 80GB HBM3" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith("gpu_check: error: nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3) but torch ")
    assert "sees none" in line and ("CPU build" if torch.version.cuda is None else "CUDA_VISIBLE_DEVICES") in line
    assert not (tmp_path / "out").exists()


def test_torch_that_cannot_be_imported_fails_with_one_line(tmp_path):
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("libcudart.so.13: cannot open shared object file")\n')
    done = run_check(tmp_path, pythonpath=str(shadow.parent))
    assert done.returncode != 0
    assert "torch: NOT IMPORTABLE" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"gpu_check: error: {sys.executable} cannot import torch (ImportError: libcudart.so.13")


def fake_gpu(folder: Path) -> str:
    """A ``sitecustomize`` that makes torch report one GPU: the passes start, and fail fast."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "torch.cuda.get_device_name = lambda index=0: 'Fake GPU'\n"
    )
    return str(folder)


PASSES = ["tests", "memory-vs-plan", "sanitizer", "offload", "bigmodel", "vs-accelerate", "pipeline"]


@no_cuda
def test_each_finished_pass_is_in_the_report_at_once(tmp_path):
    done = run_check(tmp_path, pythonpath=fake_gpu(tmp_path / "fake"), GPU_CHECK_PASSES="tests", GPU_CHECK_TESTS_S="2")
    assert done.returncode == 1, done.stdout + done.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "GPU_CHECK.json").read_text())
    (tests,) = summary["passes"]
    assert tests["name"] == "tests" and tests["result"] == "TIMED OUT after 2s" and tests["cap"] == 2
    assert summary["not_run"] == [] and summary["environment"]["gpus_torch"] == "1 x Fake GPU"
    assert "| tests | TIMED OUT after 2s | " in (out / "GPU_CHECK.md").read_text()
    assert (out / "gpu_check" / "tests.log").exists()


@no_cuda
def test_a_run_out_of_time_starts_no_pass_and_reports_them_not_run(tmp_path):
    done = run_check(tmp_path, pythonpath=fake_gpu(tmp_path / "fake"), GPU_CHECK_TOTAL_S="1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count("not run: the total time (1s) is spent") == len(PASSES)
    summary = json.loads((tmp_path / "out" / "GPU_CHECK.json").read_text())
    assert summary["passes"] == [] and summary["not_run"] == PASSES  # in the order of their value
    assert "| pipeline | not run (yet) |" in (tmp_path / "out" / "GPU_CHECK.md").read_text()


def test_script_parses():
    for script in ("gpu_check.sh", "gpu_wheels.sh", "compat_check.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0, script


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
        (['needs torchao (pip install "lightning-bigmodel[quantization]")'], False),
        (["needs a machine without GPUs"], False),
        ([], False),
    ],
)
def test_cuda_gated_tests_are_recognised(reasons, gated):
    assert is_cuda_gated(_item(*reasons)) is gated


def test_the_plugin_counts_skipped_cuda_tests_with_their_reasons(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "@pytest.mark.skipif(False, reason='needs CUDA')\n"
        "def test_runs(): pass\n"
        "@pytest.mark.skipif(True, reason='needs 2 CUDA GPUs')\n"
        "def test_two(): pass\n"
        "@pytest.mark.skipif(False, reason='needs CUDA')\n"
        "def test_without_a_package():\n"
        "    pytest.importorskip('surely_not_installed_package')\n"
        "def test_not_gated(): raise AssertionError('deselected: never runs')\n"
    )
    (tmp_path / "test_whole_module.py").write_text("import pytest\npytest.importorskip('surely_not_installed_package')\n")
    (tmp_path / "test_broken.py").write_text("import surely_not_installed_package\n")
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "scripts"), CUDA_TESTS_SUMMARY=str(summary_path))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "cuda_tests", "-p", "no:cacheprovider", "-q",
                           "--continue-on-collection-errors", "-p", "no:xdist", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    summary = json.loads(summary_path.read_text())
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 0, 2), done.stdout
    assert summary["skip_reasons"] == {
        "needs 2 CUDA GPUs": 1, "could not import 'surely_not_installed_package': No module named "
        "'surely_not_installed_package'": 1
    }  # fmt: skip
    assert list(summary["modules_skipped"]) == ["test_whole_module.py"]
    assert summary["not_collected"] == ["test_broken.py"]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("cuda_tests:")]
    assert line.startswith("cuda_tests: 1 passed, 0 failed, 0 errors, 2 skipped (1 x needs 2 CUDA GPUs; 1 x could not")
    assert "NOT COLLECTED (their CUDA tests are lost): test_broken.py" in line


def test_the_big_benchmark_checkpoint_loads_the_same_in_ours_and_accelerate(tmp_path):
    """The 20B benchmark's writer (parallel shards, HF index) on its tiny shape: every tensor is there for a strict
    load by ours, accelerate reads the same weights, and both compute what the plain model with those weights does."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from benchmarks.gpu_bigmodel import gpt_config, load_accelerate, load_ours, write_random_checkpoint
    from examples.gpt import GPT

    config = gpt_config("tiny")
    written = write_random_checkpoint(tmp_path / "ckpt", config, torch.bfloat16, workers=3)
    assert not written["reused"] and len(list((tmp_path / "ckpt").glob("*.safetensors"))) == config.n_layer + 1
    assert write_random_checkpoint(tmp_path / "ckpt", config, torch.bfloat16)["reused"]  # written once
    plain = GPT(config).to(torch.bfloat16).eval()
    state = {k: v for shard in (tmp_path / "ckpt").glob("*.safetensors") for k, v in load_file(shard).items()}
    assert plain.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied to wte
    x = torch.randint(0, config.vocab_size, (2, 8))
    with torch.inference_mode():
        expected = plain(x)
        for load in (load_ours, load_accelerate):
            model = load(config, tmp_path / "ckpt", {"": "cpu"})
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_ci_runs_the_readme_test_command_in_parallel():
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if line.startswith("bash scripts/setup.sh && ") and "pytest" in line]
    assert "-n auto" in command  # pytest-xdist, from the test extra
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert '"pytest-xdist' in (ROOT / "pyproject.toml").read_text()
