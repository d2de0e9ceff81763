"""ReplicatedBigModelStrategy without processes or CUDA: simulated torchrun/SLURM ranks, GPU groups, data shares."""

from __future__ import annotations

import os
from collections import namedtuple

import lightning.fabric.accelerators.cuda as fabric_cuda
import lightning.pytorch as pl
import lightning.pytorch.accelerators.cuda as pl_cuda
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch.utils.data import DataLoader, TensorDataset

import lightning_bigmodel.pl.replicas as replicas
from examples.gpt import GPT, GPTConfig
from lightning_models import (
    GPTModule,
    bigmodel_trainer,
    plain_gpt,
    reference_outputs,
    token_loader,
    tokens,
    write_bare_checkpoint,
)
from lightning_bigmodel import DeviceMapCallback, init_empty_weights
from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy, merge_by_index, rebatch, unbatch

NODES, DEVICES_PER_NODE, K = 2, 4, 2  # 2 nodes x 2 replicas of 2 GPUs = 8 GPUs, 4 replica processes
WORLD = NODES * DEVICES_PER_NODE // K


@pytest.fixture(autouse=True)
def _restore_env_and_ranks():
    env, ranks = dict(os.environ), (rank_zero_only.rank, utils_rank_zero_only.rank)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    rank_zero_only.rank, utils_rank_zero_only.rank = ranks


@pytest.fixture
def fake_gpus(monkeypatch):
    """Lightning sees 4 CUDA devices per node; nothing asks the CUDA driver."""
    for module in (fabric_cuda, pl_cuda):
        monkeypatch.setattr(module, "num_cuda_devices", lambda: DEVICES_PER_NODE)


def simulate(monkeypatch, launcher: str, rank: int) -> None:
    """The environment torchrun (or srun) gives global rank ``rank`` of the 2 x 2 replica job."""
    local, node = rank % (WORLD // NODES), rank // (WORLD // NODES)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_", "LOCAL_RANK", "GROUP_RANK"))]:
        monkeypatch.delenv(key)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    if launcher == "torchrun":
        env = {"WORLD_SIZE": WORLD, "RANK": rank, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": WORLD // NODES,
               "GROUP_RANK": node, "TORCHELASTIC_RUN_ID": "replicas-test"}  # fmt: skip
    else:
        env = {"SLURM_NTASKS": WORLD, "SLURM_PROCID": rank, "SLURM_LOCALID": local, "SLURM_NODEID": node,
               "SLURM_NTASKS_PER_NODE": WORLD // NODES, "SLURM_NNODES": NODES, "SLURM_JOB_NAME": "replicas",
               "SLURM_NODELIST": "node[0-1]", "SLURM_JOB_ID": "1234"}  # fmt: skip
    for key, value in {**common, **env}.items():
        monkeypatch.setenv(key, str(value))


@pytest.fixture
def cuda_calls(monkeypatch):
    """Records every call that would initialise CUDA or pick a GPU. ``torch.cuda.is_initialized()`` cannot tell on a
    GPU machine, where an earlier test of the session may have initialised CUDA already; these spies can."""
    calls = []
    for name in ("_lazy_init", "init", "set_device", "current_device", "mem_get_info", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _name=name, **k: calls.append(_name))
    return calls


def gpu_trainer(strategy: ReplicatedBigModelStrategy) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu", devices=DEVICES_PER_NODE, num_nodes=NODES, strategy=strategy, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
@pytest.mark.parametrize("rank", range(WORLD))
def test_each_rank_owns_its_gpu_group(monkeypatch, fake_gpus, cuda_calls, launcher, rank):
    was_initialized = torch.cuda.is_initialized()
    simulate(monkeypatch, launcher, rank)
    strategy = ReplicatedBigModelStrategy(devices_per_replica=K)
    trainer = gpu_trainer(strategy)
    env_cls = TorchElasticEnvironment if launcher == "torchrun" else SLURMEnvironment
    assert isinstance(strategy.cluster_environment, env_cls)
    local = rank % 2
    owned = [torch.device("cuda", K * local + i) for i in range(K)]
    assert strategy.node_devices == [torch.device("cuda", i) for i in range(DEVICES_PER_NODE)]
    assert strategy.parallel_devices == owned and strategy.owned_gpus() == [K * local, K * local + 1]
    assert strategy.root_device == owned[0]
    assert (strategy.global_rank, strategy.local_rank, strategy.node_rank) == (rank, local, rank // 2)
    assert strategy.world_size == trainer.world_size == WORLD == strategy.num_replicas
    assert strategy.num_processes == 2 and trainer.is_global_zero == (rank == 0)
    assert strategy.distributed_sampler_kwargs == {"num_replicas": WORLD, "rank": rank}
    launcher_ = strategy.launcher
    assert isinstance(launcher_, _SubprocessScriptLauncher)
    assert (launcher_.num_processes, launcher_.num_nodes) == (2, NODES)
    strategy.cluster_environment.validate_settings(launcher_.num_processes, launcher_.num_nodes)  # torchrun/srun agree
    assert cuda_calls == []  # building the Trainer touched no GPU
    assert was_initialized or not torch.cuda.is_initialized()


@pytest.mark.parametrize(("launcher", "fix"), [("torchrun", "--nproc_per_node=2"), ("slurm", "--ntasks-per-node=2")])
def test_one_process_per_gpu_is_refused(monkeypatch, fake_gpus, launcher, fix):
    simulate(monkeypatch, launcher, 0)
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.setenv(key, str(NODES * DEVICES_PER_NODE))  # started one process per GPU
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.setenv(key, str(DEVICES_PER_NODE))
    with pytest.raises(ValueError, match=rf"4 processes per node were started.*2 per node.*{fix}"):
        gpu_trainer(ReplicatedBigModelStrategy(devices_per_replica=K))


def test_memory_detection_queries_only_owned_gpus(monkeypatch, fake_gpus):
    simulate(monkeypatch, "torchrun", 3)  # node 1, local replica 1: GPUs 2 and 3
    queried = []

    def mem_get_info(index):
        queried.append(index)
        return 10 * 2**30 + index, 20 * 2**30  # free, total: headroom is 10% of total = 2 GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(replicas, "_available_cpu_memory", lambda: 1000)
    strategy = ReplicatedBigModelStrategy(devices_per_replica=K)
    gpu_trainer(strategy)
    budget = strategy.replica_budget(None)
    assert queried == [2, 3]
    assert budget == {2: 8 * 2**30 + 2, 3: 8 * 2**30 + 3, "cpu": 500}  # RAM shared by the node's 2 replicas

    # The planner itself gets this absolute budget and places GPU modules on GPUs 2 and 3 only.
    callback = DeviceMapCallback(no_split_module_classes=["Block"])
    strategy._restrict_callback(callback)
    queried.clear()
    with init_empty_weights():
        model = GPT(GPTConfig.preset("tiny"))
    plan = callback.plan(model, strategy)
    assert queried == []  # planning never detected memory again
    assert {d for d in plan.values() if isinstance(d, int)} <= {2, 3}


def test_budgets_and_maps_are_positions_within_the_replica(monkeypatch, fake_gpus):
    simulate(monkeypatch, "torchrun", 1)  # local replica 1 of node 0: GPUs 2 and 3
    strategy = ReplicatedBigModelStrategy(devices_per_replica=K)
    gpu_trainer(strategy)
    assert strategy.replica_budget({0: "1GiB", "1": 2**31, "cpu": "3GB"}) == {2: 2**30, 3: 2**31, "cpu": 3 * 10**9}
    with pytest.raises(ValueError, match=r"positions 0\.\.1 within the replica .*\[2, 3\]"):
        strategy.replica_budget({2: "1GiB"})

    callback = DeviceMapCallback(device_map={"model.a": 0, "model.b": "cuda:1", "model.c": "disk"}, max_memory={0: 10})
    strategy._restrict_callback(callback)
    strategy._restrict_callback(callback)  # a second predict must not shift the indices again
    assert callback.requested_map == {"model.a": 2, "model.b": 3, "model.c": "disk"}
    assert callback.max_memory == {2: 10}


@pytest.mark.parametrize(("devices", "k"), [(3, 2), (4, 3), (2, 4)])
def test_devices_must_split_into_whole_replicas(devices, k):
    with pytest.raises(ValueError, match=rf"`Trainer\(devices={devices}\)`.*`devices_per_replica={k}`"):
        pl.Trainer(accelerator="cpu", devices=devices, strategy=ReplicatedBigModelStrategy(devices_per_replica=k))


@pytest.mark.parametrize("kwargs", [{"devices_per_replica": 0}, {"devices_per_replica": 1.5}, {"gather": "all"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ReplicatedBigModelStrategy(**kwargs)


def test_registered_by_name(tmp_path):
    assert "bigmodel_replicas" in StrategyRegistry
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="bigmodel_replicas", default_root_dir=tmp_path)
    assert isinstance(trainer.strategy, ReplicatedBigModelStrategy)
    assert trainer.strategy.num_processes == 2 and trainer.strategy.parallel_devices == [torch.device("cpu")]


def predict_fn(x: torch.Tensor) -> dict:
    return {"y": x * 2 + 1, "norm": x.norm(dim=1)}


@pytest.mark.parametrize("num_samples", [11, 12, 4])
def test_data_share_exactly_once_and_order_restored(monkeypatch, fake_gpus, num_samples):
    """Each rank's predict loader (built by Lightning from `distributed_sampler_kwargs`) and the gather. Fewer samples
    than replicas is refused before loading: see `test_replicas_integration.py` (two real processes)."""
    data = torch.randn(num_samples, 3, generator=torch.Generator().manual_seed(0))
    batch_size, seen, parts = 2, [], []
    for rank in range(WORLD):
        simulate(monkeypatch, "torchrun", rank)
        trainer = gpu_trainer(ReplicatedBigModelStrategy(devices_per_replica=K))
        loader = DataLoader(TensorDataset(data), batch_size=batch_size)
        loader = trainer._data_connector._prepare_dataloader(loader, shuffle=False, mode=RunningStage.PREDICTING)
        batches = [predict_fn(x) for (x,) in loader]
        indices = loader.batch_sampler.seen_batch_indices
        seen.append([i for batch in indices for i in batch])
        parts.extend(zip(indices, batches, strict=True))
    flat = sorted(i for rank_indices in seen for i in rank_indices)
    assert flat == list(range(num_samples))  # every sample exactly once, no padding
    assert all(len(s) in (num_samples // WORLD, num_samples // WORLD + 1) for s in seen)

    expected = [predict_fn(x) for (x,) in DataLoader(TensorDataset(data), batch_size=batch_size)]
    got = rebatch(merge_by_index(parts), batch_size)
    assert len(got) == len(expected) == -(-num_samples // batch_size)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_merge_drops_padding_duplicates():
    parts = [([0, 2], torch.tensor([0.0, 2.0])), ([1, 0], torch.tensor([1.0, 0.0]))]  # DistributedSampler padding
    assert torch.stack(merge_by_index(parts)).tolist() == [0.0, 1.0, 2.0]


Pair = namedtuple("Pair", "a b")


@pytest.mark.parametrize(
    "prediction",
    [
        torch.arange(6).view(3, 2),
        {"x": torch.arange(3), "y": [torch.zeros(3, 1), torch.ones(3)]},
        (torch.arange(3), torch.arange(6).view(3, 2)),
        Pair(torch.arange(3), torch.ones(3, 4)),
        ["a", "b", "c"],
    ],
)
def test_unbatch_then_rebatch_round_trips(prediction):
    samples = unbatch(prediction, 3)
    assert len(samples) == 3
    (again,) = rebatch(samples, 3)
    assert type(again) is type(prediction)
    if isinstance(prediction, list):
        assert again == prediction
    else:
        torch.testing.assert_close(again, prediction)


def test_unbatch_explains_unsplittable_predictions():
    with pytest.raises(ValueError, match=r"\(2, 5\) into 3 samples.*gather='none'"):
        unbatch(torch.zeros(2, 5), 3)


def test_rebatch_explains_ragged_samples():
    with pytest.raises(ValueError, match="cannot be stacked"):
        rebatch([torch.zeros(2), torch.zeros(3)], 2)


@pytest.mark.parametrize("gather", ["batches", "samples", "none"])
def test_one_replica_in_process_matches_plain_model(tmp_path, gather):
    """`devices=1`: a world of one (gloo), the gather path without peers; outputs of the plainly loaded model."""

    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = ReplicatedBigModelStrategy(gather=gather, max_memory={"cpu": 120_000}, offload_folder=tmp_path / "off",
                                          no_split_module_classes=["Block"])  # fmt: skip
    data = tokens(n=5, t=4)
    loader = token_loader(data, batch_size=2)
    trainer = bigmodel_trainer(strategy, default_root_dir=tmp_path)
    predictions = trainer.predict(GPTModule(), loader, ckpt_path=checkpoint)
    assert "disk" in strategy.plan.values() and strategy.offload_folder == tmp_path / "off" / "rank-0"
    expected = reference_outputs(data, batch_size=2)
    if gather == "samples":
        expected = [row for batch in expected for row in batch]
    assert len(predictions) == len(expected)
    for got, want in zip(predictions, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class TwoLoaderGPT(GPTModule):
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        return super().predict_step(batch, batch_idx)


def test_two_dataloaders_are_gathered_each(tmp_path):
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    first, second = tokens(n=3, t=4, seed=1), tokens(n=4, t=6, seed=2)
    loaders = [token_loader(first, batch_size=2), token_loader(second, batch_size=3)]
    trainer = bigmodel_trainer(ReplicatedBigModelStrategy(), default_root_dir=tmp_path)
    predictions = trainer.predict(TwoLoaderGPT(), loaders, ckpt_path=checkpoint)
    assert len(predictions) == 2
    for got, data, batch_size in zip(predictions, (first, second), (2, 3)):
        expected = reference_outputs(data, batch_size=batch_size)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
