"""Two real replica processes on CPU (gloo) with disk offload, launched the ways Lightning supports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_models import plain_gpt, reference_outputs, tokens, write_bare_checkpoint

JOB = Path(__file__).resolve().parent / "replica_job.py"
NUM_SAMPLES, BATCH_SIZE = 7, 2  # uneven: 4 samples on rank 0, 3 on rank 1, no padding

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_job(tmp_path: Path, launcher: str, *extra: str) -> Path:
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt(), safe=False)  # .bin: disk weights are written
    out = tmp_path / "out"
    out.mkdir()
    args = [str(JOB), str(checkpoint), str(out), "--num-samples", str(NUM_SAMPLES), "--batch-size", str(BATCH_SIZE),
            *extra]  # fmt: skip
    if launcher == "torchrun":
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    else:
        cmd = [sys.executable, *args]  # Trainer(devices=2) re-launches this script for local rank 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the job's own session; torchrun passes SIGTERM to its workers
        try:
            output, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
        pytest.fail(f"the replica job hung:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return out


@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_two_replicas_with_disk_offload_match_single_process(tmp_path, launcher):
    out = run_job(tmp_path, launcher)
    reports = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]

    for rank, report in enumerate(reports):
        assert (report["global_rank"], report["local_rank"], report["world_size"]) == (rank, rank, 2)
        assert report["backend"] == "gloo" and report["root_device"] == "cpu"
        assert report["parallel_devices"] == ["cpu"]
        assert {"cpu", "disk"} <= set(report["plan_devices"])  # each replica offloads part of the model to disk
        assert Path(report["offload_folder"]) == out / "offload" / f"rank-{rank}"
        assert report["offload_files"], "the .bin checkpoint's disk weights are written to the rank's own folder"
    # exactly once: the ranks' shares are disjoint and cover the dataset
    seen = [report["seen_indices"] for report in reports]
    assert sorted(seen[0] + seen[1]) == list(range(NUM_SAMPLES)) and not set(seen[0]) & set(seen[1])
    assert reports[1]["returned"] == 0  # rank 0 holds the gathered predictions

    device_map = json.loads((out / "device_map.json").read_text())["device_map"]  # rank 0 wrote the table's JSON
    assert set(device_map.values()) == set(reports[0]["plan_devices"])

    predictions = torch.load(out / "predictions.pt", weights_only=True)
    expected = reference_outputs(tokens(n=NUM_SAMPLES, t=5), batch_size=BATCH_SIZE)  # the plainly loaded model
    assert len(predictions) == len(expected) == 4
    for got, want in zip(predictions, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_replicas_each_on_its_own_gpu(tmp_path):
    out = run_job(tmp_path, "lightning", "--accelerator", "gpu")
    for rank in range(2):
        report = json.loads((out / f"rank-{rank}.json").read_text())
        assert report["backend"] == "nccl" and report["root_device"] == f"cuda:{rank}"
        assert report["parallel_devices"] == [f"cuda:{rank}"]
        assert {str(rank), "cpu", "disk"} == set(report["plan_devices"])  # its own GPU only, then RAM and disk
    predictions = torch.load(out / "predictions.pt", weights_only=True)
    expected = reference_outputs(tokens(n=NUM_SAMPLES, t=5), batch_size=BATCH_SIZE)
    assert len(predictions) == len(expected)
    for got, want in zip(predictions, expected):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_fewer_samples_than_replicas_fails_clearly_on_every_rank_before_loading(tmp_path):
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt(), safe=False)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "WORLD_SIZE", "RANK", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(JOB), str(checkpoint), str(out), "--num-samples", "1"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    message = "Predict dataloader 0 has 1 sample(s) for 2 replicas"
    assert output.count(message) >= 2, output[-4000:]  # both ranks refuse alike: no rank waits for the other
    assert "AssertionError" not in output
    assert [p for p in out.rglob("*") if p.is_file()] == []  # refused before planning: no offload file, no output
