"""Torch-function stand-ins that let a forward run on fake accelerator tensors on a CPU-only build, and count
attention as GPUs run it.

Fake tensors may say ``cuda:k`` on a build without CUDA, and almost every op works on them (the fake kernels run on
meta). Three Python bindings do not: indexing (``t[i]``, ``t[i] = v``), ``contiguous()`` and ``copy_()`` take a
device guard of the tensor's device before dispatching, and a CPU-only build has none for CUDA ("PyTorch is not
linked with support for cuda devices"). :class:`SimulatedFunctions` answers those calls with dispatched ops that need
no guard and allocate what the real call allocates. It also replaces ``F.scaled_dot_product_attention`` (see
:meth:`SimulatedFunctions._attention`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _on_accelerator(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type not in ("cpu", "meta")


def _same_device(what: str, *tensors: Any) -> None:
    """Raise as CUDA does when non-scalar tensors of ``tensors`` sit on different devices."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(devices) > 1:
        shown = " and ".join(sorted(map(str, devices)))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {shown}! ({what})")


def _index_tensors(index: Any) -> list:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return [item for item in items if isinstance(item, torch.Tensor)]


def _host_index(index: Any) -> Any:
    """``index`` with its tensors replaced by meta fakes of the same shape and dtype."""
    if isinstance(index, (tuple, list)):
        return type(index)(_host_index(item) for item in index)
    if isinstance(index, torch.Tensor):
        return torch.empty_strided(index.shape, index.stride(), dtype=index.dtype, device="meta")
    return index


class SimulatedFunctions(TorchFunctionMode):
    """Enter around a forward on fake tensors (inside the ``FakeTensorMode``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if args and _on_accelerator(args[0]):
            if func is torch.Tensor.__getitem__:
                return self._getitem(*args)
            if func is torch.Tensor.__setitem__:
                _same_device("index assignment", args[0], *_index_tensors(args[1]), args[2])
                return None  # values do not exist: nothing to write
            if func is torch.Tensor.contiguous:
                tensor, memory_format = args[0], kwargs.get("memory_format", torch.contiguous_format)
                return tensor if tensor.is_contiguous(memory_format=memory_format) else tensor.clone(memory_format=memory_format)
            if func is torch.Tensor.copy_:
                return args[0]  # in place: no allocation, no values
        return func(*args, **kwargs)

    @staticmethod
    def _getitem(tensor: torch.Tensor, index: Any) -> torch.Tensor:
        """The same indexing on a meta fake of the same layout (meta: not counted) gives the result's layout: a view stays a view of
        ``tensor`` (``as_strided``), a gather is a new tensor on ``tensor``'s device."""
        _same_device("indexing", tensor, *_index_tensors(index))
        host = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        result = host[_host_index(index)]
        if result.untyped_storage() is host.untyped_storage():
            return tensor.as_strided(result.shape, result.stride(), result.storage_offset())
        return torch.empty_strided(result.shape, result.stride(), dtype=result.dtype, device=tensor.device)

    @staticmethod
    def _attention(query, key, value, attn_mask=None, *args, **kwargs) -> torch.Tensor:
        """Only the output of ``F.scaled_dot_product_attention`` is allocated.

        On a GPU (and in torch's CPU kernels) SDPA runs flash or memory-efficient attention, which never holds the
        ``batch x heads x seq x seq`` scores. Under fake tensors on a CPU-only build torch takes its math fallback,
        which does, in float32: a 70B prefill of 8x2048 would show 8.6 GB per layer that no GPU allocates.
        """
        _same_device("scaled_dot_product_attention", query, key, value, attn_mask)
        return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
