"""Fault injection: kill -9 a resumable prediction job part way, restart it, check exactly-once output."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lightning_bigmodel.pl.writers import read_predictions

JOB = Path(__file__).with_name("crash_job.py")
sys.path.insert(0, str(JOB.parent))
import crash_job  # noqa: E402


def _launch(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(JOB), str(out), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _chunks(out: Path) -> list[Path]:
    return sorted(out.glob("chunk-*"))


def _tmps(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith(".tmp"))


def _chunk_indices(out: Path) -> list[int]:
    indices = []
    for path in _chunks(out):
        with safe_open(path, framework="pt") as f:
            indices += f.get_tensor("indices").tolist()
    return indices


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_kill_mid_write_then_kill_mid_batch_then_resume_gives_exactly_once(tmp_path):
    out = tmp_path / "preds"

    # 1) the job SIGKILLs itself on its 3rd chunk: temp file complete, rename not done
    proc = _launch(out, "--kill-at-chunk", "3")
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, log
    assert [p.name for p in _chunks(out)] == [
        "chunk-000000000-000000003-r0.safetensors",
        "chunk-000000004-000000007-r0.safetensors",
    ]
    assert [p.name.split(".")[1] for p in _tmps(out)] == ["chunk-000000008-000000011-r0"]

    # 2) restart, then kill -9 from outside while a batch is in flight (predict_step sleeps)
    proc = _launch(out, "--sleep", "0.05")
    deadline = time.monotonic() + 60
    while len(_chunks(out)) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, log
    done = _chunk_indices(out)
    assert 6 * 4 <= len(done) < crash_job.NUM_SAMPLES
    assert sorted(done) == list(range(len(done)))  # complete chunks only, no duplicates so far
    assert not any(".chunk-000000008" in p.name for p in _tmps(out))  # the rerun removed the torn write

    # 3) restart to completion: loads only the samples not yet written
    proc = _launch(out)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, log
    assert f"RANK 0 SEEN {crash_job.NUM_SAMPLES - len(done)}" in log

    assert _tmps(out) == []
    assert sorted(_chunk_indices(out)) == list(range(crash_job.NUM_SAMPLES))  # exactly once
    with torch.no_grad():
        expected = crash_job.build_net()(crash_job.build_inputs())
    torch.testing.assert_close(read_predictions(out), expected)


def _seen(log: str) -> dict[int, int]:
    pairs = re.findall(r"^RANK (\d+) SEEN (\d+)$", log, flags=re.M)
    return {int(rank): int(n) for rank, n in pairs}


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_job_fails_then_resumes_on_one_process(tmp_path):
    out = tmp_path / "preds"
    # 2 DDP ranks on CPU each write 2 chunks of interleaved indices, then both fail on their 3rd batch
    proc = _launch(out, "--devices", "2", "--fail-at-batch", "2")
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "simulated failure" in log, log
    assert sorted(re.search(r"-r(\d+)\.", p.name).group(1) for p in _chunks(out)) == ["0", "0", "1", "1"]
    assert sorted(_chunk_indices(out)) == list(range(16))  # rank r holds r, r+2, ...: global indices

    proc = _launch(out)  # resume with another world size
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, log
    assert _seen(log) == {0: crash_job.NUM_SAMPLES - 16}
    with torch.no_grad():
        expected = crash_job.build_net()(crash_job.build_inputs())
    torch.testing.assert_close(read_predictions(out), expected)
