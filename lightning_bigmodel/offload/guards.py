"""What a dispatched model refuses (copies, pickling) and what :func:`~lightning_bigmodel.remove_dispatch` restores
(each parameter's ``requires_grad``).

A dispatched model's hooks hold device copies of offloaded weights, a lock, per-thread state and a prefetch thread:
a copy could not share them safely, and a pickle would either fail deep inside (``cannot pickle '_thread.lock'``) or
write every offloaded weight into the pickle. Copying is refused with the way out instead. Loading and dispatch
install parameters with ``requires_grad=False``; the values found before are recorded and put back on removal.
"""

from __future__ import annotations

from typing import Mapping

from torch import nn

from lightning_bigmodel.offload.subclass import is_wrapped

__all__ = ["COPY_REFUSED", "guard_copies", "keep_requires_grad", "requires_grad_of", "unguard_copies"]

COPY_REFUSED = (
    "Cannot copy or pickle a dispatched model (or a module of one): its hooks hold device copies of offloaded "
    "weights, a lock and a prefetch thread. Call `remove_dispatch(model)` first, then copy it (or save "
    "`model.state_dict()`), and dispatch the copy again."
)
_GRADS = "_bigmodel_requires_grad"  # in the model's __dict__: {parameter name: requires_grad} before loading/dispatch
_GUARDS = ("__deepcopy__", "__reduce_ex__", "__reduce__")


def _refuse(*args, **kwargs):
    raise TypeError(COPY_REFUSED)


def requires_grad_of(model: nn.Module) -> dict[str, bool]:
    """``{name: requires_grad}`` of every parameter (tied ones under each name)."""
    return {name: param.requires_grad for name, param in model.named_parameters(remove_duplicate=False)}


def guard_copies(model: nn.Module, grads: Mapping[str, bool]) -> None:
    """Make ``copy.deepcopy``/``copy.copy``/``pickle``/``torch.save`` of ``model`` or any of its modules raise
    :data:`COPY_REFUSED` (they look these methods up on the instance, so the user's classes are not touched), and
    record ``grads`` for :func:`unguard_copies`."""
    for module in model.modules():
        for name in _GUARDS:
            object.__setattr__(module, name, _refuse)
    model.__dict__[_GRADS] = dict(grads)


def keep_requires_grad(model: nn.Module, grads: Mapping[str, bool]) -> None:
    """Record ``grads`` (taken before loading) as what :func:`unguard_copies` restores."""
    if _GRADS in model.__dict__:
        model.__dict__[_GRADS] = dict(grads)


def unguard_copies(model: nn.Module) -> None:
    """Allow copies again and put back each parameter's recorded ``requires_grad`` (float ones; a parameter made
    under ``torch.inference_mode``, which cannot require grad, is replaced by a clone that does)."""
    for module in model.modules():
        for name in _GUARDS:
            if module.__dict__.get(name) is _refuse:
                del module.__dict__[name]
    grads = model.__dict__.pop(_GRADS, {})
    replaced: dict[int, nn.Parameter] = {}  # tied parameters stay one
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            wanted = grads.get(f"{prefix}.{attr}" if prefix else attr)
            if param is None or wanted is None or param.requires_grad == wanted:
                continue
            if wanted and (not param.is_floating_point() or is_wrapped(param)):
                continue  # an integer or quantized weight cannot require grad
            if wanted and param.is_inference():  # made under inference_mode (e.g. a copy at the first forward)
                module._parameters[attr] = replaced.setdefault(id(param), nn.Parameter(param.clone()))
                continue
            param.requires_grad_(wanted)
