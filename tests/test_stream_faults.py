"""Shards that change under a running model: a clear error naming the shard and the tensor, never SIGBUS, never
silently different outputs. Each case runs in a subprocess (a SIGBUS would kill the test runner), and the files are
changed by another process (``truncate``) or in place, as a user's tools would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pread/truncate semantics of Linux")

CONFIG = GPTConfig(vocab_size=256, block_size=16, n_layer=4, n_head=2, n_embd=64)
DEVICE_MAP = {
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
    "transformer.h.2": "disk", "transformer.h.3": "disk", "transformer.ln_f": "disk", "lm_head": "cpu",
}  # fmt: skip

_CHILD = r"""
import json, os, subprocess, sys, torch
from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
cases, device_map = json.loads(sys.argv[1]), json.loads(sys.argv[2])
config = GPTConfig(vocab_size=256, block_size=16, n_layer=4, n_head=2, n_embd=64)
torch.manual_seed(0)
reference = GPT(config).eval()
x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))

def rewrite(target, size):  # same size, other bytes, same inode: what `torch.save`/`save_file` over the path does
    with open(target, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(size - size // 2))

def replace(target, size):  # a new file renamed over the path: the running model keeps the planned one
    with open(target, "rb") as f:
        data = bytearray(f.read())
    data[size // 2 :] = os.urandom(size - size // 2)
    with open(target + ".new", "wb") as f:
        f.write(data)
    os.replace(target + ".new", target)

def run(folder, fault, target, short):
    from lightning_bigmodel.offload import attach
    attach.should_release = lambda disk_bytes: short  # short: the disk layers stream each forward, as under a limit
    with init_empty_weights():
        model = GPT(config)
    model = load_checkpoint_and_dispatch(model, folder, device_map=device_map).eval()
    size, result = os.path.getsize(target), {}
    try:
        with torch.inference_mode():
            if fault == "rewrite-before-first-forward":
                rewrite(target, size)
            expected = reference(x)
            result["first_equal"] = torch.equal(model(x), expected)
            if fault == "truncate":  # by another process
                subprocess.run(["truncate", "-s", str(size // 3), target], check=True)
            elif fault == "rewrite":
                rewrite(target, size)
            elif fault == "replace":
                replace(target, size)
            for _ in range(2):
                result["later_equal"] = torch.equal(model(x), expected)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    return result

print("RESULT " + json.dumps({name: run(*case) for name, case in cases.items()}))
"""

DISK_KEY = "transformer.h.3.mlp.c_fc.weight"
CPU_KEY = "transformer.h.0.mlp.c_fc.weight"
CASES = {  # name: (fault, the tensor whose shard it hits, memory short)
    "disk-truncate": ("truncate", DISK_KEY, True), "disk-rewrite": ("rewrite", DISK_KEY, True),
    "disk-replace": ("replace", DISK_KEY, True), "cpu-truncate": ("truncate", CPU_KEY, False),
    "cpu-rewrite-first": ("rewrite-before-first-forward", CPU_KEY, False),
    "disk-truncate-spare": ("truncate", DISK_KEY, False),
}  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """Every case in one child process (one interpreter start), each on its own copy of a sharded checkpoint."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    state = {k: v for k, v in GPT(CONFIG).state_dict().items() if k != "lm_head.weight"}
    save_sharded_checkpoint(state, root / "original", max_shard_size=60_000)
    weight_map = json.loads((root / "original" / "model.safetensors.index.json").read_text())["weight_map"]
    cases = {}
    for name, (fault, key, short) in CASES.items():
        shutil.copytree(root / "original", root / name)
        cases[name] = (str(root / name), fault, str(root / name / weight_map[key]), short)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases), json.dumps(DEVICE_MAP)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, f"child died with {done.returncode} (-7 is SIGBUS): {done.stderr[-2000:]}"
    line = [row for row in done.stdout.splitlines() if row.startswith("RESULT ")][-1]
    found = json.loads(line[len("RESULT ") :])
    return {name: (found[name], weight_map[key]) for name, (_, key, _) in CASES.items()}


def _run(results, name):
    return results[name]


def test_disk_shard_truncated_under_the_model_raises_naming_shard_and_tensor(results):
    result, shard = _run(results, "disk-truncate")
    assert result["first_equal"]
    error = result.get("error", "")
    assert error.startswith("CheckpointError") and shard in error and "truncated" in error, result
    assert "`transformer.h." in error  # the tensor being read when the file ended


def test_disk_shard_rewritten_in_place_raises_instead_of_mixing_weights(results):
    result, shard = _run(results, "disk-rewrite")
    assert result["first_equal"]
    error = result.get("error", "")
    assert error.startswith("CheckpointError") and shard in error and "changed while the model uses it" in error


def test_disk_shard_replaced_by_rename_keeps_the_planned_file(results):
    result, _ = _run(results, "disk-replace")
    assert result == {"first_equal": True, "later_equal": True}


def test_cpu_shard_truncated_after_the_first_forward_changes_nothing(results):
    result, _ = _run(results, "cpu-truncate")
    assert result == {"first_equal": True, "later_equal": True}  # the cpu weights are copies by then


def test_cpu_shard_rewritten_before_the_first_forward_raises(results):
    result, shard = _run(results, "cpu-rewrite-first")
    error = result.get("error", "")
    assert "first_equal" not in result and error.startswith("CheckpointError") and shard in error, result


def test_disk_shard_truncated_with_memory_to_spare_changes_nothing(results):
    result, _ = _run(results, "disk-truncate-spare")
    assert result == {"first_equal": True, "later_equal": True}  # each disk layer was read once and kept
