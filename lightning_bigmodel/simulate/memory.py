"""Peak memory per device of a planned model, by running it on fake tensors (shapes and dtypes only, no compute).

:func:`simulate_memory` swaps every parameter and buffer of the (meta) model for a fake tensor on the device its map
entry gives (``cuda:k``, ``cpu``; ``"disk"`` weights are fake CPU tensors counted under ``"disk"``), attaches hooks that
do what the dispatch hooks do to memory (inputs moved to each module's device, offloaded weights staged on the
execution GPU, the next offloaded layer prefetched there, outputs returned to the input's device), runs a forward and
optionally a decode loop, and records the live bytes of every device over time (:class:`LiveBytes`). Fake tensors
carry ``cuda:k`` on a CPU-only build of torch, and a forward that mixes devices fails here as it would on GPUs.
The model is left exactly as it was.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from lightning_bigmodel.offload.attach import _entries_by_unit  # the real dispatch's choice of hooks and staged tensors
from lightning_bigmodel.offload.placement import (
    DISK,
    assign_targets,
    install,
    is_dispatched,
    mark_disk,
    tensor_groups,
)
from lightning_bigmodel.planning.device_map import check_device_map, execution_device, normalize_device
from lightning_bigmodel.planning.devices import stream_unit_of
from lightning_bigmodel.simulate._live import Label, LiveBytes
from lightning_bigmodel.simulate._fake_ops import SimulatedFunctions
from lightning_bigmodel.simulate._staging import attach_memory_hooks

__all__ = ["parse_input_shape", "simulate_memory"]


def parse_input_shape(text: Union[str, Sequence[int]]) -> tuple[int, ...]:
    """``"4x2048"`` -> ``(4, 2048)`` (batch x sequence length); a sequence of ints is checked and returned as a tuple.

    Raises:
        ValueError: naming the value, unless it is positive integers joined by ``x`` (or ``,``).
    """
    parts = text.lower().replace(",", "x").split("x") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(str(part).strip()) for part in parts)
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape) or isinstance(text, bool):
        raise ValueError(
            f"`input_shape={text!r}` does not parse: give positive integers joined by 'x', e.g. '4x2048' "
            "(batch x sequence length)."
        )
    return shape


def simulate_memory(
    model: nn.Module,
    device_map: Mapping[str, Union[int, str]],
    example_inputs: Any,
    max_new_tokens: int = 0,
    dtype: Optional[torch.dtype] = None,
    offload_buffers: bool = False,
    stream_pool: bool = False,
) -> dict[Label, dict[str, int]]:
    """Weights and peak live bytes per device of ``model`` dispatched as ``device_map``, over a forward of
    ``example_inputs`` and ``max_new_tokens`` decode steps.

    Nothing is computed and no weight is read: ``model`` may be the meta skeleton (it must not be dispatched), and
    only the shapes and dtypes of ``example_inputs`` matter (a tensor, or a tuple of them; e.g. token ids of shape
    ``(batch, seq)``). Inputs start on the main execution device (the lowest GPU of the map, else CPU), as
    :class:`~lightning_bigmodel.BigModelInferenceStrategy` puts batches.

    Counted per device, over time: the weights placed there (``"disk"`` weights stay under ``"disk"``); activations;
    the staged copies of ``"cpu"``/``"disk"`` layers on the execution GPU, with the next offloaded layer prefetched
    beside the current one, and disk reads staged in host RAM; on a CPU execution device, the disk layer computing
    and the one read ahead of it, or with ``stream_pool`` the disk stream's whole buffer pool (from the first disk
    layer on, as every forward after the first holds it: what a detected CPU budget holds, where an explicit one has
    the stream on top); outputs returned to the input's device. With ``max_new_tokens``, the decode of ``generate``: a transformers model runs its own KV
    cache (prefill with ``use_cache=True``, then one token per step with ``past_key_values``, logits of the last
    position only); any
    other module re-runs the whole sequence, grown by one token per step (its first input's dim 1), and since that
    step's memory only grows with the length, the last step (``seq + max_new_tokens``) stands for the loop.
    Scaled dot-product attention is counted as the fused kernels a GPU runs (no ``seq x seq`` score matrix).

    Args:
        model: the model, on meta or real devices, not dispatched.
        device_map: ``{module_name: gpu_index | "cpu" | "disk"}`` covering every parameter and buffer.
        example_inputs: positional inputs of ``model``'s forward (tensors; other values pass through).
        max_new_tokens: decode steps after the forward (0: the forward only).
        dtype: count floating-point weights in this dtype (as :func:`~lightning_bigmodel.compute_module_sizes`).
        offload_buffers: as in :func:`~lightning_bigmodel.dispatch_model`.
        stream_pool: count the disk stream's whole buffer pool on a CPU execution device (see above).

    Returns:
        ``{device: {"weights": bytes, "peak": bytes}}`` for every device holding weights or activations; devices are
        GPU indices (ascending), then ``"cpu"``, then ``"disk"``.

    Raises:
        ValueError: a dispatched model, a bad device map, a negative ``max_new_tokens``, or inputs that are not tensors.
        RuntimeError: the forward mixes devices, or reads tensor values (which fake tensors do not have).
    """
    if is_dispatched(model):
        raise ValueError(
            "`simulate_memory` needs the model before `dispatch_model` (e.g. the meta skeleton): this one is "
            "dispatched. Call `remove_dispatch(model)` first or simulate the skeleton."
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens={max_new_tokens!r}` must be an int >= 0.")
    check_device_map(model, device_map)
    normalized = {key: normalize_device(value) for key, value in device_map.items()}
    inputs = _as_tuple(example_inputs)
    main = execution_device(device_map)  # the planned execution device (a GPU, or the CPU), else the lowest GPU
    live = LiveBytes()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _slots_restored(model), ExitStack() as stack:
        stack.enter_context(fake_mode)
        groups = tensor_groups(model)
        assign_targets(groups, normalized, main, offload_buffers)
        weights = _place_fakes(groups, dtype, live)
        units, by_unit = _entries_by_unit(model, groups, normalized, main)
        stack.callback(_remove, attach_memory_hooks(model, units, by_unit, groups, main, normalized, stream_pool,
                                                     stream_unit_of(device_map)))
        stack.enter_context(live)
        fakes = tuple(_fake_like(x, main) for x in inputs)
        stack.enter_context(SimulatedFunctions())
        stack.enter_context(torch.no_grad())
        _run(model, fakes, max_new_tokens, live)
    return _report(weights, live.peak)


def _as_tuple(example_inputs: Any) -> tuple:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError(
            f"`example_inputs` holds no tensor ({type(example_inputs).__name__}): pass a tensor or a tuple of tensors "
            "with the shapes and dtypes of a batch, e.g. `torch.zeros(4, 2048, dtype=torch.long)`."
        )
    return tuple(inputs)


def _fake_like(value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty(value.shape, dtype=value.dtype, device=device)


@contextmanager
def _slots_restored(model: nn.Module) -> Iterator[None]:
    """Put every parameter and buffer slot of ``model`` back as it was on exit (the fakes never leak out)."""
    saved = [(store, dict(store)) for module in model.modules() for store in (module._parameters, module._buffers)]
    try:
        yield
    finally:
        for store, before in saved:
            store.clear()
            store.update(before)


def _place_fakes(groups, dtype: Optional[torch.dtype], live: LiveBytes) -> dict[Label, int]:
    """Install a fake tensor at each group's target (disk: a CPU fake counted under ``"disk"``); bytes per device."""
    weights: dict[Label, int] = {}
    for group in groups:
        tensor, target = group.tensor, group.target
        smaller = dtype is not None and tensor.is_floating_point() and dtype.itemsize < tensor.element_size()
        fake_dtype = dtype if smaller else tensor.dtype
        device = torch.device("cpu") if target == DISK else target
        fake = torch.empty(tensor.shape, dtype=fake_dtype, device=device)
        label: Label = DISK if target == DISK else (target.index or 0) if target.type != "cpu" else "cpu"
        if target == DISK:
            mark_disk(fake)
        fake = install(group, fake)
        live.add(fake, label)
        weights[label] = weights.get(label, 0) + fake.numel() * fake.element_size()
    return weights


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def _is_transformers(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__) and hasattr(
        model, "generation_config"
    )


def _run(model: nn.Module, inputs: tuple, max_new_tokens: int, live: LiveBytes) -> None:
    try:
        if _is_transformers(model):
            _decode_with_cache(model, inputs, max_new_tokens, live)
        else:
            _decode_without_cache(model, inputs, max_new_tokens)
    except (DataDependentOutputException, DynamicOutputShapeException) as err:
        raise RuntimeError(
            f"The forward of {type(model).__name__} reads tensor values ({err.func}), which a memory simulation "
            "(fake tensors: shapes only) cannot do. Simulate a module whose forward does not branch on values."
        ) from None


def _decode_without_cache(model: nn.Module, inputs: tuple, max_new_tokens: int) -> None:
    output = model(*inputs)
    if max_new_tokens == 0:
        return
    del output
    first = next(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor))
    ids = inputs[first]
    if ids.dim() < 2:
        raise ValueError(
            f"`max_new_tokens={max_new_tokens}` needs a first input of shape (batch, seq, ...) to grow; got shape "
            f"{tuple(ids.shape)}."
        )
    shape = (ids.shape[0], ids.shape[1] + max_new_tokens, *ids.shape[2:])
    grown = torch.empty(shape, dtype=ids.dtype, device=ids.device)
    model(*inputs[:first], grown, *inputs[first + 1 :])


def _decode_with_cache(model: nn.Module, inputs: tuple, max_new_tokens: int, live: LiveBytes) -> None:
    """``generate``'s memory: prefill with the model's KV cache, then one token per step, last-position logits only.

    The live bytes of decode step ``k`` are those after step ``k - 1`` (the cache of ``seq + k - 1`` tokens, grown
    by one token per layer) plus one token's activations, so they grow with ``k``: the last step is the largest. It
    is reached without running the steps before it: a prefill of ``seq + max_new_tokens - 1`` tokens, with peaks
    paused, leaves the same cache (one tensor per layer and K/V, of that length, on that layer's device) behind.
    """
    ids, rest = inputs[0], inputs[1:]
    if max_new_tokens == 0:
        model(*inputs)
        return
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    kwargs: dict[str, Any] = {"use_cache": True}
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    model(ids, *rest, **kwargs)  # the prefill, with its cache (dropped at once)
    length = ids.shape[1] + max_new_tokens - 1
    with live.peaks_paused():
        ids = torch.empty((ids.shape[0], length), dtype=ids.dtype, device=ids.device)  # prompt + tokens so far
        output = model(ids, **kwargs)
        cache, logits = getattr(output, cache_arg), getattr(output, "logits", None)
        del output
    if logits is not None:
        scores = logits[:, -1, :].to(torch.float32, copy=True)  # what generate keeps of each step
        del logits
        next_ids = scores.argmax(dim=-1, keepdim=True).to(ids.dtype)
        del scores
    else:
        next_ids = torch.empty((ids.shape[0], 1), dtype=ids.dtype, device=ids.device)
    ids = torch.cat([ids, next_ids.to(ids.device)], dim=-1)
    model(next_ids, **{cache_arg: cache}, **kwargs)  # the last decode step


def _report(weights: Mapping[Label, int], peak: Mapping[Label, int]) -> dict[Label, dict[str, int]]:
    labels = set(weights) | set(peak)
    ordered = sorted(label for label in labels if isinstance(label, int)) + [l for l in ("cpu", DISK) if l in labels]
    return {
        label: {"weights": weights.get(label, 0), "peak": max(peak.get(label, 0), weights.get(label, 0))}
        for label in ordered
    }
