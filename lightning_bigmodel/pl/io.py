"""ShardedCheckpointIO: the Lightning ``CheckpointIO`` plugin that opens checkpoints lazily, shard by shard.

``Strategy.load_checkpoint`` hands its result to Lightning's migration (which needs
``"pytorch-lightning_version"``) and then to ``Strategy.load_model_state_dict``. Here that result is a small
mutable dict whose ``"state_dict"`` is a :class:`LazyStateDict`: keys come from headers, a tensor is read only
when asked for, and :class:`~lightning_bigmodel.pl.strategy.BigModelInferenceStrategy` streams it straight to
each tensor's device (:func:`lightning_bigmodel.pl.loader.load_into`, which also drives the progress bar).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH

from lightning_bigmodel.checkpoint import CheckpointReader, ResolvedCheckpoint, resolve_checkpoint
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint

VERSION_KEY = "pytorch-lightning_version"
EXTRAS_FILE = "lightning_checkpoint.json"  # the non-tensor entries `save_checkpoint` keeps beside the shards
_DROPPED = ("state_dict", "optimizer_states", "lr_schedulers")  # never carried over: inference needs none of them
PROGRESS_THRESHOLD = 2**30  # show a progress bar for checkpoints above 1 GiB (when `progress=None`)


class LazyStateDict(Mapping):
    """Read-only mapping over a checkpoint: ``keys``/``len``/``in`` read headers only; ``[key]`` reads one tensor.

    Attributes:
        reader: the open :class:`~lightning_bigmodel.checkpoint.CheckpointReader` (for streaming).
        checkpoint: the resolved checkpoint (files, index) the reader is over.
    """

    def __init__(self, reader: CheckpointReader) -> None:
        self.reader = reader
        self.checkpoint: ResolvedCheckpoint = reader.checkpoint

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.reader:
            raise KeyError(key)
        return self.reader.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader)

    def __contains__(self, key: object) -> bool:
        return key in self.reader

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor, from the headers."""
        return sum(self.reader.spec(key).nbytes for key in self.reader.keys())

    def close(self) -> None:
        self.reader.close()

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors from {str(self.checkpoint.root)!r})"


class ShardedCheckpointIO(CheckpointIO):
    """Open checkpoints lazily (any layout :func:`~lightning_bigmodel.checkpoint.resolve_checkpoint` accepts, Hub ids
    included) and save sharded safetensors checkpoints.

    Args:
        max_shard_size: largest shard ``save_checkpoint`` writes (``"5GB"``, ``"500MiB"`` or bytes).
        safe_serialization: save safetensors shards (``False``: ``.bin`` pickles).
        progress: show a progress bar while a checkpoint streams in: ``True``, ``False``, or ``None`` for
            checkpoints above 1 GiB only (rank zero only; tqdm when importable, else a line every 10%).
    """

    def __init__(
        self,
        max_shard_size: Union[int, str] = "5GB",
        safe_serialization: bool = True,
        progress: Optional[bool] = None,
    ) -> None:
        self.max_shard_size = max_shard_size
        self.safe_serialization = safe_serialization
        self.progress = progress
        self._open: list[LazyStateDict] = []

    def load_checkpoint(
        self, path: _PATH, map_location: Optional[Any] = None, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        """Open ``path`` lazily: ``{"pytorch-lightning_version": ..., "state_dict": LazyStateDict, ...}``.

        ``map_location`` is ignored (the strategy places each tensor on its planned device) and pickles are always
        read with ``weights_only=True``. A Lightning ``.ckpt`` keeps its other top-level entries (its version, epoch,
        loops, callbacks, hyper-parameters) when they load with ``weights_only=True``; optimizer states are dropped.
        """
        reader = CheckpointReader(resolve_checkpoint(path))
        state_dict = LazyStateDict(reader)
        self._open.append(state_dict)
        checkpoint: dict[str, Any] = {VERSION_KEY: pl.__version__}
        checkpoint.update(_extras(reader.checkpoint))
        checkpoint["state_dict"] = state_dict
        return checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint["state_dict"]`` as sharded safetensors into the folder ``path`` (plus its index), and its
        JSON-serialisable top-level entries (the Lightning version, epoch, ...) into ``lightning_checkpoint.json``."""
        if storage_options is not None:
            raise TypeError(f"`ShardedCheckpointIO.save_checkpoint` takes no `storage_options`, got {storage_options!r}.")
        state_dict = checkpoint["state_dict"]
        on_meta = [name for name, tensor in state_dict.items() if tensor.is_meta]
        if on_meta:
            raise RuntimeError(
                f"Cannot save {len(on_meta)} tensor(s) that hold no data (on the meta device), e.g. {on_meta[:3]}. "
                "Save the checkpoint of a model whose weights are loaded, e.g. before dispatching it."
            )
        folder = Path(path)
        save_sharded_checkpoint(
            state_dict, folder, max_shard_size=self.max_shard_size, safe_serialization=self.safe_serialization
        )
        extras = {key: value for key, value in checkpoint.items() if key not in _DROPPED and _jsonable(value)}
        (folder / EXTRAS_FILE).write_text(json.dumps(extras, indent=2))

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove a checkpoint folder written by :meth:`save_checkpoint` (or a single file)."""
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def show_progress(self, total_bytes: int) -> bool:
        """Whether to show a progress bar for streaming ``total_bytes``."""
        return bool(self.progress) if self.progress is not None else total_bytes > PROGRESS_THRESHOLD

    def teardown(self) -> None:
        """Close every checkpoint this plugin opened and still holds (views already handed out stay valid: the
        disk-offloaded weights of a dispatched model keep their own memory maps)."""
        for state_dict in self._open:
            state_dict.close()
        self._open.clear()


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _extras(resolved: ResolvedCheckpoint) -> dict[str, Any]:
    """Top-level non-tensor entries of a Lightning checkpoint (``.ckpt`` file or a folder saved by this plugin)."""
    saved = resolved.root / EXTRAS_FILE
    if resolved.index is not None or len(resolved.files) != 1:
        return _read_json(saved)
    file = resolved.files[0]
    if file.suffix.lower() != ".ckpt":
        return _read_json(saved) if file.parent == resolved.root else {}
    try:
        obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - entries we cannot load safely are simply not carried over
        return {}
    if not isinstance(obj, Mapping):
        return {}
    extras = {key: value for key, value in obj.items() if key not in _DROPPED}
    if not isinstance(extras.get(VERSION_KEY, ""), str):
        extras.pop(VERSION_KEY)
    return extras


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
