"""The per-tensor transform hook of the streaming load: a model tensor, once read and cast, becomes its stored form.

:func:`~lightning_bigmodel.checkpoint.loading.load_checkpoint_in_model` reads each checkpoint tensor, casts it to the
model's dtype on the CPU and places it. A :class:`TensorTransform` sits between the cast and the placement for the
tensors it :meth:`~TensorTransform.selects`: it turns one tensor into the form the model stores and computes with
(quantization does: a float weight becomes an ``Int8Tensor``), one tensor at a time, so peak memory stays about one
tensor. A transformed tensor has no bytes in the checkpoint: when it is planned for ``"disk"`` its parts are written
once to the offload folder, keyed by :attr:`~TensorTransform.form` so that a folder written with another transform
(or none) is rewritten, not reused.

This is the only contract loading knows; integrations (``lightning_bigmodel.integrations``) implement it and are
imported lazily. It concerns model tensors after the cast: mapping checkpoint keys and tensors onto model names
(renames, merges) happens before it, on the reading side.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from lightning_bigmodel._accelerator import is_gpu
from lightning_bigmodel.offload.placement import DISK, TensorGroup, install, mark_disk, to_host

__all__ = ["TensorTransform", "compute_device", "place_transformed"]


@runtime_checkable
class TensorTransform(Protocol):
    """Turns selected model tensors into their stored form while loading (see the module docstring).

    Attributes:
        form: JSON-able identity of the stored form (e.g. ``{"quantization": "int8", ...}``): offload-folder entries
            are reused only when it matches.
    """

    form: dict[str, Any]

    def selects(self, name: str) -> bool:
        """Whether the model tensor ``name`` (its first name, for tied tensors) is transformed."""
        ...

    def stored_nbytes(self, name: str) -> int:
        """Bytes the transformed tensor ``name`` occupies (for planning and the offload folder's room check)."""
        ...

    def convert(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The stored form of ``tensor`` (a CPU tensor in the target dtype) for a tensor computing on ``device``."""
        ...

    def to_parts(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Plain tensors and JSON metadata that :meth:`from_parts` turns back into ``tensor`` (for offload files)."""
        ...

    def from_parts(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        """Inverse of :meth:`to_parts`; ``parts`` may be memory-mapped views (they are used, not copied)."""
        ...


def compute_device(group: TensorGroup, main_device: torch.device) -> torch.device:
    """Where ``group`` computes: its GPU, else (``"cpu"``/``"disk"`` targets) the main execution device."""
    target = group.target
    return target if isinstance(target, torch.device) and is_gpu(target) else main_device


def place_transformed(
    group: TensorGroup,
    key: str,
    read: Callable[[], torch.Tensor],
    dtype: torch.dtype,
    transform: TensorTransform,
    pin: bool,
    store: Any,
    main_device: torch.device,
) -> None:
    """Transform one tensor and install it at its target in its stored form.

    ``read()`` gives the tensor cast to ``dtype`` on the CPU (read only when needed). A ``"disk"`` tensor becomes
    memory-mapped views of its parts in the offload folder ``store``: reused when a previous run wrote them with the
    same ``transform.form`` from the same checkpoint key, else written now.
    """
    target = group.target
    if target == DISK and store.has(group.name, group.tensor.shape, dtype, key=key, form=transform.form):
        parts, meta = store.view_parts(group.name)
        install(group, mark_disk(transform.from_parts(parts, meta)))
        return
    tensor = transform.convert(group.name, read(), compute_device(group, main_device))
    if target == DISK:
        parts, meta = transform.to_parts(tensor)
        views = store.write_parts(group.name, parts, tensor, transform.form, meta, key=key)
        tensor = mark_disk(transform.from_parts(views, meta))
    elif is_gpu(target):
        tensor = tensor.to(target)
    else:
        tensor = to_host(tensor.to("cpu"), pin)
    install(group, tensor)
