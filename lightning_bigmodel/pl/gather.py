"""Gather predictions of data-parallel ranks: split batches into samples, merge by dataset index, regroup.

Used by :class:`~lightning_bigmodel.pl.replicas.ReplicatedBigModelStrategy` (``gather="batches"``/``"samples"``) and
usable on its own after ``trainer.predict`` on every rank (:func:`gather_predictions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from torch import Tensor

__all__ = ["gather_predictions", "merge_by_index", "rebatch", "unbatch"]


def _is_batched(x: Any, n: int) -> bool:
    if isinstance(x, Tensor):
        return x.dim() > 0 and x.shape[0] == n
    if isinstance(x, Mapping):
        return bool(x) and all(_is_batched(v, n) for v in x.values())
    if isinstance(x, (list, tuple)):
        return (bool(x) and all(_is_batched(v, n) for v in x)) or len(x) == n
    return False


def _rebuild(like: Any, values: list) -> Any:
    return type(like)(*values) if hasattr(like, "_fields") else type(like)(values)


def unbatch(prediction: Any, n: int) -> list[Any]:
    """Split the prediction of a batch of ``n`` samples into ``n`` per-sample predictions.

    Tensors are split along dim 0; dicts, tuples and lists of batched values are split element-wise; another list or
    tuple of length ``n`` is taken as one item per sample.

    Raises:
        ValueError: when ``prediction`` has no batch dimension of size ``n``.
    """
    if isinstance(prediction, Tensor) and _is_batched(prediction, n):
        return list(prediction.unbind(0))
    if isinstance(prediction, Mapping) and _is_batched(prediction, n):
        columns = {key: unbatch(value, n) for key, value in prediction.items()}
        return [type(prediction)({key: col[i] for key, col in columns.items()}) for i in range(n)]
    if isinstance(prediction, (list, tuple)) and prediction and all(_is_batched(v, n) for v in prediction):
        columns = [unbatch(value, n) for value in prediction]
        return [_rebuild(prediction, [col[i] for col in columns]) for i in range(n)]
    if isinstance(prediction, (list, tuple)) and len(prediction) == n:
        return list(prediction)
    shape = tuple(prediction.shape) if isinstance(prediction, Tensor) else type(prediction).__name__
    raise ValueError(
        f"Cannot split a prediction of {shape} into {n} samples: `predict_step` must return a tensor with the batch "
        "first, or a dict/tuple/list of those (or a list with one item per sample) for predictions to be gathered. "
        "Pass `ReplicatedBigModelStrategy(gather='none')` and a prediction writer instead."
    )


def _stack(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(items)
    if isinstance(first, Mapping):
        return type(first)({key: _stack([item[key] for item in items]) for key in first})
    if isinstance(first, (list, tuple)) and all(isinstance(x, type(first)) and len(x) == len(first) for x in items):
        return _rebuild(first, [_stack(list(column)) for column in zip(*items)])
    return list(items)


def merge_by_index(parts: Sequence[tuple[Sequence[int], Any]]) -> list[Any]:
    """Per-sample predictions in dataset-index order from ``(batch_indices, batch_prediction)`` pairs of any ranks.

    An index seen twice (a ``DistributedSampler`` pads ranks with repeated samples) is kept once: exactly once.
    """
    samples: dict[int, Any] = {}
    for indices, prediction in parts:
        for index, sample in zip(indices, unbatch(prediction, len(indices))):
            samples.setdefault(int(index), sample)
    return [samples[index] for index in sorted(samples)]


def rebatch(samples: Sequence[Any], batch_size: int) -> list[Any]:
    """Regroup per-sample predictions into batches of ``batch_size`` (tensors stacked, as a one-process run returns).

    Raises:
        ValueError: when the samples of one batch have different shapes (return ``"samples"`` instead).
    """
    batches = []
    for start in range(0, len(samples), batch_size):
        try:
            batches.append(_stack(list(samples[start : start + batch_size])))
        except RuntimeError as err:
            raise ValueError(f"Samples {start}..{start + batch_size - 1} cannot be stacked: {err}") from err
    return batches


def gather_predictions(
    predictions: Sequence[Any],
    batch_indices: Sequence[Sequence[int]],
    batch_size: Optional[int] = None,
    dst: int = 0,
    group: Optional[Any] = None,
) -> Optional[list[Any]]:
    """Collect every rank's batch predictions on rank ``dst``, in dataset-index order, each sample exactly once.

    Every rank of ``group`` must call it. Objects travel with ``gather_object`` (pickled; only ``dst`` holds them
    all). Without an initialised process group it merges locally.

    Args:
        predictions: this rank's predictions, one per batch (e.g. what ``trainer.predict`` returned on it).
        batch_indices: the global dataset indices of each of those batches.
        batch_size: regroup into batches of this size; ``None`` returns one entry per sample.
        dst: the global rank that receives the result.
        group: the process group (default: the world).

    Returns:
        On ``dst``: the merged list; on other ranks ``None``.
    """
    local = [(list(map(int, idx)), pred) for idx, pred in zip(batch_indices, predictions)]
    if _distributed_is_initialized() and dist.get_world_size(group) > 1:
        parts: Optional[list[Any]] = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
        dist.gather_object(local, parts, dst=dst, group=group)
        if parts is None:
            return None
        local = [pair for part in parts for pair in part]
    samples = merge_by_index(local)
    return samples if batch_size is None else rebatch(samples, batch_size)
