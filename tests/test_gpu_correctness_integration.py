"""The GPU-correctness fixes on real GPUs (skipped without CUDA; the CPU simulations are in test_gpu_correctness.py
and test_pinned.py). Context checks run in fresh processes and ask the driver which GPUs hold a context."""

from __future__ import annotations

import gc
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

import lightning_bigmodel.offload.pinned as pinned
from cuda_contexts import run_and_list_contexts
from gpu_expectations import gpu_tolerance
from lightning_models import GPTModule, assert_same, plain_gpt, reference_outputs, token_loader, write_bare_checkpoint
from lightning_bigmodel import BigModelInferenceStrategy
from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(autouse=True)
def _restore_env_and_ranks():
    env, ranks = dict(os.environ), (rank_zero_only.rank, utils_rank_zero_only.rank)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    rank_zero_only.rank, utils_rank_zero_only.rank = ranks


# ---------------------------------------------------------------------------------------------- finding 1
@needs_cuda
def test_pinned_slab_is_page_locked_feeds_the_gpu_and_is_given_back():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    before = pinned.pinned_bytes()
    source = torch.randn(3, 2**20 + 7)  # 12.6 MB: the caching allocator would page-lock 16 MiB
    host = pinned.pinned_copy(source, device)
    assert host.is_pinned() and torch.equal(host, source)
    assert pinned.pinned_bytes() - before == pinned.pinned_footprint(source.numel() * 4) < 13 * 2**20
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        on_gpu = host.to(device, non_blocking=True)
    stream.synchronize()
    assert torch.equal(on_gpu.cpu(), source)
    del host
    gc.collect()
    assert pinned.pinned_bytes() == before  # unregistered and unmapped, not cached


# ---------------------------------------------------------------------------------------------- finding 3
@needs_cuda
def test_gpu_trainer_whose_plan_uses_no_gpu_fails_before_loading(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy(max_memory={"cpu": "1GiB"}, no_split_module_classes=["Block"])
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)  # fmt: skip
    module = GPTModule()
    with pytest.raises(MisconfigurationException, match=r"puts no module on the Trainer's GPU\(s\) \[0\]"):
        trainer.predict(module, token_loader(), ckpt_path=str(ckpt))
    assert all(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------------------------------- finding 5
@needs_two_gpus
def test_budget_detection_creates_a_context_only_on_the_gpus_asked(tmp_path):
    out = run_and_list_contexts(
        """
        from lightning_bigmodel.planning.budget import get_max_memory
        result = sorted(key for key in get_max_memory(None, gpus=[1]) if isinstance(key, int))
        """,
        tmp_path,
    )
    assert out == {"result": [1], "contexts": [1]}


# ---------------------------------------------------------------------------------------------- finding 8
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_two_gpus
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="needs NCCL")
def test_replica_collectives_stay_on_the_bound_gpu_when_the_plan_moves_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "GROUP_RANK": 0,
                       "TORCHELASTIC_RUN_ID": "collectives", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": _free_port()}.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = ReplicatedBigModelStrategy(devices_per_replica=2, device_map={"model": 1}, gather="none")
    trainer = pl.Trainer(accelerator="gpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert dist.get_backend() == "nccl"
    assert strategy.root_device == torch.device("cuda", 1) and strategy._collective_device == torch.device("cuda", 0)
    strategy.barrier()
    assert strategy.broadcast({"a": 1}) == {"a": 1}
    reduced = strategy.reduce(torch.ones(2, device="cuda:1"), reduce_op="sum")
    assert reduced.device == torch.device("cuda", 1) and reduced.tolist() == [1.0, 1.0]
    assert_same(outputs, reference_outputs(), atol=gpu_tolerance(torch.float32)["atol"])  # GPU vs CPU kernels
