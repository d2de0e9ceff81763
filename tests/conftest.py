"""Shared fixtures: tiny models and tiny checkpoints written into ``tmp_path``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import save_file

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from csan_all_threads import pytest_configure  # noqa: F401 (the sanitizer pass: CUDA's race detector in every thread)
from simulated_isolation import (  # noqa: F401 (pytest finds hooks and fixtures by name here)
    _simulated_gpus_in_a_cuda_free_process,
    pytest_runtest_logreport,
    pytest_sessionfinish,
)

@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a real tmpfs of ``size`` (e.g. ``"2m"``) under ``tmp_path`` and returns its path, for
    faults like a full disk without mocking the file system; skips with the reason where mounting is not allowed."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


# Every layout `write_checkpoint` can produce; each is something a user may pass as `checkpoint`.
CHECKPOINT_KINDS = (
    "safetensors",  # one model.safetensors file (path of the file)
    "bin",  # one pytorch_model.bin file
    "pt",  # one weights.pt file
    "ckpt",  # a Lightning-style .ckpt: {"state_dict": ..., "pytorch-lightning_version": ...}
    "folder",  # a folder holding model.safetensors
    "sharded_safetensors",  # folder with model-0000k-of-0000n.safetensors + HF index (path of the folder)
    "sharded_safetensors_index",  # same, path of model.safetensors.index.json
    "sharded_bin",  # pytorch_model-0000k-of-0000n.bin + HF index (path of the index)
    "plain_index",  # safetensors shards + plain {name: file} index.json (path of the index)
)


def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict covering the dtypes and shapes that trip readers (bf16, ints, bool, scalar, empty)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "linear.weight": torch.randn(8, 4, generator=g),
        "linear.bias": torch.randn(8, generator=g),
        "emb.weight": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, 5, generator=g).to(torch.float16),
        "double": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "ids": torch.randint(-(2**40), 2**40, (6,), generator=g, dtype=torch.int64),
        "small_ints": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(5, 3, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return make_state_dict()


@pytest.fixture
def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny")).eval()


def write_checkpoint_to(folder: Path, kind: str, state_dict: dict[str, torch.Tensor], shard_bytes: int = 200) -> Path:
    """Write ``state_dict`` into ``folder`` in layout ``kind`` (one of ``CHECKPOINT_KINDS``); return what to pass."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind in ("safetensors", "folder"):
        save_file(state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder / "model.safetensors" if kind == "safetensors" else folder
    if kind in ("bin", "pt"):
        path = folder / ("pytorch_model.bin" if kind == "bin" else "weights.pt")
        torch.save(state_dict, path)
        return path
    if kind == "ckpt":
        path = folder / "epoch=0-step=1.ckpt"
        torch.save({"state_dict": state_dict, "pytorch-lightning_version": "2.6.6", "epoch": 0}, path)
        return path
    if kind.startswith("sharded") or kind == "plain_index":
        index = save_sharded_checkpoint(
            state_dict,
            folder,
            max_shard_size=shard_bytes,
            safe_serialization=kind != "sharded_bin",
            index_format="plain" if kind == "plain_index" else "hf",
        )
        assert index.name.endswith(".json"), f"expected several shards, got {index}"
        return folder if kind == "sharded_safetensors" else index
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {CHECKPOINT_KINDS}")


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``write_checkpoint(kind, state_dict=None, name=None)`` writes under ``tmp_path / (name or kind)``."""

    def _write(kind: str, state_dict: Optional[dict[str, torch.Tensor]] = None, name: Optional[str] = None) -> Path:
        state_dict = make_state_dict() if state_dict is None else state_dict
        return write_checkpoint_to(tmp_path / (name or kind), kind, state_dict)

    return _write
