"""ShardedCheckpointIO: the Lightning ``CheckpointIO`` plugin that opens checkpoints lazily, shard by shard.

``Strategy.load_checkpoint`` hands its result to Lightning's migration (which needs
``"pytorch-lightning_version"``) and then to ``Strategy.load_model_state_dict``. Here that result is a small
mutable dict whose ``"state_dict"`` is a :class:`LazyStateDict`: keys come from headers, a tensor is read only
when asked for, and :class:`~lightning_bigmodel.strategy.BigModelInferenceStrategy` streams it straight to
each tensor's device.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _PATH

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from lightning_bigmodel.checkpoint import CheckpointReader, ResolvedCheckpoint, load_checkpoint_in_model, resolve_checkpoint
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.dispatch import dispatch_model, remove_dispatch
from lightning_bigmodel.keys import infer_key_prefix

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
            checkpoints above 1 GiB only (rank zero only).
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
        """Close every checkpoint this plugin opened (views already handed out stay valid)."""
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


# ---------------------------------------------------------------------- streaming a checkpoint into a model
def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule of it) carries the hooks of :func:`~lightning_bigmodel.dispatch_model`."""
    return any(getattr(module, "hf_device_map", None) is not None for module in model.modules())


def release(model: nn.Module) -> None:
    """Remove the dispatch hooks of ``model`` and every dispatched submodule (frees offloaded weights)."""
    for module in [m for m in model.modules() if getattr(m, "hf_device_map", None) is not None]:
        remove_dispatch(module)


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of parameters and buffers that still hold no data (on meta)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]


def load_into(
    model: nn.Module,
    state_dict: Optional[Mapping[str, torch.Tensor]],
    device_map: Mapping[str, Union[int, str]],
    main_device: torch.device,
    dtype: Optional[torch.dtype] = None,
    offload_folder: Optional[Union[str, Path]] = None,
    offload_buffers: bool = False,
    strict: bool = True,
    key_prefix: Optional[str] = None,
    checkpoint_io: Optional[CheckpointIO] = None,
) -> None:
    """Stream ``state_dict`` into ``model`` on the devices of ``device_map``, check nothing is left on meta, dispatch.

    A :class:`LazyStateDict` streams tensor by tensor (``load_checkpoint_in_model``); any other mapping (from another
    ``CheckpointIO``) is copied in on CPU first. ``state_dict=None`` dispatches a model whose weights are already real.
    ``key_prefix=None`` detects the prefix (:func:`~lightning_bigmodel.keys.infer_key_prefix`).

    Raises:
        RuntimeError: keys missing or unexpected under ``strict``, or parameters left on meta (no weights for them).
    """
    if state_dict is not None:
        if key_prefix is None:
            key_prefix = infer_key_prefix(list(state_dict.keys()), list(model.state_dict().keys()))
        if isinstance(state_dict, LazyStateDict):
            _stream(model, state_dict, device_map, dtype, offload_folder, offload_buffers, strict, key_prefix,
                    checkpoint_io)  # fmt: skip
        else:
            _copy_in(model, state_dict, strict, key_prefix)
    left = meta_tensor_names(model)
    if left:
        shown = left[:8] + ([f"... ({len(left) - 8} more)"] if len(left) > 8 else [])
        how = "they are missing from the checkpoint" if state_dict is not None else "no checkpoint was given"
        raise RuntimeError(
            f"{len(left)} tensor(s) of the model hold no weights (still on meta): {shown}; {how}. Pass "
            "`trainer.predict(..., ckpt_path=...)` or `BigModelInferenceStrategy(checkpoint=...)` with a checkpoint "
            "holding them (check `key_prefix` if the names differ)."
        )
    root, root_map = dispatch_root(model, device_map)
    dispatch_model(root, root_map, main_device=main_device, offload_folder=offload_folder,
                   offload_buffers=offload_buffers)  # fmt: skip


def dispatch_root(model: nn.Module, device_map: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The module to dispatch and its map: the single child holding every tensor (``self.model`` of a
    LightningModule, with the map's keys stripped of its name), else ``model`` itself.

    ``predict_step`` usually calls ``self.model(...)`` (or ``self.model.generate``), not the LightningModule's own
    forward, so the root hooks (outputs back to the input's device, prefetch boundaries) belong on that child.
    """
    heads = {key.split(".", 1)[0] for key in device_map}
    child = model._modules.get(next(iter(heads))) if len(heads) == 1 and "" not in device_map else None
    if child is None:
        return model, dict(device_map)
    name = next(iter(heads))
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if any(not tensor_name.startswith(name + ".") for tensor_name, _ in named):
        return model, dict(device_map)
    return child, {key[len(name) + 1 :]: device for key, device in device_map.items()}


def _stream(model, state_dict, device_map, dtype, offload_folder, offload_buffers, strict, key_prefix, io) -> None:
    kwargs: dict[str, Any] = {}
    total = state_dict.nbytes
    show = isinstance(io, ShardedCheckpointIO) and io.show_progress(total)
    bar = _progress_bar(total, enabled=show)
    if bar is not None and "progress" in inspect.signature(load_checkpoint_in_model).parameters:
        kwargs["progress"] = lambda key, nbytes: bar.update(nbytes)
    try:
        load_checkpoint_in_model(
            model,
            state_dict.checkpoint,
            device_map=device_map,
            dtype=dtype,
            offload_folder=offload_folder,
            strict=strict,
            offload_buffers=offload_buffers,
            key_prefix=key_prefix,
            **kwargs,
        )
    finally:
        if bar is not None:
            bar.close()
        state_dict.close()


@rank_zero_only
def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # a dependency of Lightning

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Loading checkpoint")


def _copy_in(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool, key_prefix: str) -> None:
    """Fallback for an in-memory state dict: meta parameters become CPU tensors (ties kept), then a copy."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), param.requires_grad)
                module._parameters[name] = made[id(param)]
    prefixed = {key_prefix + key: value for key, value in state_dict.items()}
    missing, unexpected = model.load_state_dict(prefixed, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"Missing key(s) in state_dict: {missing}. Unexpected key(s) in state_dict: {unexpected}.")
    ids = {id(p) for p in made.values()}
    unloaded = [name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids and name in missing]
    if unloaded:
        raise RuntimeError(f"Parameters {unloaded[:8]} are in no checkpoint; pass a checkpoint holding them.")
