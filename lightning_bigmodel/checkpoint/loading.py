"""Stream a checkpoint into a (meta) model, tensor by tensor, straight to each tensor's device."""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel._accelerator import is_gpu
from lightning_bigmodel._keywords import keyword_only
from lightning_bigmodel.checkpoint.reader import CheckpointReader, TensorSpec
from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint
from lightning_bigmodel.checkpoint.transform import TensorTransform, compute_device, place_transformed
from lightning_bigmodel.integrations.quantization.spec import revert_linear_forms
from lightning_bigmodel.integrations.transformers import converted_source
from lightning_bigmodel.planning.device_map import execution_device
from lightning_bigmodel.offload.disk import OffloadFolder, source_identity
from lightning_bigmodel.offload._reuse import wait_on_first_use
from lightning_bigmodel.offload.pages import is_file_backed, keep_resident, track_storage
from lightning_bigmodel.offload.pinned import pinned_empty
from lightning_bigmodel.offload.placement import (
    DISK,
    TensorGroup,
    assign_targets,
    install,
    is_at,
    is_dispatched,
    mark_disk,
    pin_host,
    restored_on_error,
    tensor_groups,
    to_host,
    validate_device_map,
)

_log = logging.getLogger("lightning_bigmodel.checkpoint")


@dataclass
class _Plan:
    sources: dict[int, str] = field(default_factory=dict)  # group index -> checkpoint key
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)  # group index -> dtype to install
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    transform: Optional[TensorTransform] = None  # the per-tensor transform hook (see `checkpoint/transform.py`)
    transformed: set[int] = field(default_factory=set)  # group indices it applies to


@keyword_only(
    (("device_map", "device_map"), ("offload_folder", "offload_folder"), ("dtype", "dtype"),
     ("offload_state_dict", None), ("offload_buffers", "offload_buffers"), ("keep_in_fp32_modules", None),
     ("offload_8bit_bnb", None), ("strict", "strict"))
)  # fmt: skip
def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: Union[str, Path],
    *,
    device_map: Optional[Mapping[str, Union[int, str]]] = None,
    dtype: Optional[torch.dtype] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    strict: bool = False,
    offload_buffers: bool = False,
    key_prefix: str = "",
    progress: Optional[Callable[[str, int], None]] = None,
    quantization: Optional[str] = None,
    quantization_skip_modules: Optional[Sequence[str]] = None,
) -> tuple[list[str], list[str]]:
    """Stream ``checkpoint`` into ``model``, each tensor straight to the place ``device_map`` gives it.

    Everything is validated before any tensor is placed: map coverage, shapes, dtypes, strictness and whether an
    offload folder is needed. Then each tensor is read, cast (floats to ``dtype``, else to the model's dtype) and
    installed directly (``module._parameters[name] = Parameter(...)``); tied parameters get one shared ``Parameter``.
    ``"disk"`` parameters are memory-mapped views: of the checkpoint itself when it is safetensors and no cast is
    needed, else of files written once into ``offload_folder``.

    When ``model`` (or the submodule ``key_prefix`` names) is a transformers ``PreTrainedModel``, the checkpoint is
    read through transformers' own conversion rules for its class, as ``from_pretrained`` does: renamed keys cost
    nothing (same zero-copy views), and a tensor built from several checkpoint tensors (fused MoE experts) is made
    from its sources only, then placed like any other (written once to ``offload_folder`` when it goes to disk). A
    checkpoint leaving model parameters without weights while some of its tensors fit nothing raises ``ValueError``
    before anything is placed (another class or revision). See :mod:`lightning_bigmodel.integrations.transformers`.

    Args:
        model: the model, usually built under ``init_empty_weights`` (meta parameters).
        checkpoint: a file, folder, index JSON or Hub repo id.
        device_map: ``{module_name: gpu_index | "cpu" | "disk"}``; ``None`` puts meta tensors on CPU and leaves real
            ones where they are.
        dtype: dtype for floating-point tensors read from the checkpoint (default: the model's).
        offload_folder: where ``"disk"`` tensors that cannot be referenced in place are written.
        strict: raise ``RuntimeError`` (before placing anything) when keys are missing or unexpected.
        offload_buffers: keep buffers of ``"cpu"``/``"disk"`` entries in RAM instead of on the execution device.
        key_prefix: prepended to every checkpoint key to get the model's name (e.g. ``"model."``).
        progress: called as ``progress(key, nbytes)`` once per checkpoint key, with the tensor's size in the
            checkpoint: right after the tensor is placed, or, for keys that place nothing (unexpected keys, a second
            alias of tied weights), after the last placement. The ``nbytes`` add up to the checkpoint's tensor bytes.
        quantization: ``"int8"`` or ``"int4"`` quantizes ``nn.Linear`` weights (weight-only, with torchao) as they
            stream in, on the CPU after the cast and before placement; they stay quantized on every device, ``"disk"``
            included (written once to ``offload_folder``). See :mod:`lightning_bigmodel.integrations.quantization`.
        quantization_skip_modules: modules whose ``nn.Linear`` weights stay in the compute dtype (default
            ``["lm_head"]``; a list given replaces it). Embeddings are never quantized.

    Returns:
        ``(missing_keys, unexpected_keys)``: model names absent from the checkpoint (parameters listed there stay on
        meta), and checkpoint keys (as written in the checkpoint) that match nothing in the model.
    """
    if is_dispatched(model):
        raise RuntimeError(
            "`model` is dispatched: its hooks hold the weights placed before. Call `remove_dispatch(model)` before "
            "loading a checkpoint into it, then dispatch it again (or build a fresh model)."
        )
    revert_linear_forms(model)  # a quantized Conv1D released to meta takes the checkpoint's layout again
    groups = tensor_groups(model)
    main_device = torch.device("cpu")
    if device_map is not None:
        device_map = validate_device_map(model, device_map)
        main_device = execution_device(device_map)
    assign_targets(groups, device_map, main_device, offload_buffers)
    pin = device_map is not None and pin_host(main_device)
    # Quantization is checked before the checkpoint is opened: the name, torchao, a kernel on every execution device.
    quantizer = _quantizer(model, groups, main_device, dtype, quantization, quantization_skip_modules)
    resolved = resolve_checkpoint(checkpoint)
    if quantizer is not None:
        _refuse_prequantized(resolved.root, ())  # a `quantization_config` in its config.json
    with CheckpointReader(resolved) as opened:
        if quantizer is not None:  # an already quantized checkpoint fails here, not on its first odd shape
            _refuse_prequantized(resolved.root, opened)  # the checkpoint's own names and dtypes (headers only)
        # A transformers model reads the checkpoint through its own conversion rules (renames, merged experts): the
        # keys are then its names. The per-tensor transform (quantization) applies after this, to model tensors.
        reader = converted_source(model, opened, key_prefix)
        plan = _plan(groups, reader, dtype, key_prefix)
        if reader is not opened:  # a checkpoint of another class or revision fails here, before any placement
            reader.check_fit(_missing_parameters(groups, plan), plan.unexpected)
        if quantizer is not None:
            plan.transform = quantizer
            plan.transformed = {i for i in plan.sources if quantizer.selects(groups[i].name)}
        if strict and (plan.missing or plan.unexpected):
            raise RuntimeError(_strict_message(plan, key_prefix))
        writes = _needs_writes(groups, plan, reader)
        if writes and offload_folder is None:
            raise ValueError(
                f"`device_map` puts {_modules_of(writes)} on \"disk\", but their weights cannot be referenced in "
                "place (the checkpoint is not safetensors, or `dtype` converts them, or they are quantized, or "
                "transformers' conversion rules build them from several checkpoint tensors). Pass `offload_folder=` "
                "(a folder with room for them) so they are written there once."
            )
        identity = source_identity(opened.handles.values()) if writes else None
        store = OffloadFolder(offload_folder, identity, defer_checks=True) if writes else nullcontext()
        # The restore wraps the folder: an error the folder raises on exit (its manifest on a full disk) still puts the
        # model back as it was, like any failure part way. The checksums of reused files are not waited for here: each
        # module waits for those of its own files before its first forward, which refuses a mismatch naming the file.
        with restored_on_error(model), store:
            if writes:
                _ensure_room(store, groups, plan, reader)
            for index, key in plan.sources.items():
                if index in plan.transformed:
                    read = partial(_cast_source, reader, key, plan.dtypes[index])
                    place_transformed(
                        groups[index], key, read, plan.dtypes[index], plan.transform, pin, store, main_device
                    )
                else:
                    _load_group(groups[index], key, reader, plan.dtypes[index], pin, store)
                if progress is not None:
                    progress(key, reader.spec(key).nbytes)
            _place_unloaded(model, groups, plan, pin)
            if plan.transform is not None and hasattr(plan.transform, "finish"):
                plan.transform.finish(model)  # e.g. Conv1D modules computing with their quantized weight
        if writes and store.pending:  # reused files still being checked: each module waits for its own at first use
            wait_on_first_use(groups, store.pending)
        _report_unplaced(reader, plan, progress)
    _log_unused(model, plan.unexpected, resolved.root, key_prefix)
    return plan.missing, plan.unexpected


def _ensure_room(store: OffloadFolder, groups: list[TensorGroup], plan: _Plan, reader: CheckpointReader) -> None:
    """Fail before placing anything when the offload folder's disk cannot hold the tensors still to be written."""
    nbytes = files = 0
    for index, key in plan.sources.items():
        spec, dtype, group = reader.spec(key), plan.dtypes[index], groups[index]
        if index in plan.transformed:
            form = plan.transform.form
            if group.target != DISK or store.has(group.name, spec.shape, dtype, key=key, form=form):
                continue
            nbytes += plan.transform.stored_nbytes(group.name)
        elif group.target != DISK or _in_place(spec, dtype) or store.has(group.name, spec.shape, dtype, key=key):
            continue
        else:
            nbytes += spec.numel * dtype.itemsize
        files += 1
    store.ensure_space(nbytes, files=files)


def _plan(groups: list[TensorGroup], reader: CheckpointReader, dtype, key_prefix: str) -> _Plan:
    """Match checkpoint keys to groups; check shapes and dtypes. Raises ``ValueError`` listing every mismatch."""
    by_name = {name: i for i, g in enumerate(groups) if g.persistent for name in g.names}
    plan = _Plan()
    for key in reader.keys():  # file order: each shard is read once, front to back
        index = by_name.get(key_prefix + key)
        if index is None:
            plan.unexpected.append(key)
        elif index not in plan.sources:  # a tied group is read once, from the first alias present
            plan.sources[index] = key
    plan.missing = [n for i, g in enumerate(groups) if g.persistent and i not in plan.sources for n in g.names]
    problems = []
    for index, key in plan.sources.items():
        group, spec = groups[index], reader.spec(key)
        target = _target_dtype(group.tensor.dtype, spec.dtype, dtype)
        plan.dtypes[index] = target
        if tuple(spec.shape) != tuple(group.tensor.shape):
            problems.append(
                f"`{key}`: checkpoint shape {list(spec.shape)}, model `{group.name}` shape {list(group.tensor.shape)}"
            )
        elif not (spec.dtype == target or torch.can_cast(spec.dtype, target)):
            problems.append(f"`{key}`: checkpoint dtype {spec.dtype} cannot be cast to {target} (model `{group.name}`)")
    if problems:
        raise ValueError(
            f"Checkpoint {str(reader.checkpoint.root)!r} does not fit the model:\n  " + "\n  ".join(problems)
            + "\nBuild the model from the configuration that matches this checkpoint (or fix `key_prefix`)."
        )
    return plan


def _report_unplaced(reader: CheckpointReader, plan: _Plan, progress: Optional[Callable[[str, int], None]]) -> None:
    """Report the keys that placed nothing (unexpected, or a second alias of tied weights), so the bytes add up."""
    if progress is None:
        return
    placed = set(plan.sources.values())
    for key in reader.keys():
        if key not in placed:
            progress(key, reader.spec(key).nbytes)


def _log_unused(model: nn.Module, unexpected: list[str], root: Path, key_prefix: str) -> None:
    """Log once (a warning) the checkpoint tensors the model never used, with their count and the first names.

    A transformers model's ``_keys_to_ignore_on_load_unexpected`` (e.g. GPT-2's old ``attn.bias`` masks) are left out,
    as transformers does."""
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unused = [key for key in unexpected if not any(p.search(key) for p in ignore)]
    if not unused:
        return
    shown = ", ".join(unused[:5]) + (f", ... ({len(unused) - 5} more)" if len(unused) > 5 else "")
    prefix = f" with `key_prefix`={key_prefix!r}" if key_prefix else ""
    _log.warning(
        "%d tensor(s) of checkpoint %r match no parameter or buffer of the model%s and were not loaded: %s. "
        "Check that the model matches the checkpoint (or `key_prefix`); pass strict=True to refuse.",
        len(unused), str(root), prefix, shown,
    )


def _target_dtype(model_dtype: torch.dtype, checkpoint_dtype: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None and model_dtype.is_floating_point and checkpoint_dtype.is_floating_point:
        return dtype
    return model_dtype


def _strict_message(plan: _Plan, key_prefix: str) -> str:
    parts = ["Error(s) in loading state_dict (strict=True):"]
    if plan.missing:
        parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in plan.missing) + ".")
    if plan.unexpected:
        parts.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in plan.unexpected) + ".")
    parts.append(f"(`key_prefix`={key_prefix!r} is prepended to checkpoint keys.) Pass strict=False to load anyway.")
    return "\n\t".join(parts)


def _in_place(spec: TensorSpec, dtype: torch.dtype) -> bool:
    return spec.is_safetensors and spec.dtype == dtype


def _needs_writes(groups: list[TensorGroup], plan: _Plan, reader: CheckpointReader) -> list[TensorGroup]:
    return [
        groups[i]
        for i, key in plan.sources.items()
        if groups[i].target == DISK and (i in plan.transformed or not _in_place(reader.spec(key), plan.dtypes[i]))
    ]


def _modules_of(groups: list[TensorGroup]) -> list[str]:
    modules = sorted({name.rpartition(".")[0] or "<root>" for g in groups for name in g.names[:1]})
    return modules if len(modules) <= 8 else modules[:8] + [f"... ({len(modules) - 8} more)"]


def _missing_parameters(groups: list[TensorGroup], plan: _Plan) -> list[str]:
    return [g.name for i, g in enumerate(groups) if g.is_param and i not in plan.sources]


def _owned_cpu(reader: CheckpointReader, key: str, dtype: torch.dtype) -> torch.Tensor:
    """``key`` on the CPU in ``dtype``, owning its memory: one copy (cast included) of a borrowed tensor; none of a
    tensor the source built for this call (``is_fresh``: a converted one), which is only cast if needed."""
    fresh = getattr(reader, "is_fresh", None)
    return reader.borrow(key).to(dtype=dtype, copy=not (fresh is not None and fresh(key)))


def _cpu_source(reader: CheckpointReader, key: str) -> torch.Tensor:
    """The cheapest CPU tensor holding ``key``, to copy or convert from: no anonymous copy of the source."""
    return reader.borrow(key)


def _cast_source(reader: CheckpointReader, key: str, dtype: torch.dtype) -> torch.Tensor:
    """``key`` as a CPU tensor of ``dtype``: the borrowed source itself when no cast is needed (no copy)."""
    return _cpu_source(reader, key).to(dtype)


def _load_group(group: TensorGroup, key: str, reader: CheckpointReader, dtype: torch.dtype, pin, store) -> None:
    """Read ``key`` into ``group``'s place; ``pin`` is the GPU pinned RAM copies feed (``pin_host``), or ``None``."""
    target, spec = group.target, reader.spec(key)
    if target == DISK:
        if _in_place(spec, dtype):
            tensor = reader.mmap_view(key)
        elif store.has(group.name, spec.shape, dtype, key=key):
            tensor = store.view(group.name)
        else:
            tensor = store.write(group.name, _cpu_source(reader, key).to(dtype), key=key)
        tensor = mark_disk(tensor)
    elif is_gpu(target):
        source = _cpu_source(reader, key)
        if dtype.itemsize < source.element_size():  # narrow on the host: the GPU never holds the wider copy
            source = source.to(dtype)
        tensor = source.to(target, copy=True).to(dtype)
    elif pin:
        tensor = pinned_empty(spec.shape, dtype, pin).copy_(_cpu_source(reader, key))  # at its size, no rounding
    elif _in_place(spec, dtype):
        # CPU execution: a safetensors tensor needing no cast stays a copy-on-write view of the file (no second copy,
        # loading touches no page), its pages locked as the first forward faults them in: the kernel never evicts what
        # the CPU budget keeps in RAM (an anonymous copy where locking is refused).
        tensor = keep_resident(reader.mmap_view(key))
    elif (pickled := _pickle_in_place(reader, key, spec, dtype)) is not None:
        tensor = pickled  # a .bin/.pt tensor used as torch.load(mmap=True) mapped it: no anonymous copy
    else:
        tensor = _owned_cpu(reader, key, dtype)  # one copy at most, cast included
    install(group, tensor)


def _pickle_in_place(reader: CheckpointReader, key: str, spec: TensorSpec, dtype: torch.dtype):
    """A pickle-shard tensor needing no cast, to use as it is on the CPU, or ``None``: a view of the shard's memory map
    (``torch.load(mmap=True)``, copy-on-write, pages locked as they fault in, like a safetensors view), or a tensor
    the unmapped (legacy format) load made that owns its whole storage. Anything else is copied."""
    if spec.is_safetensors or spec.dtype != dtype or getattr(reader, "is_fresh", None) is not None:
        return None
    source = reader.borrow(key)
    if is_file_backed(source):
        # Tracked like a safetensors map: the first forward of the dispatched model copies it with pread
        # (`CopiesOnFirstUse`), so a shard truncated or rewritten under the job is an error naming it, never SIGBUS.
        track_storage(source, reader.handle(key))
        return keep_resident(source)
    whole = source.untyped_storage().nbytes() == source.numel() * source.element_size()
    return source if whole and source.is_contiguous() else None


def _refuse_prequantized(root: Path, reader) -> None:
    from lightning_bigmodel.integrations.quantization.prequantized import check_not_prequantized

    keys = [(key, reader.spec(key).dtype) for key in reader.keys()] if reader else []
    check_not_prequantized(root, keys, str(root))


def _quantizer(model: nn.Module, groups: list[TensorGroup], main_device, dtype, quantization, skip_modules):
    """The quantizing transform for this load (``None`` when none is asked), checked against the model's devices."""
    if quantization is None and not skip_modules:
        return None
    from lightning_bigmodel.integrations.quantization.quantizer import build_quantizer

    devices = {g.name: compute_device(g, main_device) for g in groups}
    dtypes = {g.name: _target_dtype(g.tensor.dtype, g.tensor.dtype, dtype) for g in groups}  # float weights: cast
    return build_quantizer(model, quantization, skip_modules, devices, dtypes)


def _place_unloaded(model: nn.Module, groups: list[TensorGroup], plan: _Plan, pin: bool) -> None:
    """Move tensors the checkpoint did not hold to their place; materialise meta buffers; check no meta is left.

    Parameters absent from the checkpoint stay on meta (they are in ``missing_keys``). Real tensors absent from it
    keep their values; a ``"disk"`` one is kept in RAM (there is no file to reference).
    """
    unloaded = [g for i, g in enumerate(groups) if i not in plan.sources]
    if any(g.tensor.is_meta and not g.is_param for g in unloaded):
        from lightning_bigmodel.init import materialize_meta_buffers

        materialize_meta_buffers(model, torch.device("cpu"))
        for group in unloaded:
            if not group.is_param:
                module, attr = group.slots[0]
                group.tensor = module._buffers[attr]
    for group in unloaded:
        tensor, target = group.tensor, group.target
        if tensor.is_meta:
            continue
        target = torch.device("cpu") if target == DISK else target
        if not is_at(tensor, target, pin):
            install(group, to_host(tensor, pin) if target.type == "cpu" else tensor.to(target))
    missing = set(plan.missing)
    stray = [g.name for g in unloaded if g.tensor.is_meta and g.name not in missing]
    if stray:
        raise RuntimeError(
            f"Tensors {stray} are still on meta after loading and are in no checkpoint. Re-create them after loading."
        )
