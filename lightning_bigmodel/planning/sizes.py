"""Size strings and module sizes (parameters, buffers, tied groups). Pure: reads shapes and dtypes only."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lightning_bigmodel._keywords import keyword_only

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_ACCEPTED_SIZES = (
    'a non-negative int of bytes, or a number with a unit: B, KB/MB/GB/TB (powers of 1000) or '
    'KiB/MiB/GiB/TiB (powers of 1024), e.g. "10GiB", "500MB", "1.5 GiB"'
)

def parse_size(size: Union[int, str]) -> int:
    """Bytes in ``size``: an int, or a string like ``"10GiB"`` (2**30), ``"10GB"`` (10**9), ``"500MB"``, ``"1.5GiB"``.

    Units are case-insensitive and may be separated from the number by spaces; a bare number means bytes.
    Fractional byte counts are rounded down.

    Raises:
        ValueError: for malformed or negative sizes, naming the value and the accepted forms.
    """
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise ValueError(f"Memory size {size!r} is not a size; use {_ACCEPTED_SIZES}.")
    if isinstance(size, (int, float)):
        if size < 0 or size != size or size == float("inf"):
            raise ValueError(f"Memory size {size!r} must be finite and non-negative; use {_ACCEPTED_SIZES}.")
        return int(size)
    if size.strip().startswith("-"):
        raise ValueError(f"Memory size {size!r} is negative; use {_ACCEPTED_SIZES}.")
    match = _SIZE.match(size)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"Memory size {size!r} is malformed; use {_ACCEPTED_SIZES}.")
    number, unit = match.groups()
    return int(Decimal(number) * _UNITS[unit.lower()])  # exact: 0.29GB is 290000000


def _tensor_bytes(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> int:
    if is_traceable_wrapper_subclass(tensor) and not tensor.is_meta:  # e.g. quantized: the bytes it really holds
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name), None) for name in names)
    itemsize = tensor.element_size()
    if dtype is not None and tensor.is_floating_point():
        itemsize = min(itemsize, dtype.itemsize)
    return tensor.numel() * itemsize


def _prefix_sizes(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: Optional[torch.dtype],
    stored: Optional[Mapping[str, int]] = None,
) -> dict[str, int]:
    """Add each tensor's bytes to its own name and every dotted ancestor prefix, ``""`` included; first name wins.
    ``stored`` gives the bytes of tensors that are stored in another form (e.g. quantized), by name."""
    stored = stored or {}
    sizes: dict[str, int] = {"": 0}
    seen: set[int] = set()
    for name, tensor in named_tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = stored[name] if name in stored else _tensor_bytes(tensor, dtype)
        prefix = name
        while prefix:
            sizes[prefix] = sizes.get(prefix, 0) + nbytes
            cut = prefix.rfind(".")
            prefix = prefix[:cut] if cut >= 0 else ""
        sizes[""] += nbytes
    return sizes


@keyword_only((("special_dtypes", None), ("buffers_only", None)))
def compute_module_sizes(
    model: nn.Module,
    dtype: Optional[torch.dtype] = None,
    *,
    quantization: Optional[str] = None,
    quantization_skip_modules: Optional[Sequence[str]] = None,
) -> dict[str, int]:
    """Bytes of parameters and buffers under every module prefix (``""`` is the whole model).

    Keys are every module prefix holding tensors and every tensor name. One pass over ``named_parameters()`` then
    ``named_buffers()``, adding each tensor to all its ancestors, so the cost is linear in the number of tensors.
    A tensor reachable under several names (tied weights, shared modules) is counted once, under the first name
    in that order; its other names do not appear. ``dtype`` models loading in a smaller dtype: a floating-point
    tensor counts ``min(its itemsize, dtype.itemsize)`` bytes per element (it never grows; integer and bool
    tensors keep their size). ``quantization`` (``"int8"``/``"int4"``, see
    :mod:`lightning_bigmodel.integrations.quantization`) counts the weights it would quantize at their quantized
    bytes (data plus scales). A tensor already quantized counts the bytes it holds. Works on meta models.
    """
    named = [*model.named_parameters(), *model.named_buffers()]
    return _prefix_sizes(named, dtype, quantized_bytes(model, quantization, quantization_skip_modules))


def quantized_bytes(
    model: nn.Module, quantization: Optional[str], skip_modules: Optional[Sequence[str]] = None
) -> dict[str, int]:
    """``{weight name: bytes once quantized}`` for the weights ``quantization`` quantizes (``{}`` for ``None``)."""
    if quantization is None and not skip_modules:
        return {}
    from lightning_bigmodel.integrations.quantization.spec import (  # pure: no torchao
        quantized_nbytes,
        quantized_weights,
        resolve_quantization,
    )

    spec = resolve_quantization(quantization, skip_modules)
    return {name: quantized_nbytes(spec, *shape) for name, shape in quantized_weights(model, spec).items()}


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups (of two or more) of parameter names that share one tensor.

    Names in a group follow ``named_parameters(remove_duplicate=False)`` order, so ``group[0]`` is the name that
    owns the tensor in :func:`compute_module_sizes` and in ``state_dict``; groups are ordered by their first name.
    Works on meta models (ties are found by ``Parameter`` identity).
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def compute_buffer_sizes(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, int]:
    """Bytes of buffers under every module prefix (as :func:`compute_module_sizes`, buffers only): what stays on the
    execution device of offloaded modules with ``offload_buffers=False``."""
    return _prefix_sizes(model.named_buffers(), dtype)
