"""ReplicatedBigModelStrategy: replicas of a dispatched model, each on its own group of GPUs, via Lightning's launchers.

``Trainer(accelerator="gpu", devices=8, num_nodes=2, strategy=ReplicatedBigModelStrategy(devices_per_replica=4))``
runs ``8 * 2 / 4 = 4`` processes, one per replica (not one per GPU). Local replica ``r`` of a node owns that node's
devices ``[r * k, ..., r * k + k - 1]`` (``k = devices_per_replica``), plans its device map over them only, and
predicts its share of the data. Processes are started by Lightning's own machinery: ``_SubprocessScriptLauncher``
(a plain ``python script.py``), ``torchrun --nproc_per_node=devices/k`` or SLURM ``--ntasks-per-node=devices/k``;
the process group comes from Lightning's helpers and the predict sampler from ``distributed_sampler_kwargs``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.data import has_iterable_dataset
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

import lightning.pytorch as pl
from lightning_bigmodel.pl.callback import DeviceMapCallback
from lightning_bigmodel.planning.device_map import normalize_device
from lightning_bigmodel.pl.gather import gather_predictions, merge_by_index, rebatch, unbatch  # noqa: F401 - re-exported
from lightning_bigmodel.planning.budget import _GPU_HEADROOM_FRACTION, _MIN_GPU_HEADROOM, _available_cpu_memory, get_max_memory
from lightning_bigmodel.pl.strategy import BigModelInferenceStrategy, Policy

Gather = Literal["batches", "samples", "none"]


def replica_devices(node_devices: Sequence[torch.device], k: int, local_rank: int) -> list[torch.device]:
    """The devices of local replica ``local_rank``, ``k`` per replica: ``node_devices[local_rank * k :][:k]``."""
    return list(node_devices[local_rank * k : local_rank * k + k])


def replica_max_memory(gpus: Sequence[int], replicas_on_node: int) -> dict[Union[int, str], int]:
    """Detected budget of one replica: free memory of ITS OWN ``gpus`` only (minus headroom) and its share of RAM.

    Only ``torch.cuda.mem_get_info(i)`` for ``i`` in ``gpus`` is called, so no other replica's GPU gets a CUDA
    context. RAM is shared by the replicas of a node: each gets ``available // replicas_on_node``.
    """
    budget: dict[Union[int, str], int] = {}
    for index in gpus:
        free, total = torch.cuda.mem_get_info(index)
        budget[index] = max(0, free - max(_MIN_GPU_HEADROOM, int(total * _GPU_HEADROOM_FRACTION)))
    budget["cpu"] = _available_cpu_memory() // max(1, replicas_on_node)
    return budget


def _owned(position: int, gpus: Sequence[int], what: str) -> int:
    if position >= len(gpus):
        raise ValueError(
            f"{what} names GPU {position}, but each replica has {len(gpus)} GPU(s): with replicas, GPU keys are "
            f"positions 0..{len(gpus) - 1} within the replica (this one owns GPUs {list(gpus)}). Renumber them."
        )
    return gpus[position]


class ReplicatedBigModelStrategy(BigModelInferenceStrategy, ParallelStrategy):
    """Data-parallel replicas of a big model: one process per replica, each dispatched over ``devices_per_replica``
    devices of its node (plus CPU RAM and disk), each predicting its share of the data.

    Args:
        devices_per_replica: devices (GPUs) per replica; the Trainer's ``devices`` must be a multiple of it.
        gather: what ``trainer.predict`` returns. ``"batches"``: rank 0 gets all predictions in dataset order,
            regrouped into the dataloader's batch size (as a one-process run; ``"samples"`` when shapes differ);
            ``"samples"``: rank 0 gets one entry per sample in dataset order; other ranks get ``[]`` with both.
            ``"none"``: each rank keeps its own (use with a prediction writer).
        process_group_backend: ``"nccl"``, ``"gloo"``, ...; default from the root device.
        timeout: timeout of the process group's collectives.
        device_map, max_memory, no_split_module_classes, offload_folder, offload_buffers, dtype, checkpoint,
        key_prefix, strict, release_on_teardown: as for :class:`BigModelInferenceStrategy`, per replica. GPU keys of
            ``max_memory`` and GPU values of an explicit ``device_map`` are positions ``0..k-1`` WITHIN the replica;
            ``"cpu"`` is the budget of one replica (default: available RAM divided among the node's replicas);
            weights are offloaded to ``offload_folder/rank-{global_rank}``.
    """

    strategy_name = "bigmodel_replicas"

    def __init__(
        self,
        devices_per_replica: int = 1,
        gather: Gather = "batches",
        device_map: Optional[Union[Policy, dict[str, Union[int, str]]]] = None,
        max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None,
        no_split_module_classes: Optional[list[str]] = None,
        offload_folder: Optional[Union[str, Path]] = None,
        offload_buffers: Optional[bool] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        key_prefix: Optional[str] = None,
        strict: bool = True,
        release_on_teardown: bool = False,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        if isinstance(devices_per_replica, bool) or not isinstance(devices_per_replica, int) or devices_per_replica < 1:
            raise ValueError(f"`devices_per_replica={devices_per_replica!r}` must be a positive int, e.g. 1, 2 or 4.")
        if gather not in ("batches", "samples", "none"):
            raise ValueError(f"`gather={gather!r}` must be 'batches', 'samples' or 'none'.")
        self.devices_per_replica = devices_per_replica
        self._node_devices: Optional[list[torch.device]] = None
        super().__init__(device_map=device_map, max_memory=max_memory, no_split_module_classes=no_split_module_classes,
                         offload_folder=offload_folder, offload_buffers=offload_buffers, dtype=dtype,
                         checkpoint=checkpoint, key_prefix=key_prefix, strict=strict,
                         release_on_teardown=release_on_teardown, **kwargs)  # fmt: skip
        self.gather = gather
        self.offload_root = offload_folder
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._gather_group: Optional[Any] = None
        self._collective_device: Optional[torch.device] = None  # the GPU the process group is bound to
        self._translated: dict[int, tuple] = {}  # id(callback) -> its (max_memory, device_map) as given

    # ------------------------------------------------------------------ devices: one process per replica
    @property
    def node_devices(self) -> list[torch.device]:
        """All devices this node gives the Trainer (``devices=``): the replicas of the node share them out."""
        return list(self._node_devices or [])

    @property
    def parallel_devices(self) -> Optional[list[torch.device]]:
        """The devices of THIS process's replica (``devices_per_replica`` of them); ``None`` until the Trainer sets."""
        if self._node_devices is None:
            return None
        return replica_devices(self._node_devices, self.devices_per_replica, self.local_rank)

    @parallel_devices.setter
    def parallel_devices(self, devices: Optional[list[torch.device]]) -> None:
        self._node_devices = list(devices) if devices is not None else None

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        """Replicas (processes) per node: ``devices // devices_per_replica``."""
        return len(self.node_devices) // self.devices_per_replica

    @property
    def num_replicas(self) -> int:
        return self.num_nodes * self.num_processes

    @property
    def is_distributed(self) -> bool:
        return True  # Lightning injects its unrepeated DistributedSampler into predict dataloaders

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.num_replicas, "rank": self.global_rank}

    def check_launch(self) -> None:
        """Raise when the node's devices do not split into whole replicas, or torchrun/srun started other counts."""
        n, k = len(self.node_devices), self.devices_per_replica
        if n % k:
            fits = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"`Trainer(devices={n})` per node cannot be split into replicas of `devices_per_replica={k}` "
                f"devices. Pass `devices` as a multiple of {k}, or `devices_per_replica` in {fits}."
            )
        env, per_node = self.cluster_environment, self.num_processes
        started = None
        if isinstance(env, TorchElasticEnvironment) and "LOCAL_WORLD_SIZE" in os.environ:
            started, fix = int(os.environ["LOCAL_WORLD_SIZE"]), f"`torchrun --nproc_per_node={per_node}`"
        elif isinstance(env, SLURMEnvironment) and "SLURM_NTASKS_PER_NODE" in os.environ:
            started, fix = int(os.environ["SLURM_NTASKS_PER_NODE"]), f"`--ntasks-per-node={per_node}`"
        if started is not None and started != per_node:
            raise ValueError(
                f"{started} processes per node were started, but `devices={n}` with `devices_per_replica={k}` runs "
                f"one process per replica: {per_node} per node. Launch with {fix} (keep all {n} GPUs per node)."
            )

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self.check_launch()
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    # ------------------------------------------------------------------ ranks and collectives (as DDPStrategy)
    global_rank = ParallelStrategy.global_rank
    local_rank = ParallelStrategy.local_rank
    node_rank = ParallelStrategy.node_rank
    world_size = ParallelStrategy.world_size
    is_global_zero = ParallelStrategy.is_global_zero

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        if self._process_group_backend is None:
            self._process_group_backend = _get_default_process_group_backend_for_device(self.root_device)
        device_id = self.root_device if self.root_device.type != "cpu" else None
        # `setup` may later move `root_device` to the lowest GPU the plan uses; collectives stay on this one.
        self._collective_device = device_id
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout,
                              device_id=device_id)  # fmt: skip

    def _nccl_device(self) -> Optional[torch.device]:
        """The GPU the NCCL process group is bound to (its first owned GPU), or ``None`` for another backend."""
        if self._collective_device is None or dist.get_backend() != "nccl":
            return None
        return self._collective_device

    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op: Any = "mean") -> Any:
        if not isinstance(tensor, Tensor):
            return tensor
        device = self._nccl_device() if _distributed_is_initialized() else None
        if device is None or tensor.device == device:
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return _sync_ddp_if_available(tensor.to(device), group, reduce_op=reduce_op).to(tensor.device)

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        device = self._nccl_device() if _distributed_is_initialized() else None
        if device is None or tensor.device == device:
            return ParallelStrategy.all_gather(self, tensor, group=group, sync_grads=sync_grads)
        gathered = ParallelStrategy.all_gather(self, tensor.to(device), group=group, sync_grads=sync_grads)
        return gathered.to(tensor.device)

    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        device = self._nccl_device()
        if device is not None:
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src, device=self._nccl_device())
        return holder[0]

    # ------------------------------------------------------------------ setup: plan over this replica's devices
    def setup(self, trainer: "pl.Trainer") -> None:
        """Point the offload folder and the planner at this replica's devices, then set up as one big model."""
        self._refuse_fewer_samples_than_replicas(trainer)  # before anything is planned or loaded
        if self.offload_root is not None:
            self.offload_folder = Path(self.offload_root) / f"rank-{self.global_rank}"
        self._restrict_callback(self._device_map_callback(trainer))
        super().setup(trainer)

    def _refuse_fewer_samples_than_replicas(self, trainer: "pl.Trainer") -> None:
        """Raise, on every rank alike, when a predict dataset has fewer samples than there are replicas.

        Lightning's predict sampler needs one sample per rank at least (an ``AssertionError`` deep inside it, after
        the model is loaded). The loaders are asked for here, in ``setup`` (after the setup hooks, before the weights
        are read), through the predict loop's data source (Lightning 2.6's private ``_data_source``).
        """
        source = getattr(trainer.predict_loop, "_data_source", None)
        if trainer.state.fn != TrainerFn.PREDICTING or source is None or not source.is_defined():
            return
        loaders = source.dataloader()
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        for position, loader in enumerate(loaders):
            dataset = getattr(loader, "dataset", None)
            if dataset is None or has_iterable_dataset(loader) or not hasattr(dataset, "__len__"):
                continue
            if 0 < len(dataset) < self.num_replicas:
                raise ValueError(
                    f"Predict dataloader {position} has {len(dataset)} sample(s) for {self.num_replicas} replicas: "
                    f"each replica needs one sample at least. Run at most {len(dataset)} replica(s) (fewer "
                    "`Trainer(devices=...)`, or a larger `devices_per_replica`), or use `BigModelInferenceStrategy` "
                    "in one process for so little data."
                )

    def owned_gpus(self) -> list[int]:
        """Indices of the CUDA devices of this replica (empty on the CPU accelerator)."""
        return [d.index or 0 for d in self.parallel_devices or [] if d.type == "cuda"]

    def replica_budget(self, max_memory: Optional[Mapping[Union[int, str], Union[int, str]]]) -> dict:
        """The absolute budget of this replica: ``max_memory`` with GPU positions mapped to owned GPUs, or detected."""
        gpus = self.owned_gpus()
        if max_memory is None:
            return replica_max_memory(gpus, self.num_processes)
        budget = get_max_memory(max_memory)
        if not gpus:
            return budget  # the planner explains GPU keys on a CPU Trainer
        return {(_owned(k, gpus, "`max_memory`") if isinstance(k, int) else k): v for k, v in budget.items()}

    def _restrict_callback(self, callback: DeviceMapCallback) -> None:
        """Give the planner this replica's absolute budget and map (the callback itself never detects all GPUs)."""
        given = (callback.max_memory, callback.requested_map)
        max_memory, requested = self._translated.setdefault(id(callback), given)
        callback.max_memory = self.replica_budget(max_memory)
        gpus = self.owned_gpus()
        if isinstance(requested, Mapping) and gpus:
            devices = {name: normalize_device(value) for name, value in requested.items()}
            requested = {n: _owned(d, gpus, "`device_map`") if isinstance(d, int) else d for n, d in devices.items()}
        callback.requested_map = requested

    # ------------------------------------------------------------------ data and predictions
    def process_dataloader(self, dataloader: object) -> object:
        if has_iterable_dataset(dataloader):
            rank_zero_warn(
                "`ReplicatedBigModelStrategy`: an IterableDataset is not split among replicas, so every replica "
                "predicts all of it. Shard it by `trainer.global_rank` / `trainer.world_size` in the dataset."
            )
        return dataloader

    def on_predict_end(self) -> None:
        """With ``gather`` set, replace the returned predictions: all on rank 0 in dataset order, ``[]`` elsewhere."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.gather == "none" or trainer is None or not trainer.predict_loop.return_predictions:
            return
        loaders = trainer.predict_dataloaders
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        results = trainer.predict_loop.predictions
        per_loader = results if len(loaders) > 1 else [results]
        seen = [getattr(getattr(dl, "batch_sampler", None), "seen_batch_indices", None) for dl in loaders]
        if any(indices is None for indices in seen):
            rank_zero_warn("`ReplicatedBigModelStrategy`: no batch indices (not a DataLoader); not gathering.")
            return
        for preds, indices, loader in zip(per_loader, seen, loaders):
            # Lightning re-wraps predict loaders (``batch_size=1`` + an index-recording batch sampler): ask the sampler
            batch_size = getattr(loader.batch_sampler, "batch_size", None) if self.gather == "batches" else None
            merged = gather_predictions(preds, indices[: len(preds)], dst=0, group=self._object_group())
            if merged is not None and batch_size:
                try:
                    merged = rebatch(merged, batch_size)
                except ValueError as err:
                    rank_zero_warn(f"`ReplicatedBigModelStrategy(gather='batches')`: {err}; returning samples.")
            preds[:] = merged if merged is not None else []

    def _object_group(self) -> Optional[Any]:
        """A gloo group for pickled objects when the world runs NCCL (keeps predictions off the GPUs)."""
        if not _distributed_is_initialized() or dist.get_backend() == "gloo":
            return None
        if self._gather_group is None:
            self._gather_group = dist.new_group(backend="gloo")
        return self._gather_group

    def teardown(self) -> None:
        """As :class:`BigModelInferenceStrategy` (never ``.cpu()``), then the cluster environment's teardown."""
        super().teardown()
        if self._gather_group is not None and _distributed_is_initialized():
            dist.destroy_process_group(self._gather_group)
        self._gather_group = None
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name, cls,
                description="Big-model inference replicas: one process per group of `devices_per_replica` devices",
            )  # fmt: skip


ReplicatedBigModelStrategy.register_strategies(StrategyRegistry)
