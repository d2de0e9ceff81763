"""Empty (meta) initialisation, and materialising what a checkpoint does not hold.

``init_empty_weights`` uses torch's global registration hooks (``register_module_parameter_registration_hook`` and
``register_module_buffer_registration_hook``), removed on exit: nothing is monkeypatched, so a tie made by attribute
assignment inside the context (``self.lm_head.weight = self.wte.weight``) keeps one shared parameter.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

_RECORDED = "_bigmodel_buffer_values"  # module attribute: {buffer name: real CPU value} for meta buffers
_META = torch.device("meta")


class _EmptyInit:
    """State of one active ``init_empty_weights`` context."""

    def __init__(self, include_buffers: bool) -> None:
        self.include_buffers = include_buffers
        # the same real parameter registered twice (a tie made before registration) maps to one meta parameter
        # (keyed by id: tensors compare elementwise, so they cannot be dictionary keys themselves)
        self.replacements: dict[int, tuple[weakref.ref, nn.Parameter]] = {}
        self.modules: weakref.WeakSet = weakref.WeakSet()


_ACTIVE: list[_EmptyInit] = []  # innermost context last; its settings win


def _on_parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
    if not _ACTIVE or param is None or param.is_meta:
        return None  # unchanged: an existing meta parameter keeps its identity, so ties survive
    state = _ACTIVE[-1]
    original, replacement = state.replacements.get(id(param), (None, None))
    if original is None or original() is not param:
        replacement = type(param)(param.data.to(_META), requires_grad=param.requires_grad)
        replacement.__dict__.update(param.__dict__)
        state.replacements[id(param)] = (weakref.ref(param), replacement)
    return replacement


def _on_buffer(module: nn.Module, name: str, buffer: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if not _ACTIVE or not _ACTIVE[-1].include_buffers or buffer is None or buffer.is_meta:
        return None
    recorded = module.__dict__.setdefault(_RECORDED, {})
    recorded[name] = buffer.detach().cpu()  # persistence is only known after the hook; pruned on exit
    _ACTIVE[-1].modules.add(module)
    return buffer.to(_META)


def _keep_non_persistent_only(state: _EmptyInit) -> None:
    """Drop recorded values of persistent buffers (the checkpoint holds them): keeps memory small."""
    for module in list(state.modules):
        recorded = module.__dict__.get(_RECORDED, {})
        for name in list(recorded):
            if name not in module._non_persistent_buffers_set:
                del recorded[name]
        if not recorded:
            module.__dict__.pop(_RECORDED, None)


@contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Parameters created inside land on ``meta``; buffers stay real unless ``include_buffers=True``.

    Parameters keep their class and ``requires_grad``. Ties made inside (by assignment or ``tie_weights()``) survive.
    With ``include_buffers=True`` the real values of non-persistent buffers (never in a checkpoint) are recorded so that
    ``materialize_meta_buffers`` can restore them. Contexts nest (the innermost one's ``include_buffers`` applies).
    Nothing stays patched after exit, also when the body raises.

    Example::

        with init_empty_weights():
            model = GPT(config)  # no memory for weights; model.lm_head.weight is model.transformer.wte.weight
    """
    state = _EmptyInit(include_buffers)
    handles = [register_module_parameter_registration_hook(_on_parameter)]
    if include_buffers:
        handles.append(register_module_buffer_registration_hook(_on_buffer))
    _ACTIVE.append(state)
    try:
        yield
    finally:
        _ACTIVE.remove(state)
        for handle in handles:
            handle.remove()
        _keep_non_persistent_only(state)


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device (tied names each listed)."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in tensors if tensor is not None and tensor.is_meta]


def materialize_meta_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give every buffer still on meta its real value on ``device`` (values recorded by ``init_empty_weights``).

    The value is cast to the meta buffer's dtype (so a precision conversion done on the meta model carries over).
    Returns the names materialised; raises ``RuntimeError`` naming buffers whose value is unknown, before changing any.
    """
    todo: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    unknown: list[str] = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        recorded = module.__dict__.get(_RECORDED, {})
        for name, buffer in module._buffers.items():
            if buffer is None or not buffer.is_meta:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if name in recorded:
                todo.append((module, name, full, buffer))
            else:
                unknown.append(full)
    if unknown:
        raise RuntimeError(
            f"Buffers {unknown} are on the meta device and their values are unknown (they were not in the checkpoint "
            "and no value was recorded). Build the model with `init_empty_weights(include_buffers=False)` so buffers "
            "stay real, or load a checkpoint that holds them."
        )
    done = []
    for module, name, full, buffer in todo:
        if module._buffers[name] is buffer:  # a module reachable twice is materialised once
            value = module.__dict__[_RECORDED][name]
            module._buffers[name] = value.to(device=device, dtype=buffer.dtype, copy=True)
            done.append(full)
    return done
