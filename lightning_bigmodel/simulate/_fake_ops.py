"""Torch-function stand-ins that let a forward run on fake accelerator tensors on a CPU-only build, and count
attention as GPUs run it.

Fake tensors may say ``cuda:k`` on a build without CUDA, and almost every op works on them (the fake kernels run on
meta). A few Python bindings do not: indexing (``t[i]``, ``t[i] = v``), ``~t``, ``contiguous()``, ``copy_()``,
``split()``, ``new_tensor()``... take a device guard of the tensor's device before dispatching, and a CPU-only build has
none for CUDA ("PyTorch is not linked with support for cuda devices"). :class:`SimulatedFunctions` retries such a call
on meta stand-ins of the same layout and maps the results back: a result sharing a stand-in's storage becomes the same
view of the original tensor (``as_strided``), any other result a new tensor on the original's device, so the call
allocates what the real one does. It also replaces ``F.scaled_dot_product_attention`` (see
:meth:`SimulatedFunctions._attention`).

On a build with CUDA the same bindings take a real device guard: ``cudaSetDevice(k)``, which creates a context of
about 0.5 GB on GPU ``k``, or fails with "invalid device ordinal" past the GPUs this machine has. Planning must have no
side effects on any build, so the bindings known to take a guard (:data:`_GUARDED`) never see a fake accelerator
tensor: they run on the meta stand-ins directly. Any other call failing for want of a device (the texts of
:data:`_NO_DEVICE`) is retried the same way. Mixed devices raise CUDA's "Expected all tensors to be on the same device"
whatever the torch release words it as (torch 2.11: "Unhandled FakeTensor Device Propagation ... found two different
devices").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

# What a binding raises when it cannot take the device guard of a fake tensor's device: no guard in this build, or (a
# CUDA build) a device this machine lacks, or no usable driver at all.
_NO_DEVICE = (
    "is not linked with support for",
    "invalid device ordinal",
    "no CUDA-capable device",
    "Found no NVIDIA driver",
    "CUDA driver initialization failed",
)
_READS_VALUES = {"__bool__", "__float__", "__index__", "__int__", "item", "nonzero", "tolist"}
# Python bindings that take a device guard of their tensor before dispatching (torch/csrc/autograd's variable methods
# and indexing): with a fake tensor on a real accelerator that would switch (and create a context on) that device.
_GUARDED = {
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.__invert__, torch.Tensor.contiguous,
    torch.Tensor.copy_, torch.Tensor.new_tensor, torch.Tensor.new,
}  # fmt: skip
_MIXED = ("Unhandled FakeTensor Device Propagation", "found two different devices")


def _on_accelerator(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type not in ("cpu", "meta")


def _mixed_devices_error(err: RuntimeError) -> RuntimeError:
    """``err``, or CUDA's wording of it when it is fake-tensor device propagation refusing two devices (torch 2.11)."""
    text = str(err)
    if not all(part in text for part in _MIXED):
        return err
    op = text.split(" for ", 1)[-1].split(",", 1)[0]
    devices = text.rsplit("devices", 1)[-1].strip(" .").replace(",", " and")
    return RuntimeError(
        f"Expected all tensors to be on the same device, but found at least two devices, {devices}! ({op})"
    )


def _same_device(what: str, tensors: list) -> None:
    """Raise as CUDA does when non-scalar accelerator tensors sit on different devices."""
    devices = {t.device for t in tensors if _on_accelerator(t) and t.dim() > 0}
    if len(devices) > 1:
        shown = " and ".join(sorted(map(str, devices)))
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but found at least two devices, {shown}! ({what})"
        )


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``tensor``'s layout over a storage of the same size (offsets and views line up)."""
    elements = max(tensor.untyped_storage().nbytes() // tensor.element_size(), 1)
    base = torch.empty(elements, dtype=tensor.dtype, device="meta")
    return base.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def _on_meta(func, args: tuple, kwargs: dict) -> Any:
    """``func`` run on meta stand-ins of every tensor argument; results mapped back onto the accelerator."""
    name = getattr(func, "__name__", str(func))
    if name in _READS_VALUES:
        raise RuntimeError(f"The forward reads tensor values ({name}), which a memory simulation cannot do.")
    tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    _same_device(name, tensors)
    device = next(t.device for t in tensors if _on_accelerator(t))
    stand_ins: list[tuple[torch.Tensor, torch.Tensor]] = []

    def to_meta(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        meta = _meta_like(value)
        stand_ins.append((value, meta))
        return meta

    out = func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))

    def back(result: Any) -> Any:
        if not isinstance(result, torch.Tensor):
            return result
        for original, meta in stand_ins:
            if result is meta:
                return original
            if result.untyped_storage() is meta.untyped_storage():
                return original.as_strided(result.shape, result.stride(), result.storage_offset())
        return torch.empty_strided(result.shape, result.stride(), dtype=result.dtype, device=device)

    return tree_map(back, out)


class SimulatedFunctions(TorchFunctionMode):
    """Enter around a forward on fake tensors (inside the ``FakeTensorMode``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func in _GUARDED and any(_on_accelerator(leaf) for leaf in tree_leaves((args, kwargs))):
            return _on_meta(func, args, kwargs)  # never the real device guard (see the module's docstring)
        try:
            return func(*args, **kwargs)
        except RuntimeError as err:
            if not any(text in str(err) for text in _NO_DEVICE):
                mixed = _mixed_devices_error(err)
                if mixed is err:
                    raise
                raise mixed from None
        return _on_meta(func, args, kwargs)  # the binding needed a device guard it could not take: no dispatch happened

    @staticmethod
    def _attention(query, key, value, attn_mask=None, *args, **kwargs) -> torch.Tensor:
        """Only the output of ``F.scaled_dot_product_attention`` is allocated.

        On a GPU (and in torch's CPU kernels) SDPA runs flash or memory-efficient attention, which never holds the
        ``batch x heads x seq x seq`` scores. Under fake tensors on a CPU-only build torch takes its math fallback,
        which does, in float32: a 70B prefill of 8x2048 would show 8.6 GB per layer that no GPU allocates.
        """
        _same_device("scaled_dot_product_attention", [query, key, value, attn_mask])
        return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
