"""The Lightning-side load-and-dispatch step: stream a checkpoint into a LightningModule, dispatch it, undo it.

:class:`~lightning_bigmodel.pl.strategy.BigModelInferenceStrategy` calls :func:`load_into` from
``load_model_state_dict``; :func:`release` undoes it at teardown when asked to. Where the hooks go
(:func:`dispatch_root`): on the single child holding every tensor (``self.model``) when there is one, else on the
LightningModule itself plus output hooks on its network children (see :func:`hook_network_children`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from lightning_bigmodel.checkpoint import load_checkpoint_in_model
from lightning_bigmodel.planning.device_map import normalize_device
from lightning_bigmodel.dispatch import dispatch_model, remove_dispatch
from lightning_bigmodel.pl.io import LazyStateDict, ShardedCheckpointIO
from lightning_bigmodel.checkpoint.keys import infer_key_prefix
from lightning_bigmodel.integrations.transformers import infer_converted_prefix
from lightning_bigmodel.offload.pinned import give_back_host_memory
from lightning_bigmodel.offload.subclass import is_pinned
from lightning_bigmodel.offload.hooks import RootHook, map_tensors
from lightning_bigmodel.offload.placement import (
    DISPATCH_STATE,
    dispatched_modules,
    execution_target,
    is_dispatched,
    main_device_of,
)
from lightning_bigmodel.planning.table import format_bytes

__all__ = [
    "LoadProgress",
    "dispatch_root",
    "dispatched_modules",
    "dispatched_plan",
    "hook_network_children",
    "is_dispatched",
    "load_into",
    "main_device_of",
    "meta_tensor_names",
    "prefetchers",
    "release",
    "return_outputs",
]

PRINT_EVERY = 10  # percent: the plain progress report without tqdm


# ---------------------------------------------------------------------- dispatch state of a LightningModule
def release(model: nn.Module) -> None:
    """Remove the dispatch hooks of ``model`` and every dispatched submodule, and drop the weights.

    Parameters go back to meta (tied ones stay tied), which frees GPU memory and pinned RAM and drops the
    memory-mapped disk views; buffers keep their values (non-persistent ones are in no checkpoint), those in pinned
    RAM moved to plain RAM. The page-locked memory is given back to the OS, not to a cache (see
    :func:`~lightning_bigmodel.offload.pinned.give_back_host_memory`). Loading a checkpoint again makes the model
    usable.
    """
    main = main_device_of(model)
    for _, module in dispatched_modules(model):
        remove_dispatch(module)
    replaced: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (old, meta); `old` keeps the id unique
    unpinned: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.is_meta:
                continue
            if id(param) not in replaced:
                # shape and dtype only: a quantized weight goes back to a plain meta tensor (re-quantized on reload)
                empty = torch.empty(param.shape, dtype=param.dtype, device="meta")
                meta = nn.Parameter(empty, requires_grad=param.requires_grad)
                replaced[id(param)] = (param, meta)
            module._parameters[name] = replaced[id(param)][1]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "cpu" and is_pinned(buffer):
                module._buffers[name] = unpinned.setdefault(id(buffer), buffer.to("cpu", copy=True))
    replaced.clear()
    give_back_host_memory(main)


def dispatched_plan(model: nn.Module) -> dict[str, Union[int, str]]:
    """The device map ``model`` is dispatched with, in ``model``'s names (``{}`` when it is not dispatched)."""
    for name, module in dispatched_modules(model):
        prefix = f"{name}." if name else ""
        return {(prefix + key).rstrip("."): device for key, device in module.hf_device_map.items()}
    return {}


def prefetchers(model: nn.Module) -> list:
    """The prefetchers of ``model``'s dispatched modules (CUDA execution devices with offloaded weights)."""
    states = [module.__dict__[DISPATCH_STATE] for _, module in dispatched_modules(model)]
    return [state.prefetcher for state in states if state.prefetcher is not None]


def return_outputs(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor left on another accelerator than ``device`` moved there (CPU tensors stay).

    A model spread over GPUs may leave outputs on its last GPU when its root forward was not called; what a
    single-device run would return is on the root device. Tuples (named too), lists and dicts are traversed.
    """

    def back(tensor: torch.Tensor) -> torch.Tensor:
        stray = tensor.device.type not in ("cpu", "meta") and tensor.device != device
        return tensor.to(device) if stray else tensor

    return map_tensors(obj, back)


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of parameters and buffers that still hold no data (on meta)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]


# ---------------------------------------------------------------------- load and dispatch
def load_into(
    model: nn.Module,
    state_dict: Optional[Mapping[str, torch.Tensor]],
    device_map: Mapping[str, Union[int, str]],
    main_device: torch.device,
    dtype: Optional[torch.dtype] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
    strict: bool = True,
    key_prefix: Optional[str] = None,
    checkpoint_io: Optional[CheckpointIO] = None,
    quantization: Optional[str] = None,
    quantization_skip_modules: Optional[list[str]] = None,
    prefetch: Optional[bool] = None,
) -> None:
    """Stream ``state_dict`` into ``model`` on the devices of ``device_map``, check nothing is left on meta, dispatch.

    A :class:`~lightning_bigmodel.pl.io.LazyStateDict` streams tensor by tensor (``load_checkpoint_in_model``, with a
    progress bar when ``checkpoint_io`` is a :class:`~lightning_bigmodel.pl.io.ShardedCheckpointIO` that wants one) and is
    closed afterwards; any other mapping (from another ``CheckpointIO``) is copied in on CPU first.
    ``state_dict=None`` dispatches a model whose weights are already real. ``key_prefix=None`` detects the prefix
    (:func:`~lightning_bigmodel.checkpoint.keys.infer_key_prefix`). ``quantization`` quantizes while streaming (see
    :func:`~lightning_bigmodel.checkpoint.loading.load_checkpoint_in_model`); it needs a streamed checkpoint.

    Raises:
        RuntimeError: keys missing or unexpected under ``strict``, or parameters left on meta (no weights for them).
    """
    if quantization is not None and not isinstance(state_dict, LazyStateDict):
        given = "no checkpoint" if state_dict is None else f"an in-memory state dict ({type(state_dict).__name__})"
        raise ValueError(
            f"`quantization`={quantization!r} quantizes weights while a checkpoint streams in, but {given} was given. "
            "Pass `ckpt_path=` (or `checkpoint=`) with the default `ShardedCheckpointIO`, or drop `quantization`."
        )
    if state_dict is not None:
        if key_prefix is None:
            key_prefix = _infer_prefix(model, list(state_dict.keys()))
        if isinstance(state_dict, LazyStateDict):
            _stream(model, state_dict, device_map, dtype, offload_folder, offload_buffers, strict, key_prefix,
                    checkpoint_io, (quantization, quantization_skip_modules))  # fmt: skip
        else:
            _copy_in(model, state_dict, strict, key_prefix)
    left = meta_tensor_names(model)
    if left:
        shown = left[:8] + ([f"... ({len(left) - 8} more)"] if len(left) > 8 else [])
        how = "they are missing from the checkpoint" if state_dict is not None else "no checkpoint was given"
        raise RuntimeError(
            f"{len(left)} tensor(s) of the model hold no weights (still on meta): {shown}; {how}. Pass "
            "`trainer.predict(..., ckpt_path=...)` or `BigModelInferenceStrategy(checkpoint=...)` with a checkpoint "
            "holding them (check `key_prefix` if the names differ)."
        )
    root, root_map = dispatch_root(model, device_map)
    dispatch_model(root, root_map, main_device=main_device, offload_folder=offload_folder,
                   offload_buffers=offload_buffers, prefetch=prefetch)  # fmt: skip
    if root is model:
        hook_network_children(model)


def dispatch_root(model: nn.Module, device_map: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The module to dispatch and its map: the single child holding every tensor (``self.model`` of a
    LightningModule, with the map's keys stripped of its name), else ``model`` itself.

    ``predict_step`` usually calls ``self.model(...)`` (or ``self.model.generate``), not the LightningModule's own
    forward, so the root hooks (outputs back to the input's device, prefetch boundaries) belong on that child.
    """
    heads = {key.split(".", 1)[0] for key in device_map}
    child = model._modules.get(next(iter(heads))) if len(heads) == 1 and "" not in device_map else None
    if child is None:
        return model, dict(device_map)
    name = next(iter(heads))
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if any(not tensor_name.startswith(name + ".") for tensor_name, _ in named):
        return model, dict(device_map)
    return child, {key[len(name) + 1 :]: device for key, device in device_map.items()}


def hook_network_children(model: nn.Module) -> None:
    """When ``model`` itself is dispatched over several execution devices (it holds tensors outside one network
    child, e.g. a head or a buffer of the LightningModule), give each direct child that holds mapped modules and has
    a forward the root's output hook: its outputs come back to its input's device even though ``predict_step``
    calls it (``self.model(...)``, ``self.model.generate(...)``) and not ``model``'s forward.

    Prefetch boundaries do not depend on these hooks: the strategy fixes the learned order after the first step
    (:meth:`~lightning_bigmodel.offload.prefetch.Prefetcher.finish_recording`). The handles join the dispatch's,
    so ``remove_dispatch`` removes them.
    """
    state = model.__dict__.get(DISPATCH_STATE)
    if state is None:
        return
    device_map = model.hf_device_map
    devices = {execution_target(normalize_device(value), state.main_device) for value in device_map.values()}
    if len(devices) < 2:
        return
    for name in sorted({key.split(".", 1)[0] for key in device_map if key}):
        child = model._modules.get(name)
        if child is None or type(child).forward is nn.Module.forward:
            continue  # a parameter of `model` itself, or a container whose forward never runs
        hook = RootHook({}, None, restore_outputs=True)  # pre first: it must see the inputs before they move
        state.handles.append(child.register_forward_pre_hook(hook.pre, with_kwargs=True, prepend=True))
        state.handles.append(child.register_forward_hook(hook.post, with_kwargs=True, always_call=True))


def _infer_prefix(model: nn.Module, checkpoint_keys: list[str]) -> str:
    """:func:`infer_key_prefix`; failing that, the prefix of the transformers network inside ``model`` whose
    conversion rules take the checkpoint's keys (a Hub checkpoint whose names differ from the modules)."""
    try:
        return infer_key_prefix(checkpoint_keys, list(model.state_dict().keys()))
    except ValueError:
        prefix = infer_converted_prefix(model, checkpoint_keys)
        if prefix is None:
            raise
        return prefix


def _stream(
    model, state_dict, device_map, dtype, offload_folder, offload_buffers, strict, key_prefix, io, quantized=(None, None)
) -> None:
    show = isinstance(io, ShardedCheckpointIO) and io.show_progress(state_dict.nbytes)
    progress = _make_progress(state_dict.nbytes) if show else None
    try:
        load_checkpoint_in_model(
            model,
            state_dict.checkpoint,
            device_map=device_map,
            dtype=dtype,
            offload_folder=offload_folder,
            strict=strict,
            offload_buffers=offload_buffers,
            key_prefix=key_prefix,
            progress=progress,
            quantization=quantized[0],
            quantization_skip_modules=quantized[1],
        )
    finally:
        if progress is not None:
            progress.close()
        state_dict.close()


# ---------------------------------------------------------------------- progress
class LoadProgress:
    """Progress of a checkpoint streaming in, as ``progress(key, nbytes)`` callbacks: a tqdm bar when tqdm is
    importable, else a line printed every ``PRINT_EVERY`` percent.

    Args:
        total: the checkpoint's tensor bytes.
        desc: the label.
    """

    def __init__(self, total: int, desc: str = "Loading checkpoint") -> None:
        self.total = total
        self.desc = desc
        self.done = 0
        self._printed = 0
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def __call__(self, key: str, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        percent = 100 if self.total <= 0 else min(100, self.done * 100 // self.total)
        step = percent // PRINT_EVERY * PRINT_EVERY
        if step > self._printed:
            self._printed = step
            print(f"{self.desc}: {step}% ({format_bytes(self.done)} / {format_bytes(self.total)})", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@rank_zero_only
def _make_progress(total: int) -> LoadProgress:
    return LoadProgress(total)  # `rank_zero_only` gives None on other ranks: they load silently


def _copy_in(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, key_prefix: str) -> None:
    """Fallback for an in-memory state dict: meta parameters become CPU tensors (ties kept), then a copy."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), param.requires_grad)
                module._parameters[name] = made[id(param)]
    prefixed = {key_prefix + key: value for key, value in state_dict.items()}
    missing, unexpected = model.load_state_dict(prefixed, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"Missing key(s) in state_dict: {missing}. Unexpected key(s) in state_dict: {unexpected}.")
    ids = {id(p) for p in made.values()}
    unloaded = [name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids and name in missing]
    if unloaded:
        raise RuntimeError(f"Parameters {unloaded[:8]} are in no checkpoint; pass a checkpoint holding them.")
