"""Empty (meta) initialisation, and materialising what a checkpoint does not hold."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Parameters created inside land on ``meta``; buffers stay real unless ``include_buffers=True``.

    Ties made inside (by assignment or ``tie_weights()``) survive. Nothing stays patched after exit.
    """
    raise NotImplementedError
    yield


def materialize_meta_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give every buffer still on meta its real value on ``device`` (values recorded by ``init_empty_weights``).

    Returns the names materialised; raises ``RuntimeError`` naming buffers whose value is unknown.
    """
    raise NotImplementedError
