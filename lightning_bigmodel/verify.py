"""Check a dispatched model's outputs against a CPU reference, module by module, on one batch.

:func:`verify_outputs` runs a call (the first batch, or a probe) through the dispatched model, recording the output of
every *unit* (each module of ``no_split_module_classes``, and each other module that holds tensors of its own), then
runs the same call again on the CPU through the same modules with every dispatch hook set aside: each unit's
parameters are read from the checkpoint just before its forward and dropped after it, so at most one block (plus
the tensors of its enclosing modules) is in RAM, never the whole model. The outputs are compared unit by unit in
execution order; the first one whose error exceeds its dtype's tolerance is reported with the device it ran on.
Wrong outputs of a split model (a stale offloaded copy, a missed synchronisation, mixed devices) show up as the first
unit that diverges while everything before it matches.

Cost: one extra forward of one batch on the CPU, in the model's dtype, plus that batch's unit outputs kept in RAM.
Buffers are taken as they were before the dispatched call (a forward that mutates one sees the same value twice).
Quantized weights are not supported (the reference would be the float checkpoint).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel.checkpoint.reader import CheckpointReader
from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint
from lightning_bigmodel.integrations.transformers import converted_source
from lightning_bigmodel.offload.hooks import move_to
from lightning_bigmodel.offload.placement import dispatched_modules, main_device_of, owner_key
from lightning_bigmodel.offload.subclass import is_wrapped

__all__ = ["TOLERANCES", "Divergence", "VerifyReport", "verify_dispatch", "verify_outputs"]

# Relative error allowed per output dtype: max |dispatched - reference| / max |reference| (GPU kernels, TF32 and
# accumulation order differ from the CPU's; a stale or misplaced weight gives errors of order 1).
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)  # fmt: skip


@dataclass
class Divergence:
    """The first unit whose output differs from the reference beyond its tolerance."""

    name: str  # module name ("" is the root)
    kind: str  # its class name
    call: int  # which call of it (0: its first forward in the batch)
    device: str  # where it ran in the dispatched model
    max_abs: float
    relative: float
    tolerance: float
    dtype: str


@dataclass
class VerifyReport:
    """What :func:`verify_outputs` compared: ``checked`` unit outputs, the ``first`` divergence (``None``: all
    match), and the largest relative error seen among the matching ones."""

    checked: int
    first: Optional[Divergence]
    worst_relative: float = 0.0

    @property
    def ok(self) -> bool:
        return self.first is None

    def __str__(self) -> str:
        if self.first is None:
            return (
                f"verify: the {self.checked} module outputs of the dispatched model match the CPU reference "
                f"(largest relative error {self.worst_relative:.2g})."
            )
        d = self.first
        where = f"`{d.name or '<root>'}` ({d.kind}, call {d.call + 1})"
        return (
            f"verify: module {where} on {d.device} diverges from the CPU reference: max abs error {d.max_abs:.3g}, "
            f"relative {d.relative:.3g} > {d.dtype} tolerance {d.tolerance:g}; every module before it matches. Its "
            "weights or inputs on that device are wrong (e.g. a stale offloaded copy or a missed synchronisation)."
        )


def verify_dispatch(
    model: nn.Module,
    checkpoint: Union[str, Path],
    *args: Any,
    key_prefix: str = "",
    no_split_module_classes: Optional[Sequence[str]] = None,
    tolerances: Optional[Mapping[torch.dtype, float]] = None,
    **kwargs: Any,
) -> VerifyReport:
    """Compare ``model(*args, **kwargs)`` (dispatched) with the CPU reference streamed from ``checkpoint``.

    Inputs are used as given for the dispatched call and moved to the CPU for the reference. See
    :func:`verify_outputs` for the other arguments.
    """
    report, _ = verify_outputs(
        model, checkpoint, lambda: model(*args, **kwargs), lambda: model(*move_to(args, _CPU), **move_to(kwargs, _CPU)),
        key_prefix=key_prefix, no_split_module_classes=no_split_module_classes, tolerances=tolerances,
    )  # fmt: skip
    return report


def verify_outputs(
    model: nn.Module,
    checkpoint: Union[str, Path],
    run: Callable[[], Any],
    reference_run: Callable[[], Any],
    *,
    key_prefix: str = "",
    no_split_module_classes: Optional[Sequence[str]] = None,
    tolerances: Optional[Mapping[torch.dtype, float]] = None,
) -> tuple[VerifyReport, Any]:
    """Run ``run()`` (calls the dispatched ``model``, or modules of it, on the probe) and ``reference_run()`` (the same
    call with its inputs on the CPU); return the report and what ``run()`` returned.

    Args:
        model: the dispatched model (or a module holding it, e.g. a LightningModule).
        checkpoint: the checkpoint it was loaded from (model name = ``key_prefix`` + checkpoint key).
        no_split_module_classes: class names compared (and streamed) as one unit; default: every module holding
            tensors of its own is a unit.
        tolerances: relative tolerance per output dtype, merged over :data:`TOLERANCES`.

    Raises:
        ValueError: a quantized weight (no float reference), or a parameter the checkpoint does not hold.
    """
    units = _units(model, set(no_split_module_classes or ()))
    _refuse_quantized(model)
    buffers = {id(b): b.detach().to(_CPU, copy=True) for b in model.buffers()}  # values before the call
    dispatched: dict[str, list] = {}
    handles = [m.register_forward_hook(_recorder(dispatched, n)) for n, (m, _) in units.items()]
    try:
        with torch.inference_mode():
            output = run()
    finally:
        for handle in handles:
            handle.remove()
    reference: dict[str, list] = {}
    order: list[tuple[str, int]] = []
    with CheckpointReader(resolve_checkpoint(checkpoint)) as opened:
        source = converted_source(model, opened, key_prefix)
        keys = _checkpoint_keys(model, source, key_prefix)
        with _hooks_set_aside(model), torch.inference_mode():
            for name, (module, slots) in units.items():
                loader = _Loader(slots, source, keys, buffers)
                module.register_forward_pre_hook(loader.load)
                module.register_forward_hook(_recorder(reference, name, order, loader.unload))
            reference_run()
    limits = {**TOLERANCES, **(tolerances or {})}
    return _compare(model, units, dispatched, reference, order, limits), output


_CPU = torch.device("cpu")


def _units(model: nn.Module, no_split: set[str]) -> dict[str, tuple[nn.Module, list[tuple[str, nn.Module, str, bool]]]]:
    """``{name: (module, slots)}``: each no-split module with every tensor under it, and each other module outside
    them with its own tensors; a slot is ``(tensor name, owning module, attribute, is_parameter)``."""
    units: dict = {}
    blocks: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b}.") or b == "" for b in blocks):
            continue
        if type(module).__name__ in no_split:
            blocks.append(name)
            members = module.named_modules(prefix=name, remove_duplicate=False)
        else:
            members = [(name, module)]
        slots = [
            (f"{prefix}.{attr}" if prefix else attr, owner, attr, kind == "_parameters")
            for prefix, owner in members
            for kind in ("_parameters", "_buffers")
            for attr, tensor in getattr(owner, kind).items()
            if tensor is not None
        ]
        if slots:
            units[name] = (module, slots)
    return units


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [name for name, p in model.named_parameters() if is_wrapped(p)]
    if quantized:
        raise ValueError(
            f"verify compares with the checkpoint's float weights, but {len(quantized)} weight(s) are quantized (e.g. "
            f"{quantized[0]!r}): their outputs differ by design. Verify the dispatch without `quantization`."
        )


def _checkpoint_keys(model: nn.Module, source, key_prefix: str) -> dict[int, str]:
    """``{id(parameter): checkpoint key}`` (tied parameters share one entry)."""
    by_name = {key_prefix + key: key for key in source.keys()}
    keys: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in by_name:
            keys.setdefault(id(param), by_name[name])
    missing = [name for name, param in model.named_parameters() if id(param) not in keys]
    if missing:
        raise ValueError(
            f"verify streams the reference from the checkpoint, which holds no tensor for {missing[:5]} (with "
            f"`key_prefix`={key_prefix!r}). Pass the checkpoint the model was loaded from (and its `key_prefix`)."
        )
    return keys


class _Loader:
    """Pre/post hooks of one unit in the reference pass: its parameters from the checkpoint, its buffers as they
    were before the dispatched call, all on the CPU; the dispatched tensors put back afterwards."""

    def __init__(self, slots, source, keys: dict[int, str], buffers: dict[int, torch.Tensor]) -> None:
        self.slots, self.source, self.keys, self.buffers = slots, source, keys, buffers
        self.saved: list[list] = []  # a stack: a unit called inside its own forward

    def load(self, module: nn.Module, args) -> None:
        saved = []
        for _, owner, attr, is_param in self.slots:
            table = owner._parameters if is_param else owner._buffers
            current = table[attr]
            saved.append((table, attr, current))
            if is_param:
                weight = self.source.borrow(self.keys[id(current)]).to(_CPU, current.dtype, copy=True)
                table[attr] = nn.Parameter(weight, requires_grad=False)
            else:
                table[attr] = self.buffers.get(id(current), current).to(_CPU, copy=True)
        self.saved.append(saved)

    def unload(self) -> None:
        for table, attr, tensor in reversed(self.saved.pop()):
            table[attr] = tensor


def _recorder(store: dict[str, list], name: str, order: Optional[list] = None, after: Optional[Callable] = None):
    def record(module: nn.Module, args, output) -> None:
        tensors: list[torch.Tensor] = []
        _collect(output, tensors)
        calls = store.setdefault(name, [])
        if order is not None:
            order.append((name, len(calls)))
        calls.append(tensors)
        if after is not None:
            after()

    return record


def _collect(obj: Any, out: list[torch.Tensor]) -> None:
    """CPU copies of the tensors in ``obj`` (nested tuples, lists, dicts such as transformers' ``ModelOutput``),
    depth first; other objects (a KV cache) are skipped. Nothing is rebuilt: the output is left as it is."""
    if isinstance(obj, torch.Tensor):
        out.append(obj.detach().to(_CPU, copy=True))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, out)


@contextmanager
def _hooks_set_aside(model: nn.Module) -> Iterator[None]:
    """Every module's forward hooks (the dispatch's included) are put aside; the ones added inside are dropped."""
    saved = [(module, name, module.__dict__[name]) for module in model.modules() for name in _HOOK_DICTS]
    for module, name, _ in saved:
        module.__dict__[name] = OrderedDict()
    try:
        yield
    finally:
        for module, name, hooks in saved:
            module.__dict__[name] = hooks


def _compare(model, units, dispatched, reference, order, limits) -> VerifyReport:
    checked, worst = 0, 0.0
    for name, call in order:
        got = dispatched.get(name, [])
        if call >= len(got):
            continue  # a call the dispatched run did not make (e.g. a data-dependent branch): nothing to compare
        for ours, ref in zip(got[call], reference[name][call]):
            if not (ref.is_floating_point() and ours.shape == ref.shape):
                mismatch = ours.shape != ref.shape or not torch.equal(ours, ref.to(ours.dtype))
                error = (float("inf"), float("inf")) if mismatch else (0.0, 0.0)
            else:
                diff = (ours.double() - ref.double()).abs().max().item() if ours.numel() else 0.0
                scale = ref.double().abs().max().item() if ref.numel() else 0.0
                error = (diff, diff / max(scale, 1e-12))
            limit = limits.get(ref.dtype, 0.0)
            if error[1] > limit or error[1] != error[1]:  # NaN counts as a divergence
                kind = type(units[name][0]).__name__
                found = Divergence(name, kind, call, _device_of(model, name), *error, limit, str(ref.dtype)[6:])
                return VerifyReport(checked, found, worst)
            worst = max(worst, error[1])
            checked += 1
    return VerifyReport(checked, None, worst)


def _device_of(model: nn.Module, name: str) -> str:
    """Where unit ``name`` ran: its map entry's GPU, or ``"cpu"``/``"disk"`` and the device that computed it."""
    for prefix, root in dispatched_modules(model):
        if prefix and not (name == prefix or name.startswith(prefix + ".")):
            continue
        device_map = getattr(root, "hf_device_map", {})
        relative = name[len(prefix) + 1 :] if prefix else name
        key = owner_key(relative, device_map)
        if key is None:
            continue
        value, main = device_map[key], main_device_of(root)
        if isinstance(value, int) or (isinstance(value, str) and value not in ("cpu", "disk")):
            return str(torch.device(main.type, value) if isinstance(value, int) and main is not None else value)
        return f'"{value}" (computed on {main})' if main is not None else f'"{value}"'
    return "an unmapped device"
