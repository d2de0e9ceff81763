"""Weights stored as tensor subclasses (e.g. quantized weights): their inner tensors, bytes, pinning and file form.

A quantized weight (a torchao ``Int8Tensor``, say) is a *traceable wrapper subclass*: a tensor that reports the
logical shape and dtype of the weight and holds plain inner tensors (``qdata``, ``scale``, ...). Placement must move,
pin, size and store the inner tensors, never the logical tensor: copying it into a plain tensor would dequantize it.
Everything here goes through PyTorch's own protocol (``__tensor_flatten__`` / ``__tensor_unflatten__``), so it needs
no import of the library that defined the subclass.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = [
    "copy_to", "decode_context", "encode_context", "inner_tensors", "is_pinned", "is_wrapped", "map_inner",
    "plain_parts", "stored_nbytes",
]


def is_wrapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a wrapper subclass holding inner tensors (a ``Parameter`` of one counts too)."""
    return is_traceable_wrapper_subclass(tensor)


def inner_tensors(tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
    """``({name: inner tensor}, context)`` of a wrapper subclass; nested subclasses are not supported."""
    names, context = tensor.__tensor_flatten__()
    parts = {name: getattr(tensor, name) for name in names}
    nested = [name for name, part in parts.items() if is_wrapped(part)]
    if nested:
        raise TypeError(f"{type(tensor).__name__} holds nested tensor subclasses {nested}; they cannot be placed.")
    return parts, context


def map_inner(tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A tensor of ``tensor``'s class whose inner tensors are ``fn(inner)`` (e.g. moved, pinned, copied)."""
    parts, context = inner_tensors(tensor)
    rebuilt = {name: fn(part) for name, part in parts.items()}
    return type(tensor).__tensor_unflatten__(rebuilt, context, tensor.shape, tensor.stride())


def is_pinned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (every inner tensor, for a wrapper subclass) is in pinned memory."""
    if is_wrapped(tensor):
        return all(is_pinned(part) for part in inner_tensors(tensor)[0].values())
    return tensor.is_pinned()


def plain_parts(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``tensor``'s data: itself, or a wrapper subclass's inner tensors (for calls such as
    ``record_stream`` that a subclass may not implement)."""
    return list(inner_tensors(tensor)[0].values()) if is_wrapped(tensor) else [tensor]


def copy_to(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` on ``device``; a wrapper subclass is copied part by part (torchao's own ``.to`` accepts no
    ``non_blocking``), keeping its class."""
    if is_wrapped(tensor):
        return map_inner(tensor, lambda part: copy_to(part, device, non_blocking))
    return tensor.to(device, non_blocking=non_blocking, copy=True)


def stored_nbytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` really occupies: its inner tensors' for a wrapper subclass, else ``numel * element_size``."""
    if is_wrapped(tensor):
        return sum(stored_nbytes(part) for part in inner_tensors(tensor)[0].values())
    return tensor.numel() * tensor.element_size()


def encode_context(context: Any) -> Any:
    """A JSON value for a flatten context made of ``None``, bools, numbers, strings, dtypes, lists and dicts.

    Raises:
        TypeError: the context holds something else (it cannot be written to an offload folder's manifest).
    """
    if context is None or isinstance(context, (bool, int, float, str)):
        return context
    if isinstance(context, torch.dtype):
        return {"__dtype__": str(context).removeprefix("torch.")}
    if isinstance(context, (list, tuple)):
        return [encode_context(item) for item in context]
    if isinstance(context, dict) and all(isinstance(key, str) for key in context):
        if "__dtype__" in context:
            raise TypeError("a context key named '__dtype__' cannot be stored")
        return {key: encode_context(value) for key, value in context.items()}
    raise TypeError(f"cannot store a {type(context).__name__} ({context!r}) in an offload manifest")


def decode_context(value: Any) -> Any:
    """Inverse of :func:`encode_context` (tuples come back as lists)."""
    if isinstance(value, list):
        return [decode_context(item) for item in value]
    if isinstance(value, dict):
        if set(value) == {"__dtype__"}:
            dtype = getattr(torch, value["__dtype__"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {value['__dtype__']!r} in an offload manifest")
            return dtype
        return {key: decode_context(item) for key, item in value.items()}
    return value
