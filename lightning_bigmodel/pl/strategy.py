"""BigModelInferenceStrategy: ``Trainer.predict`` over a model built on meta, planned over GPUs/CPU/disk, streamed in.

Call flow (Lightning 2.6): ``configure_model`` runs inside :meth:`tensor_init_context` (parameters on meta); with
``restore_checkpoint_after_setup`` :meth:`setup` plans before the checkpoint; ``load_checkpoint`` opens it lazily
(:class:`~lightning_bigmodel.pl.io.ShardedCheckpointIO`); :meth:`load_model_state_dict` streams every tensor to its
device and dispatches (:func:`~lightning_bigmodel.pl.loader.load_into`); without ``ckpt_path`` the strategy's own
``checkpoint`` is loaded when predict starts.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Generator, Mapping, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

import lightning.pytorch as pl
from lightning_bigmodel.pl.callback import (
    PLANNING_DEFAULTS,
    planning_attributes,
    DeviceMapCallback,
    _canonical,
    check_trainer_devices,
    parse_dtype,
)
from lightning_bigmodel.planning.device_map import Policy, execution_device, normalize_device
from lightning_bigmodel.planning.devices import planned_copy, prefetch_depth_of
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.integrations.quantization.spec import Quantization, resolve_quantization
from lightning_bigmodel.pl.io import ShardedCheckpointIO
from lightning_bigmodel.pl.loader import (
    dispatched_plan,
    is_dispatched,
    load_into,
    main_device_of,
    prefetchers,
    release,
    return_outputs,
)


class BigModelInferenceStrategy(Strategy):
    """Inference over a model larger than one device: meta init, a device map over the Trainer's GPUs, CPU RAM and
    disk, the checkpoint streamed tensor by tensor to its place, and hooks that move weights and activations.

    Args:
        device_map: a policy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or an explicit
            ``{module_name: gpu_index | "cpu" | "disk"}`` (names as in the LightningModule, e.g. ``"model.h.0"``).
            Default ``"auto"``. The planning settings (``device_map``, ``max_memory``, ``no_split_module_classes``,
            ``offload_buffers``, ``dtype``) may instead be given to a ``DeviceMapCallback``; giving one to both with
            different values raises ``ValueError`` before anything is planned.
        max_memory: budget per device, e.g. ``{0: "10GiB", "cpu": "30GB"}``; ``None`` detects free memory.
        no_split_module_classes: class names kept whole on one device (residual blocks, e.g. ``["Block"]``).
        offload_folder: where ``"disk"`` weights are written when they cannot be read in place from the checkpoint.
        offload_buffers: offload the buffers of offloaded modules too.
        dtype: dtype of floating-point weights (``torch.bfloat16`` or ``"bfloat16"``); default: the model's, after
            the Trainer's ``precision``.
        checkpoint: path or Hub id loaded when ``predict`` gets no ``ckpt_path``.
        quantization: ``"int8"`` (CPU and GPU) or ``"int4"`` (GPU only) quantizes ``nn.Linear`` weights while they
            stream in (torchao, weight-only; ``pip install "lightning-bigmodel[quantization]"``); the plan sizes them
            quantized and they stay quantized on GPUs, CPU and disk.
        quantization_skip_modules: modules whose ``nn.Linear`` weights stay in the compute dtype (default
            ``["lm_head"]``; a list given replaces it).
        key_prefix: prepended to checkpoint keys to name model keys (``"model."``); ``None`` detects it.
        strict: raise when keys are missing or unexpected (the module's ``strict_loading=False`` also relaxes it).
        release_on_teardown: at the end of each ``predict`` remove the hooks and free the weights (parameters go
            back to meta; the next ``predict`` streams the checkpoint again). By default the model stays dispatched
            (see Teardown below).
        input_shape: the shape of a batch of token ids (``"4x2048"``): plan so that every device's simulated peak
            (activations, KV cache, staging of offloaded layers) fits its budget, and report it in ``device_map.json``.
        max_new_tokens: decode steps of ``generate`` to plan for (with ``input_shape``).
        prefetch: offloaded layers the execution GPU holds at once: ``"auto"`` (default) two (compute one, prefetch
            the next) where their room costs the GPUs nothing, else one (fetch, compute, free); ``True`` two, failing
            before loading when they do not fit; ``False`` one. The plan's choice is in the device-map table.
        offload_execution: where offloaded layers compute: ``"auto"`` (default) on the plan's lowest GPU unless its
            room for them would leave a GPU without modules, then on the CPU ("cpu" entries in place, "disk" ones
            streamed; logged with the budget that would keep them on the GPU); ``"gpu"``; ``"cpu"``. With an explicit
            ``device_map``, ``"auto"`` is the lowest GPU (or what a plan read back from ``device_map.json`` records).
        verify: check the first ``predict_step`` against a CPU reference computed module by module from the
            checkpoint (each no-split block streamed in turn, never the whole model in RAM); the first module whose
            outputs diverge beyond its dtype's tolerance stops the job, naming it and its device. Costs one extra CPU
            forward of one batch. Not with ``quantization``.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: as for Lightning
            strategies (the Trainer fills them in). ``checkpoint_io`` defaults to ``ShardedCheckpointIO()``.

    Teardown:
        Never calls ``.cpu()`` (the base class does; a dispatched model refuses it). It always closes the checkpoint
        files opened for loading (``checkpoint_io.teardown()``). By default (``release_on_teardown=False``) the model
        stays dispatched: hooks, GPU weights, pinned RAM and the memory-mapped disk weights stay in place, so a
        second ``predict`` (with the same or no ``ckpt_path``) reuses them instead of streaming the checkpoint
        again; this is what a batch job predicting several dataloaders wants. Call
        :func:`lightning_bigmodel.pl.loader.release` (or pass ``release_on_teardown=True``) to free them.

    Outputs and prefetch:
        ``predict_step`` usually calls the network child (``self.model(...)``), not the LightningModule's forward.
        The strategy therefore (1) moves predictions left on another GPU of the map to ``root_device`` (what a
        one-device run returns; CPU tensors are left alone), and (2) fixes the prefetch order learned during the
        first step, whether or not the dispatched root's forward ran.
    """

    strategy_name = "bigmodel"

    def __init__(
        self,
        device_map: Optional[Union[Policy, dict[str, Union[int, str]]]] = None,
        max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None,
        no_split_module_classes: Optional[list[str]] = None,
        offload_folder: Optional[Union[str, Path]] = None,
        offload_buffers: Optional[bool] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        checkpoint: Optional[Union[str, Path]] = None,
        quantization: Optional[Quantization] = None,
        quantization_skip_modules: Optional[list[str]] = None,
        key_prefix: Optional[str] = None,
        strict: bool = True,
        release_on_teardown: bool = False,
        input_shape: Optional[Union[str, list[int]]] = None,
        max_new_tokens: Optional[int] = None,
        prefetch: Optional[Union[bool, str]] = None,
        offload_execution: Optional[str] = None,
        verify: bool = False,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
    ) -> None:
        super().__init__(accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        if isinstance(device_map, Mapping):  # a plan read back from device_map.json keeps its facts (execution device)
            normalized = {key: normalize_device(value) for key, value in device_map.items()}
            device_map = normalized if prefetch_depth_of(device_map) is None else planned_copy(device_map, normalized)
        given = {
            "device_map": device_map,
            "max_memory": max_memory,
            "no_split_module_classes": None if no_split_module_classes is None else list(no_split_module_classes),
            "dtype": parse_dtype(dtype),
            "offload_buffers": offload_buffers,
            "input_shape": None if input_shape is None else _canonical("input_shape", input_shape),
            "max_new_tokens": max_new_tokens,
            "prefetch": None if prefetch is None else _canonical("prefetch", prefetch),
            "offload_execution": None if offload_execution is None else _canonical("offload_execution",
                                                                                   offload_execution),
        }
        self.given_settings = {name: value for name, value in given.items() if value is not None}
        self._use_settings(PLANNING_DEFAULTS | self.given_settings)
        self.offload_folder = offload_folder
        self.checkpoint = checkpoint
        resolve_quantization(quantization, quantization_skip_modules)  # a bad name fails here, before any work
        self.quantization = quantization
        self.quantization_skip_modules = quantization_skip_modules
        if verify and quantization is not None:
            raise ValueError(
                "`verify=True` compares with the checkpoint's float weights, which quantized outputs differ from by "
                "design: drop `quantization` to verify the dispatch, or `verify` to quantize."
            )
        self.verify = verify
        self._verified = False  # verify runs on the first predict_step of the strategy's life
        self.key_prefix = key_prefix
        self.strict = strict
        self.release_on_teardown = release_on_teardown
        self.parallel_devices = parallel_devices
        self.cluster_environment = cluster_environment
        self.plan: Optional[dict[str, Union[int, str]]] = None  # the device map of the current model
        self.loaded_from: Optional[str] = None  # the checkpoint the current model holds
        self._root_device: Optional[torch.device] = None
        self._offload_device: Optional[torch.device] = None  # where offloaded entries compute (the plan's)
        self._prefetchers: Optional[list] = None  # of the dispatched model, found after loading (None: look again)
        self.prefetch_depth: Optional[int] = None  # the plan's (see DeviceMapCallback.prefetch_depth)

    # ------------------------------------------------------------------ single-process plumbing
    @property
    def checkpoint_io(self) -> CheckpointIO:
        if self._checkpoint_io is None:
            self._checkpoint_io = ShardedCheckpointIO()
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    @property
    def root_device(self) -> torch.device:
        if self._root_device is not None:
            return self._root_device
        return self.parallel_devices[0] if self.parallel_devices else torch.device("cpu")

    global_rank = 0
    local_rank = 0
    node_rank = 0
    world_size = 1

    @property
    def is_global_zero(self) -> bool:
        return True

    def reduce(self, tensor: Union[Tensor, Any], *args: Any, **kwargs: Any) -> Union[Tensor, Any]:
        return tensor

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        return tensor

    def barrier(self, name: Optional[str] = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def model_to_device(self) -> None:
        """Nothing to do: each tensor is placed on its planned device while the checkpoint streams in."""

    @contextmanager
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        """Parameters are created on meta (buffers stay real) in the precision's dtype, whatever ``empty_init``."""
        with ExitStack() as stack:
            stack.enter_context(init_empty_weights(include_buffers=False))
            stack.enter_context(self.precision_plugin.tensor_init_context())
            yield

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False

    # ------------------------------------------------------------------ setup: plan before the checkpoint
    def setup(self, trainer: "pl.Trainer") -> None:
        """Convert precision on the meta model, plan the device map and set ``root_device`` to its main device."""
        if trainer.state.fn == TrainerFn.FITTING:
            raise MisconfigurationException(
                "`BigModelInferenceStrategy` is inference-only: `Trainer.fit` is not supported. Use "
                "`trainer.predict(...)` (or `validate`/`test`), or another strategy for training."
            )
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._prefetchers = None
        main_device, budget = None, None
        if is_dispatched(module):
            rank_zero_info("`BigModelInferenceStrategy`: the model is already dispatched; reusing its device map.")
            self.plan = dispatched_plan(module) or dict(self.plan or {})
            main_device = main_device_of(module)
        else:
            callback = self._device_map_callback(trainer)  # settles the settings (dtype included) first
            self.model = self.precision_plugin.convert_module(self.model)
            if self.dtype is not None:
                module.to(dtype=self.dtype)  # meta parameters and real floating-point buffers; ints stay
            self.plan = callback.plan(module, self)
            self.prefetch_depth = callback.prefetch_depth  # the plan's: the dispatched hooks follow it
            budget = callback.max_memory_bytes
            self.loaded_from = None
        check_trainer_devices(self.plan, self, budget)  # before anything is loaded
        if main_device is None:  # the plan's execution device (a GPU, or the CPU for a plan keeping no room on a GPU)
            main_device = execution_device(self.plan) if self.plan else torch.device("cpu")
        self._offload_device = main_device  # where the dispatched "cpu"/"disk" entries compute
        gpus = sorted(device for device in self.plan.values() if isinstance(device, int)) if self.plan else []
        if main_device.type == "cpu" and gpus:  # CPU execution on a GPU Trainer: batches still start on a GPU
            main_device = execution_device(dict(self.plan))
        self._root_device = main_device
        self.accelerator.setup_device(self._lightning_device(main_device))
        self.setup_precision_plugin()

    def _lightning_device(self, device: torch.device) -> torch.device:
        """``device`` as Lightning's accelerator names it: its GPUs are ``parallel_devices``' type (``cuda`` for the
        ``"gpu"`` accelerator), the library's are the available accelerator's (the same type on real GPUs; ``simgpu``
        inside ``lightning_bigmodel.simulate.simulated_gpus``, where ``torch.cuda`` is stood in for)."""
        devices = self.parallel_devices or []
        if device.type == "cpu" or not devices or devices[0].type in ("cpu", device.type):
            return device
        return torch.device(devices[0].type, device.index)

    def _use_settings(self, settings: Mapping[str, Any]) -> None:
        vars(self).update(planning_attributes(settings))

    def _device_map_callback(self, trainer: "pl.Trainer") -> DeviceMapCallback:
        """The user's ``DeviceMapCallback`` (else a new one, added to the Trainer), with the planning settings of
        both merged: one source of truth, and a clear error when both set one differently."""
        callbacks = [callback for callback in trainer.callbacks if isinstance(callback, DeviceMapCallback)]
        if len(callbacks) > 1:
            raise MisconfigurationException(
                f"The Trainer has {len(callbacks)} `DeviceMapCallback`s; keep one (it plans and reports the map)."
            )
        if not callbacks:
            callbacks.append(DeviceMapCallback())
            trainer.callbacks.append(callbacks[0])
        self._use_settings(callbacks[0].reconcile(self, self.given_settings))
        return callbacks[0]

    # ------------------------------------------------------------------ loading
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Open ``checkpoint_path`` lazily through ``checkpoint_io`` (no tensor is read here)."""
        return self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Stream ``checkpoint["state_dict"]`` into the planned devices, check nothing stayed on meta, dispatch."""
        module = self.lightning_module
        assert module is not None
        state_dict = checkpoint["state_dict"]
        source = str(getattr(getattr(state_dict, "checkpoint", None), "root", "")) or "<in-memory state dict>"
        if is_dispatched(module):
            if self.loaded_from is not None and source == self.loaded_from:
                rank_zero_info(f"`BigModelInferenceStrategy`: weights from {source} are already loaded; reusing them.")
                return
            raise RuntimeError(
                f"The model is already dispatched with weights from {self.loaded_from or 'elsewhere'}; loading "
                f"{source!r} into it is not supported. Build a fresh LightningModule (or call "
                "`lightning_bigmodel.remove_dispatch(model)` and rebuild it) to predict with other weights."
            )
        assert self.plan is not None, "`setup` plans before any checkpoint is loaded"
        load_into(
            module,
            state_dict,
            self.plan,
            main_device=self._offload_device,
            dtype=self.dtype,
            offload_folder=self.offload_folder,
            offload_buffers=self.offload_buffers,
            strict=self.strict and strict,
            key_prefix=self.key_prefix,
            checkpoint_io=self.checkpoint_io,
            quantization=self.quantization,
            quantization_skip_modules=self.quantization_skip_modules,
            prefetch=self._prefetch(),
        )
        self.loaded_from = source

    def _ensure_loaded(self) -> None:
        """Without ``ckpt_path``: load ``checkpoint=``, or dispatch a model built with real weights, or explain."""
        module = self.lightning_module
        if module is None or is_dispatched(module):
            return
        if self.checkpoint is not None:
            rank_zero_info(f"`BigModelInferenceStrategy`: loading `checkpoint={str(self.checkpoint)!r}`.")
            loaded = self.load_checkpoint(self.checkpoint)
            self.load_model_state_dict(loaded, strict=module.strict_loading)
            return
        load_into(module, None, self.plan or {}, main_device=self._offload_device, offload_folder=self.offload_folder,
                  offload_buffers=self.offload_buffers, quantization=self.quantization,
                  prefetch=self._prefetch())  # fmt: skip

    def _prefetch(self) -> Optional[bool]:
        """Whether the dispatched hooks prefetch: the plan's depth (1: no), else ``None`` (dispatch decides)."""
        depth = getattr(self, "prefetch_depth", None)
        return None if depth is None or depth == 0 else depth == 2

    def on_predict_start(self) -> None:
        self._ensure_loaded()

    # ------------------------------------------------------------------ steps: independent of the root's forward
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's ``predict_step`` (the first one verified with ``verify=True``); then predictions left on
        another GPU go to ``root_device``."""
        if self.verify and not self._verified:
            from lightning_bigmodel.pl._verify_step import verified_step

            self._verified = True
            outputs = verified_step(self, super().predict_step, args, kwargs)
        else:
            outputs = super().predict_step(*args, **kwargs)
        self._end_step()
        return return_outputs(outputs, self.root_device)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().validation_step(*args, **kwargs)
        self._end_step()
        return outputs

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        outputs = super().test_step(*args, **kwargs)
        self._end_step()
        return outputs

    def _end_step(self) -> None:
        """After a step no forward runs: fix the prefetch order the step's forwards recorded (first step only)."""
        if self._prefetchers is None:
            module = self.lightning_module
            if module is None or not is_dispatched(module):
                return
            self._prefetchers = prefetchers(module)
        for prefetcher in self._prefetchers:
            if prefetcher.recording:
                prefetcher.finish_recording()

    def on_validation_start(self) -> None:
        self._ensure_loaded()

    def on_test_start(self) -> None:
        self._ensure_loaded()

    # ------------------------------------------------------------------ teardown: never `.cpu()`
    def teardown(self) -> None:
        """Close the checkpoint files opened for loading; with ``release_on_teardown`` also remove the hooks and
        free the weights. Never ``.cpu()`` (see the class docstring)."""
        module = self.lightning_module
        self._prefetchers = None
        if self.release_on_teardown and module is not None and is_dispatched(module):
            release(module)
            self.loaded_from = None
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(
                cls.strategy_name,
                cls,
                description="Big-model inference: meta init, device map over GPUs/CPU/disk, streamed checkpoints",
            )


BigModelInferenceStrategy.register_strategies(StrategyRegistry)
