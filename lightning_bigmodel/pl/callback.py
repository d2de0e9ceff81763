"""DeviceMapCallback: plans the device map before predict starts, prints it as a table, writes ``device_map.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_bigmodel.planning.device_map import (
    Policy,
    check_device_map,
    infer_device_map,
    largest_layer,
    normalize_device,
)
from lightning_bigmodel.planning.budget import budget_sources, check_layer_fits, get_max_memory
from lightning_bigmodel.planning.sizes import compute_buffer_sizes, compute_module_sizes
from lightning_bigmodel.planning._execution import check_offload_execution
from lightning_bigmodel.planning.devices import (
    activation_bytes_of,
    execution_device_of,
    planned_copy,
    prefetch_depth_of,
    stream_unit_of,
    with_execution,
)
from lightning_bigmodel.planning.table import bytes_per_device, device_label, format_bytes, prefetch_line, render_table
from lightning_bigmodel.fitting import note_unsized_activations
from lightning_bigmodel.pl._peaks import fitted_plan, simulated_memory

DeviceMapArg = Union[Policy, dict[str, Union[int, str]]]
JSON_NAME = "device_map.json"

# The planning settings a strategy and a DeviceMapCallback can both take, with what "not given anywhere" means.
PLANNING_DEFAULTS: dict[str, Any] = {
    "device_map": "auto",
    "max_memory": None,
    "no_split_module_classes": [],
    "dtype": None,
    "offload_buffers": False,
    "input_shape": None,  # a batch of token ids ("4x2048"): plan so that the simulated peak fits
    "max_new_tokens": 0,
    "prefetch": "auto",  # True: room for two offloaded layers on the GPU, False: one, "auto": two where they fit
    "offload_execution": "auto",  # where offloaded layers compute: "gpu", "cpu", "auto" (see infer_device_map)
}


def planning_attributes(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Merged planning settings as the attribute values a strategy and a callback keep (lists copied, flags made bool,
    counts int)."""
    return {
        **settings,
        "no_split_module_classes": list(settings["no_split_module_classes"] or []),
        "offload_buffers": bool(settings["offload_buffers"]),
        "max_new_tokens": int(settings["max_new_tokens"] or 0),
    }


def _canonical(name: str, value: Any) -> Any:
    """A comparable form of a planning setting: normalised devices and sizes, dtypes parsed, lists as sorted tuples."""
    if name == "device_map" and isinstance(value, Mapping):
        return {key: normalize_device(device) for key, device in value.items()}
    if name == "max_memory" and value is not None:
        return get_max_memory(value)
    if name == "no_split_module_classes":
        return tuple(sorted(value))
    if name == "dtype":
        return parse_dtype(value)
    if name == "prefetch" and value not in (True, False, "auto"):
        raise ValueError(f"`prefetch={value!r}` is not a prefetch setting; pass True, False or \"auto\".")
    if name == "offload_execution":
        check_offload_execution(value)
    if name == "input_shape" and value is not None:
        from lightning_bigmodel.simulate.memory import parse_input_shape  # lazy: fake tensors load on use only

        return parse_input_shape(value)
    return value


def parse_dtype(dtype: Optional[Union[str, torch.dtype]]) -> Optional[torch.dtype]:
    """``"bfloat16"``, ``"torch.float16"``, ``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype`` -> ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = str(dtype).strip().lower().removeprefix("torch.")
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(
            f"`dtype={dtype!r}` is not a floating-point torch dtype. Use e.g. 'bfloat16', 'float16' or 'float32'."
        )
    return value


def trainer_gpus(strategy: "pl.strategies.Strategy") -> list[int]:
    """GPU indices the Trainer runs on: the CUDA ``parallel_devices`` of ``strategy`` (empty for CPU)."""
    if not isinstance(strategy.accelerator, CUDAAccelerator):
        return []
    devices = getattr(strategy, "parallel_devices", None) or [strategy.root_device]
    return sorted({device.index or 0 for device in devices if device.type == "cuda"})


def check_trainer_devices(
    plan: Mapping[str, Union[int, str]],
    strategy: "pl.strategies.Strategy",
    budget: Optional[Mapping[Union[int, str], int]] = None,
) -> None:
    """Raise ``MisconfigurationException`` when ``plan`` uses GPUs the Trainer of ``strategy`` does not run on, or
    none of the GPUs a GPU Trainer runs on (``budget``, the plan's budget in bytes, is shown then)."""
    gpus_used = sorted({d for d in map(normalize_device, plan.values()) if isinstance(d, int)})
    allowed = trainer_gpus(strategy)
    if allowed and not gpus_used:
        shown = "" if budget is None else " (budget: " + ", ".join(
            f"{device_label(key)} {format_bytes(value)}" for key, value in budget.items()
        ) + ")"
        raise MisconfigurationException(
            f"The device map puts no module on the Trainer's GPU(s) {allowed}{shown}: every weight would stay on "
            "'cpu'/'disk' and compute on the CPU while the Trainer holds the GPU(s). Give the GPUs room (e.g. "
            "`max_memory={0: '20GiB', 'cpu': '60GiB'}`; a detected budget leaves a GPU nothing when its free memory "
            "is below the headroom), put modules on them in an explicit `device_map`, or run on the CPU with "
            "`Trainer(accelerator='cpu')`."
        )
    if gpus_used and not allowed:
        raise MisconfigurationException(
            f"The device map puts modules on GPU(s) {gpus_used}, but the Trainer runs on the "
            f"{type(strategy.accelerator).__name__} (which only accepts the CPU as root device). Pass "
            f"`Trainer(accelerator='gpu', devices={gpus_used})`, or a map that uses only 'cpu' and 'disk'."
        )
    outside = [gpu for gpu in gpus_used if gpu not in allowed]
    if outside:
        raise MisconfigurationException(
            f"The device map puts modules on GPU(s) {outside}, outside the Trainer's devices {allowed}. "
            "Pass `Trainer(devices=...)` covering every GPU of the map."
        )


class DeviceMapCallback(Callback):
    """Plans where every module of the model lives (GPUs of the Trainer, CPU, disk) and reports the plan.

    ``setup`` only records the callback (the model is not built yet); :class:`~lightning_bigmodel.BigModelInferenceStrategy`
    calls :meth:`plan` once the (meta) model exists. ``on_predict_start`` prints the table on rank zero and writes
    ``device_map.json`` (the map, bytes per device and the budget) into ``trainer.log_dir``.

    The planning arguments (``device_map`` to ``offload_buffers``) are usually given to the strategy alone; a
    callback created without them uses the strategy's (it then only reports). A setting given to both must have the
    same value: different values raise ``ValueError`` before anything is planned.

    Args:
        device_map: a policy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or an explicit
            ``{module_name: gpu_index | "cpu" | "disk"}``. Default: the strategy's, else ``"auto"``.
        max_memory: budget per device, e.g. ``{0: "10GiB", "cpu": "30GB"}``; ``None`` detects free memory. Only the
            Trainer's GPUs may be named.
        no_split_module_classes: class names whose instances stay whole on one device (e.g. ``["Block"]``).
        dtype: plan sizes as if floating-point weights were in this dtype.
        offload_buffers: count buffers of offloaded modules as offloaded too.
        save_json: write ``device_map.json``.
        input_shape: the shape of a batch of token ids (``"4x2048"``): the plan reserves room for the simulated
            activations, KV cache and staging of offloaded layers on every device (see ``infer_device_map``), and
            ``device_map.json`` carries the simulated weights and peak per device. Default: the strategy's, else none.
        max_new_tokens: decode steps of ``generate`` to plan for (with ``input_shape``).
        prefetch: offloaded layers the execution GPU holds at once: ``"auto"`` (default) two (compute one, prefetch the
            next) where their room does not cost the GPUs their modules, else one (fetch, compute, free); ``True`` two
            (an error before loading when they do not fit); ``False`` one. The plan's choice is in the table and
            ``device_map.json`` (``prefetch_depth``), and the dispatched model follows it.
        offload_execution: where offloaded layers compute: ``"auto"`` (default) on the plan's lowest GPU unless its room
            for them would leave a GPU without modules, then on the CPU; ``"gpu"``; ``"cpu"``. The plan's choice is in
            the table and ``device_map.json`` (``execution_device``), and the dispatched model follows it.

    Attributes:
        device_map: the plan (``None`` until planned).
        module_sizes: bytes per module prefix of the planned model.
        max_memory_bytes: the budget the plan was made under, in bytes.
        memory: with ``input_shape``, the simulated ``{device: {"weights", "peak"}}`` of the plan, else ``None``.
        budget_sources: where each budget came from (``"cgroup limit"``, ``"available RAM"``, ``"free memory"``,
            ``"max_memory"``), shown in the table.
        prefetch_depth: offloaded layers the execution GPU holds at once under the plan (2, 1, or 0 when no
            offloaded layer computes on a GPU; for an explicit map, what ``prefetch`` says, else ``None``).
        reserve: bytes the plan keeps free on the execution device for offloaded layers and buffers.
        execution_device: where the plan's offloaded layers compute: a GPU index, or ``"cpu"`` where room for them on a
            GPU would leave a GPU without modules (see :func:`~lightning_bigmodel.infer_device_map`); ``None`` for an
            explicit map (then the lowest GPU, as dispatch decides), unless it is a plan read back from a
            ``device_map.json`` (:func:`~lightning_bigmodel.planning.devices.planned_from_json`).
    """

    def __init__(
        self,
        device_map: Optional[DeviceMapArg] = None,
        max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None,
        no_split_module_classes: Optional[Sequence[str]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        offload_buffers: Optional[bool] = None,
        save_json: bool = True,
        input_shape: Optional[Union[str, Sequence[int]]] = None,
        max_new_tokens: Optional[int] = None,
        prefetch: Optional[Union[bool, str]] = None,
        offload_execution: Optional[str] = None,
    ) -> None:
        given = {
            "input_shape": None if input_shape is None else _canonical("input_shape", input_shape),
            "max_new_tokens": max_new_tokens,
            "device_map": device_map,
            "max_memory": max_memory,
            "no_split_module_classes": None if no_split_module_classes is None else list(no_split_module_classes),
            "dtype": parse_dtype(dtype),
            "offload_buffers": offload_buffers,
            "prefetch": None if prefetch is None else _canonical("prefetch", prefetch),
            "offload_execution": None if offload_execution is None else _canonical("offload_execution",
                                                                                   offload_execution),
        }
        self.given_settings = {name: value for name, value in given.items() if value is not None}
        self._apply_settings(PLANNING_DEFAULTS | self.given_settings)
        self.save_json = save_json
        self.device_map: Optional[dict[str, Union[int, str]]] = None
        self.module_sizes: dict[str, int] = {}
        self.buffer_sizes: Optional[dict[str, int]] = None  # buffers per module prefix (offload_buffers=False)
        self.max_memory_bytes: dict[Union[int, str], int] = {}
        self.budget_sources: dict[Union[int, str], str] = {}
        self.json_path: Optional[Path] = None
        self.memory: Optional[dict[Union[int, str], dict[str, int]]] = None
        self.prefetch_depth: Optional[int] = None
        self.reserve = 0
        self.execution_device: Optional[Union[int, str]] = None
        self._reconciled_with: Optional[int] = None  # id() of the strategy whose settings were merged in

    def _apply_settings(self, settings: Mapping[str, Any]) -> None:
        values = planning_attributes(settings)
        self.requested_map = values.pop("device_map")  # `device_map` is the plan, once made
        vars(self).update(values)

    def reconcile(self, owner: object, strategy_settings: Mapping[str, Any]) -> dict[str, Any]:
        """Merge the planning settings given to the strategy with those given to this callback; return the result.

        A setting given on one side only is used as given; given on both with different values is an error (no
        silent choice); given on neither takes the default. Done once per strategy (``owner``).

        Raises:
            ValueError: naming each setting given twice with different values, and both values.
        """
        strategy_given = {name: value for name, value in strategy_settings.items() if value is not None}
        clashes = [
            f"`{name}`: {strategy_given[name]!r} (strategy) vs {self.given_settings[name]!r} (DeviceMapCallback)"
            for name in PLANNING_DEFAULTS
            if name in strategy_given and name in self.given_settings
            and _canonical(name, strategy_given[name]) != _canonical(name, self.given_settings[name])
        ]
        if clashes:
            raise ValueError(
                "The strategy and `DeviceMapCallback` set the same planning setting(s) to different values: "
                + "; ".join(clashes) + ". Give each setting in one place (the strategy, or the callback), or the "
                "same value in both."
            )
        merged = PLANNING_DEFAULTS | strategy_given | self.given_settings
        if self._reconciled_with != id(owner):
            self._apply_settings(merged)
            self._reconciled_with = id(owner)
        return merged

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Nothing to plan yet: the model is built later, in ``configure_model``."""

    def plan(self, pl_module: torch.nn.Module, strategy: "pl.strategies.Strategy") -> dict[str, Union[int, str]]:
        """Compute (or check, for an explicit map) the device map of ``pl_module`` over the devices of ``strategy``."""
        gpus = trainer_gpus(strategy)
        self.max_memory_bytes = self._budget(gpus)
        sources = budget_sources(self.max_memory)  # "cgroup limit" / "available RAM" / "max_memory", for the table
        self.budget_sources = {key: sources.get(key, "-") for key in self.max_memory_bytes}
        quantized = {  # the strategy's setting, used for sizes and the plan alike (a callback does not repeat it)
            "quantization": getattr(strategy, "quantization", None),
            "quantization_skip_modules": getattr(strategy, "quantization_skip_modules", None),
        }
        self.module_sizes = compute_module_sizes(pl_module, dtype=self.dtype, **quantized)
        self.buffer_sizes = None if self.offload_buffers else compute_buffer_sizes(pl_module, dtype=self.dtype)
        if self.max_memory is None and not isinstance(self.requested_map, Mapping):  # detected budgets: a cgroup
            # limit smaller than the largest layer fails here, before anything is loaded
            check_layer_fits(*largest_layer(pl_module, self.no_split_module_classes, self.dtype, **quantized))
        self.memory = None
        if self.max_new_tokens and self.input_shape is None:
            raise ValueError(f"`max_new_tokens={self.max_new_tokens}` needs `input_shape` (e.g. '4x2048') to plan for.")
        self.prefetch_depth, self.reserve = ({True: 2, False: 1}.get(self.prefetch), 0)  # an explicit map's
        self.execution_device = None
        if isinstance(self.requested_map, Mapping):
            device_map = {key: normalize_device(value) for key, value in self.requested_map.items()}
            if prefetch_depth_of(self.requested_map) is not None:  # a plan read back (planned_from_json): its facts
                device_map = planned_copy(self.requested_map, device_map)
            device_map = with_execution(device_map, self.offload_execution, self.prefetch)  # an explicit setting
            check_device_map(pl_module, device_map)
            if self.input_shape is not None:
                self.memory = simulated_memory(pl_module, device_map, self.input_shape, self.max_new_tokens,
                                               self.dtype, self.offload_buffers)  # fmt: skip
        elif self.input_shape is not None:  # plan so that the simulated peak fits, on the network the batch runs
            device_map, self.memory = fitted_plan(
                pl_module, self.input_shape, self.max_new_tokens, max_memory=self.max_memory_bytes,
                no_split_module_classes=self.no_split_module_classes, dtype=self.dtype, policy=self.requested_map,
                offload_buffers=self.offload_buffers, prefetch=self.prefetch, offload_execution=self.offload_execution,
                stream_reserve=self.max_memory is None,  # a detected budget keeps room for the disk stream
                **quantized,
            )  # fmt: skip
        else:
            device_map = infer_device_map(
                pl_module,
                max_memory=self.max_memory_bytes,
                no_split_module_classes=self.no_split_module_classes,
                dtype=self.dtype,
                policy=self.requested_map,
                offload_buffers=self.offload_buffers,
                stream_reserve=self.max_memory is None,  # a detected budget keeps room for the disk stream
                prefetch=self.prefetch,
                offload_execution=self.offload_execution,
                **quantized,
            )
            if self.max_memory is None:  # a detected budget planned without a batch shape: say so when it is tight
                note_unsized_activations(device_map, self.module_sizes)
        if prefetch_depth_of(device_map) is not None:  # a plan: its depth, reserve and execution device, kept
            self.prefetch_depth, self.reserve = device_map.prefetch_depth, device_map.reserve
            self.execution_device = execution_device_of(device_map)
            self.device_map = planned_copy(device_map, device_map)
        else:
            self.device_map = dict(device_map)
        return self.device_map

    def _budget(self, gpus: list[int]) -> dict[Union[int, str], int]:
        if self.max_memory is None:
            # only the Trainer's GPUs are queried; with an input shape, the simulation reserves the activations
            return get_max_memory(None, gpus=gpus, simulated_activations=self.input_shape is not None)
        budget = get_max_memory(self.max_memory)
        extra = [key for key in budget if isinstance(key, int) and key not in gpus]
        if extra:
            where = f"GPUs {gpus}" if gpus else "the CPU accelerator (no GPU)"
            raise ValueError(
                f"`max_memory` gives a budget to GPU(s) {extra}, but the Trainer runs on {where}. Pass "
                "`Trainer(accelerator='gpu', devices=...)` covering them, or drop them from `max_memory`."
            )
        return budget

    def render(self) -> str:
        """The plan as a table (see :func:`lightning_bigmodel.planning.table.render_table`)."""
        if self.device_map is None:
            raise RuntimeError("`DeviceMapCallback` has not planned yet: `render()` needs `plan()` first.")
        table = render_table(self.device_map, self.module_sizes, self.max_memory_bytes, self.budget_sources,
                             self.buffer_sizes)  # fmt: skip
        return table + "\n" + prefetch_line(self.prefetch_depth, self.reserve, self.device_map, self.execution_device)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.device_map is None:
            rank_zero_warn(
                "`DeviceMapCallback` found no device map: it plans only with "
                "`Trainer(strategy=BigModelInferenceStrategy(...))` (or `strategy='bigmodel'`)."
            )
            return
        rank_zero_info(f"Device map:\n{self.render()}")
        if self.save_json:
            folder = trainer.log_dir or trainer.default_root_dir  # `log_dir` broadcasts: every rank must ask
            if trainer.is_global_zero:
                self.json_path = self.write_json(folder)

    def write_json(self, folder: Union[str, Path]) -> Path:
        """Write ``device_map.json``: ``{"device_map", "bytes_per_device", "max_memory"}``; return its path."""
        assert self.device_map is not None
        path = Path(folder) / JSON_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "device_map": self.device_map,
            "bytes_per_device": bytes_per_device(self.device_map, self.module_sizes),
            "max_memory": {device_label(key): value for key, value in self.max_memory_bytes.items()},
            "max_memory_source": {device_label(key): value for key, value in self.budget_sources.items()},
            "prefetch_depth": self.prefetch_depth,  # offloaded layers on the execution GPU at once (see `prefetch`)
            "reserve_bytes": self.reserve,
            "execution_device": self.execution_device,  # where offloaded layers compute: a GPU index or "cpu"
            "activation_bytes": activation_bytes_of(self.device_map),  # fitted for a batch: its CPU room (else null)
            "stream_unit_bytes": stream_unit_of(self.device_map),  # what the disk stream's buffers are sized by
        }
        if self.memory is not None:  # the simulated run-time memory of a batch of `input_shape`
            from lightning_bigmodel.simulate.report import peaks_json

            payload.update(peaks_json(self.memory, self.input_shape, self.max_new_tokens))
        path.write_text(json.dumps(payload, indent=2))
        return path
