"""Split the inputs of a call into micro-batches and merge their outputs back (helpers of the pipeline).

Containers are walked recursively: tuples (named ones too), lists, mappings and dataclass instances. Tensors whose
size along ``dim`` equals the batch size are split; other values go whole to every micro-batch. Merging
concatenates tensors along ``dim`` and requires every other value to be equal across micro-batches.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import torch


def _items(obj: Any) -> Optional[tuple[list, list]]:
    """``(keys, values)`` of a container to split or merge, or None for a leaf."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        keys = [f.name for f in dataclasses.fields(obj) if f.init]
        return keys, [getattr(obj, k) for k in keys]
    if isinstance(obj, Mapping):
        return list(obj.keys()), list(obj.values())
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return list(range(len(obj))), list(obj)
    return None


def _rebuild(template: Any, keys: list, values: list) -> Any:
    """A container like ``template`` holding ``values``."""
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **dict(zip(keys, values)))
    if isinstance(template, Mapping):
        if type(template) is dict:
            return dict(zip(keys, values))
        new = copy.copy(template)
        for key, value in zip(keys, values):
            new[key] = value
        return new
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*values)
    return type(template)(values) if isinstance(template, (list, tuple)) else values


def _batch_size(obj: Any, dim: int) -> Optional[int]:
    if isinstance(obj, torch.Tensor):
        return obj.shape[dim] if obj.ndim > dim else None
    items = _items(obj)
    for value in items[1] if items else ():
        size = _batch_size(value, dim)
        if size is not None:
            return size
    return None


def _split(obj: Any, sizes: list[int], batch: int, dim: int) -> list:
    if isinstance(obj, torch.Tensor):
        if obj.ndim > dim and obj.shape[dim] == batch:
            return list(obj.split(sizes, dim))
        return [obj] * len(sizes)
    items = _items(obj)
    if items is None:
        return [obj] * len(sizes)
    keys, values = items
    columns = [_split(value, sizes, batch, dim) for value in values]
    return [_rebuild(obj, keys, [column[i] for column in columns]) for i in range(len(sizes))]


def _split_inputs(args: tuple, kwargs: dict, micro_batches: int, dim: int) -> list[tuple[tuple, dict]]:
    """``[(args, kwargs), ...]``, one per micro-batch, as even as possible and never empty."""
    batch = _batch_size((args, kwargs), dim)
    if batch is None:
        raise ValueError(
            f"No input tensor has a batch dimension `dim={dim}` to split into micro-batches. "
            "Pass the batch as a tensor, or set `dim`."
        )
    n = max(1, min(micro_batches, batch))
    base, extra = divmod(batch, n)
    sizes = [base + 1] * extra + [base] * (n - extra)
    return [(tuple(a), k) for a, k in _split((list(args), kwargs), sizes, batch, dim)]


def _gather(values: list, dim: int, path: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim <= dim:
            raise ValueError(
                f"Cannot concatenate the micro-batches' {path}: a {first.ndim}-d tensor has no batch "
                f"dimension `dim={dim}`. Return per-sample values, or call without micro-batches."
            )
        return torch.cat(values, dim)
    items = _items(first)
    if items is not None:
        keys = items[0]
        columns = [_items(v)[1] for v in values]
        merged = [_gather([c[j] for c in columns], dim, f"{path}[{key!r}]") for j, key in enumerate(keys)]
        return _rebuild(first, keys, merged)
    for value in values[1:]:
        if value is not first and not _equal(value, first):
            raise TypeError(
                f"Cannot merge the micro-batches' {path}: {type(first).__name__} values differ ({first!r:.80} "
                f"vs {value!r:.80}). Only tensors are concatenated; turn this output off (e.g. `use_cache=False`)."
            )
    return first


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False
