"""Attach the hooks that run a model across GPUs, CPU and disk."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel._keywords import keyword_only
from lightning_bigmodel.checkpoint.loading import load_checkpoint_in_model
from lightning_bigmodel.checkpoint.resolve import is_safetensors, resolve_checkpoint
from lightning_bigmodel.integrations.quantization.spec import Quantization, quantized_weights, resolve_quantization
from lightning_bigmodel.planning.device_map import (
    POLICIES,
    check_budget_devices_exist,
    execution_device,
    infer_device_map,
    normalize_device,
)
from lightning_bigmodel.planning.devices import (
    activation_bytes_of,
    as_execution_device,
    prefetch_depth_of,
    stream_unit_of,
    with_execution,
)
from lightning_bigmodel.offload.attach import DispatchState, attach_hooks
from lightning_bigmodel.offload.disk import OffloadFolder
from lightning_bigmodel.offload.guards import guard_copies, keep_requires_grad, requires_grad_of, unguard_copies
from lightning_bigmodel.offload.subclass import inner_tensors, is_wrapped, stored_nbytes
from lightning_bigmodel.offload.placement import (
    SavedSlots,
    restored_on_error,
    DISK,
    DISPATCH_STATE,
    TensorGroup,
    assign_targets,
    install,
    is_at,
    is_disk,
    is_dispatched,
    mark_disk,
    owner_key,
    pin_host,
    tensor_groups,
    to_host,
    validate_device_map,
)

__all__ = ["dispatch_model", "is_dispatched", "load_checkpoint_and_dispatch", "remove_dispatch"]


@keyword_only(
    (("main_device", "main_device"), ("state_dict", None), ("offload_dir", "offload_folder"), ("offload_index", None),
     ("offload_buffers", "offload_buffers"), ("skip_keys", None), ("preload_module_classes", None),
     ("force_hooks", None))
)  # fmt: skip
def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, Union[int, str]],
    *,
    main_device: Optional[Union[str, torch.device]] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
    prefetch: Optional[bool] = None,
) -> nn.Module:
    """Place ``model`` as ``device_map`` says and attach the hooks that run it there; return it in ``eval()`` mode.

    The library is for inference: the dispatched model is put in ``eval()`` mode (dropout off), as a model loaded with
    ``from_pretrained`` is. Every argument after ``device_map`` is keyword-only.

    ``prefetch`` (GPU execution): ``True`` copies the next offloaded layer in on a side stream while one computes (two
    offloaded layers on the GPU), ``False`` fetches each when it runs and frees it after (one). ``None`` follows the
    prefetch depth a planned map records (``infer_device_map``'s ``.prefetch_depth``; 1 means ``False``), else ``True``.

    Tensors not yet at their place are moved (``"disk"`` ones not already file-backed are written once into
    ``offload_folder`` and replaced by memory-mapped views). Entries on ``"cpu"``/``"disk"`` compute on ``main_device``
    (default: the lowest GPU of the map, else CPU); when that is the CPU, their weights are used in place and get no
    hook. A dispatched model refuses ``.to()``/``.cuda()``/``.cpu()``/``.half()`` (anything going through
    ``nn.Module._apply``) and forward passes with grad through offloaded weights. Dispatching again first removes
    the previous hooks; :func:`remove_dispatch` undoes it.

    Every check (map, GPUs, meta tensors, offload folder writable and with room) runs before any tensor moves; if
    placing fails anyway, every parameter and buffer is put back as it was.

    Raises:
        ValueError: the map misses tensors, names unknown modules or absent GPUs, or needs an ``offload_folder``.
        OffloadFolderError: ``offload_folder`` is not writable or lacks room (also a ``ValueError`` and ``OSError``).
        RuntimeError: a parameter or buffer is still on meta (load the checkpoint first).
    """
    remove_dispatch(model)
    grads = requires_grad_of(model)  # put back by remove_dispatch
    depth, activations = prefetch_depth_of(device_map), activation_bytes_of(device_map)  # facts of a plan, if any
    unit = stream_unit_of(device_map)
    device_map = validate_device_map(model, device_map)
    _refuse_meta(model)
    normalized = {key: normalize_device(value) for key, value in device_map.items()}
    # the planned execution device (a GPU, or the CPU for a plan that keeps no room on a GPU), else the lowest GPU
    main = as_execution_device(main_device) if main_device is not None else execution_device(device_map)
    groups = tensor_groups(model)
    assign_targets(groups, normalized, main, offload_buffers)
    with restored_on_error(model) as saved:
        _place(groups, pin_host(main), offload_folder, saved)
        prefetch = depth != 1 if prefetch is None else prefetch  # the plan's depth (see PlannedDeviceMap)
        state = attach_hooks(model, groups, normalized, main, prefetch=prefetch, activations=activations,
                             stream_unit=unit)  # facts of a plan, if any
    model.hf_device_map = dict(device_map)
    object.__setattr__(model, DISPATCH_STATE, state)
    object.__setattr__(model, "_apply", partial(_refuse_apply, type(model).__name__))
    guard_copies(model, grads)  # deepcopy / torch.save refused, naming remove_dispatch
    return model.eval()  # inference only: dropout off, norms use their running statistics


def remove_dispatch(model: nn.Module) -> nn.Module:
    """Remove every hook :func:`dispatch_model` attached, stop its prefetch thread and allow ``.to()`` again.

    The weights stay where they are (memory-mapped ``"disk"`` views included); each parameter gets back the
    ``requires_grad`` it had before loading/dispatch; copying and pickling work again (a dispatched model refuses
    them: see :mod:`lightning_bigmodel.offload.guards`). A no-op on a model never dispatched.
    """
    state: Optional[DispatchState] = model.__dict__.pop(DISPATCH_STATE, None)
    if state is None:
        return model
    for handle in state.handles:
        handle.remove()
    if state.prefetcher is not None:
        state.prefetcher.close()
    model.__dict__.pop("_apply", None)
    model.__dict__.pop("hf_device_map", None)
    unguard_copies(model)  # copies allowed again; each parameter's requires_grad as before loading/dispatch
    return model


@keyword_only(
    (("device_map", "device_map"), ("max_memory", "max_memory"), ("no_split_module_classes", "no_split_module_classes"),
     ("offload_folder", "offload_folder"), ("offload_buffers", "offload_buffers"), ("dtype", "dtype"),
     ("offload_state_dict", None), ("skip_keys", None), ("preload_module_classes", None), ("force_hooks", None),
     ("strict", "strict"))
)  # fmt: skip
def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: Union[str, Path],
    *,
    device_map: Union[str, Mapping[str, Union[int, str]], None] = "auto",
    max_memory: Optional[Mapping[Union[int, str], Union[int, str]]] = None,
    no_split_module_classes: Optional[Sequence[str]] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
    dtype: Optional[torch.dtype] = None,
    strict: bool = False,
    key_prefix: str = "",
    quantization: Optional[Quantization] = None,
    quantization_skip_modules: Optional[Sequence[str]] = None,
    prefetch: Union[bool, str] = "auto",
    input_shape: Optional[Union[str, Sequence[int]]] = None,
    max_new_tokens: int = 0,
    offload_execution: str = "auto",
) -> nn.Module:
    """Plan (when ``device_map`` is a policy name), stream the checkpoint in, and dispatch; return ``model`` in
    ``eval()`` mode (also with ``device_map=None``). Every argument after ``checkpoint`` is keyword-only.

    Checkpoint tensors that match nothing in the model are logged once (a warning with their count and first names);
    ``strict=True`` refuses them, and missing ones, before anything is placed.

    ``prefetch`` (``True``/``False``/``"auto"``) is the prefetch depth of the plan (see ``infer_device_map``); with an
    explicit map, ``"auto"`` prefetches and ``False`` fetches each offloaded layer when it runs.

    ``offload_execution`` (``"auto"``/``"gpu"``/``"cpu"``) is where the plan's offloaded layers compute (see
    ``infer_device_map``: ``"auto"`` keeps them on a GPU unless its room for them would leave a GPU without modules);
    with an explicit map, ``"cpu"`` computes its "cpu"/"disk" entries on the CPU, ``"gpu"`` on its lowest GPU, and
    ``"auto"`` where the map says (a plan read back from ``device_map.json`` records it; else the lowest GPU).

    ``input_shape`` (your largest batch of token ids, ``"4x128"``) and ``max_new_tokens`` plan so that the simulated
    peak of that batch fits every budget (see :func:`lightning_bigmodel.infer_device_map`): its activations get room
    beside the weights, which matters most under a memory limit with ``max_memory=None``, where the detected CPU
    budget otherwise keeps only a fixed headroom for them (a larger batch gets the process OOM-killed).

    ``device_map=None`` loads everything on CPU and attaches nothing. ``quantization="int8"`` (or ``"int4"`` on GPUs)
    quantizes ``nn.Linear`` weights while they stream in (torchao, weight-only; the ``lm_head`` and embeddings stay in
    the compute dtype unless ``quantization_skip_modules`` says otherwise), plans them at their quantized size, and
    keeps them quantized on every device, ``"disk"`` included. See :func:`load_checkpoint_in_model` and
    :func:`dispatch_model` for the other arguments.

    Bad input fails before any tensor is placed: an unknown policy, a malformed budget, a map that misses tensors or
    names unknown modules or absent GPUs, a budget too small for the model when the spill to ``"disk"`` would need
    an ``offload_folder`` that was not given, and every checkpoint problem :func:`load_checkpoint_in_model` detects.
    If loading or dispatching fails part way anyway (e.g. the disk fills up), the model's parameters and buffers
    are put back as they were (meta tensors stay meta).
    """
    policy = device_map if isinstance(device_map, str) else None
    if policy is not None:
        if policy not in POLICIES:
            raise ValueError(f"`device_map`={policy!r} is not a policy; use one of {POLICIES} or a dict.")
        check_budget_devices_exist(max_memory)
        from lightning_bigmodel.fitting import infer_device_map as fit_device_map  # the planner with input shapes

        device_map = fit_device_map(
            model,
            prefetch=prefetch,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            policy=policy,
            offload_buffers=offload_buffers,
            quantization=quantization,
            quantization_skip_modules=quantization_skip_modules,
            input_shape=input_shape,
            max_new_tokens=max_new_tokens,
            offload_execution=offload_execution,
        )
    elif input_shape is not None or max_new_tokens:
        raise ValueError(
            "`input_shape`/`max_new_tokens` plan a device map; with `device_map` given as a map (or None) there is "
            "nothing to plan. Drop them, or pass `device_map='auto'`."
        )
    if device_map is not None:
        if policy is None:  # an explicit map: the execution device `offload_execution` names (checked first)
            device_map = with_execution(device_map, offload_execution, prefetch)
        device_map = validate_device_map(model, device_map)
        if policy is not None and offload_folder is None:
            quantized = quantized_weights(model, resolve_quantization(quantization, quantization_skip_modules))
            _refuse_spill_without_folder(device_map, checkpoint, policy, max_memory, quantized)
    grads = requires_grad_of(model)
    with restored_on_error(model):
        load_checkpoint_in_model(
            model, checkpoint, device_map=device_map, dtype=dtype, offload_folder=offload_folder, strict=strict,
            offload_buffers=offload_buffers, key_prefix=key_prefix, quantization=quantization,
            quantization_skip_modules=quantization_skip_modules,
        )  # fmt: skip
        if device_map is not None:
            dispatch_model(model, device_map, offload_folder=offload_folder, offload_buffers=offload_buffers,
                           prefetch=None if policy is not None or prefetch == "auto" else bool(prefetch))
            keep_requires_grad(model, grads)  # what remove_dispatch restores: the values before loading
    return model.eval()


def _refuse_spill_without_folder(
    device_map: Mapping[str, Union[int, str]], checkpoint, policy: str, max_memory, quantized: Mapping[str, object]
) -> None:
    """A planned map that spills to ``"disk"`` needs an offload folder unless every shard is safetensors (and
    nothing is quantized: quantized weights have no bytes in the checkpoint to reference)."""
    spilled = [key or "<root>" for key, device in device_map.items() if device == DISK]
    if not spilled:
        return
    shown = spilled if len(spilled) <= 8 else spilled[:8] + [f"... ({len(spilled) - 8} more)"]
    if any(device_map[owner_key(name, device_map)] == DISK for name in quantized):
        raise ValueError(
            f"The budget `max_memory`={dict(max_memory) if max_memory else 'detected free memory'} is too small for "
            f"the quantized model: `device_map={policy!r}` puts {shown} on \"disk\", and quantized weights are written "
            "once to an offload folder. Pass `offload_folder=` (a folder with room for them), or raise the budget."
        )
    files = resolve_checkpoint(checkpoint).files
    pickled = [f.name for f in files if not is_safetensors(f)]
    if not pickled:
        return  # safetensors shards are referenced in place
    raise ValueError(
        f"The budget `max_memory`={dict(max_memory) if max_memory else 'detected free memory'} is too small for the "
        f"model: `device_map={policy!r}` puts {shown} on \"disk\", and checkpoint file(s) {pickled[:3]} are not "
        "safetensors, so those weights must be written to an offload folder first. Pass `offload_folder=` (a folder "
        "with room for them), raise the budget, or convert the checkpoint to safetensors."
    )


def _refuse_apply(name: str, fn, recurse: bool = True):
    raise RuntimeError(
        f"This {name} is dispatched: its weights are placed by its device map (see `model.hf_device_map`), so "
        "`.to()`, `.cuda()`, `.cpu()`, `.half()` and the like are refused. Call `remove_dispatch(model)` first."
    )


def _refuse_meta(model: nn.Module) -> None:
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        shown = meta if len(meta) <= 10 else meta[:10] + [f"... ({len(meta) - 10} more)"]
        raise RuntimeError(
            f"Cannot dispatch a model with tensors on the meta device: {shown}. Load a checkpoint that holds them "
            "first (`load_checkpoint_in_model`; keys it reports missing stay on meta)."
        )


def _place(
    groups: list[TensorGroup], pin: Optional[torch.device], offload_folder: Optional[Union[str, Path]], saved: SavedSlots
) -> None:
    """Move every tensor not yet at its target; write ``"disk"`` ones that are not file-backed into the folder.

    A RAM tensor that gets a pinned copy is dropped from ``saved`` (the copy takes its place in a restore), so the
    original is freed at once: the model is never held twice in RAM."""
    to_write = [g for g in groups if g.target == DISK and not is_disk(g.tensor)]
    if to_write and offload_folder is None:
        modules = sorted({g.name.rpartition(".")[0] or "<root>" for g in to_write})
        raise ValueError(
            f"`device_map` puts {modules[:8]} on \"disk\", but their weights are in memory. Pass `offload_folder=` "
            "(a folder with room for them) so they are written there once."
        )
    store = OffloadFolder(offload_folder, None) if to_write else nullcontext()  # in-memory weights: nothing to reuse
    with store:  # opened first: an unwritable or full folder fails before anything moves
        if to_write:
            store.ensure_space(sum(stored_nbytes(g.tensor) for g in to_write), len(to_write))
        for group in groups:
            target = group.target
            if target == DISK or is_at(group.tensor, target, pin):
                continue
            old = group.tensor
            new = install(group, to_host(old, pin) if target.type == "cpu" else old.to(target))
            if target.type == "cpu" and old.device.type == "cpu":
                saved.replace(old, new)
            del old, new
        for group in to_write:
            install(group, mark_disk(_write(store, group)))


def _write(store: OffloadFolder, group: TensorGroup) -> torch.Tensor:
    """Write ``group``'s tensor once and return its file-backed view; a tensor subclass (e.g. already quantized in
    memory) is written as its inner tensors and rebuilt over their views, keeping its class."""
    tensor = group.tensor
    if not is_wrapped(tensor):
        return store.write(group.name, tensor)
    parts, context = inner_tensors(tensor)
    views = store.write_parts(group.name, parts, tensor, {"class": type(tensor).__name__}, {})
    return type(tensor).__tensor_unflatten__(views, context, tensor.shape, tensor.stride())
