"""Write a model or state dict as shards plus an index."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Mapping, Union

import torch
from torch import nn

from lightning_bigmodel._atomic import atomic_write
from lightning_bigmodel._keywords import keyword_only

SAFE_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
SAFE_INDEX, BIN_INDEX, PLAIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json", "index.json"
_OUR_SHARD = re.compile(r"^(model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin)$")


def _unique_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors to save: aliases (tied weights) once under their first name; each one contiguous, owning
    exactly its own storage (safetensors refuses shared storage, ``torch.save`` would write whole storages)."""
    meta = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise ValueError(
            f"Cannot save tensors on the meta device (they hold no values): {meta[:10]}"
            f"{' ...' if len(meta) > 10 else ''}. Load or materialise the model first."
        )
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"State dict entry {key!r} is a {type(tensor).__name__}, not a tensor; only tensors are saved.")
        tensor = tensor.detach()
        alias = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape,
                 tensor.stride(), tensor.dtype)  # fmt: skip
        if tensor.numel() and alias in seen:
            continue  # a tied weight: the loader re-ties it
        seen.add(alias)
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        out[key] = tensor
    return out


def _split(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += tensor.nbytes
    return shards


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a half-written ``path``."""
    atomic_write(path, write, sync_folder=True)


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, safe: bool) -> None:
    tensors = {key: tensor.cpu() for key, tensor in tensors.items()}  # one shard in host memory at a time
    if safe:
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    else:
        _atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _write_json(obj: object, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove shards and indexes of an earlier save (our naming only) so the folder resolves to this save."""
    for path in folder.iterdir():
        ours = _OUR_SHARD.match(path.name) or path.name in (SAFE_SINGLE, BIN_SINGLE, SAFE_INDEX, BIN_INDEX, PLAIN_INDEX)
        if ours and path.name not in keep and path.is_file():
            path.unlink()


@keyword_only((("max_shard_size", "max_shard_size"), ("safe_serialization", "safe_serialization")))
def save_sharded_checkpoint(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    folder: Union[str, Path],
    *,
    max_shard_size: Union[int, str] = "5GB",
    safe_serialization: bool = True,
    index_format: Literal["hf", "plain"] = "hf",
) -> Path:
    """Write shards and an index into ``folder``; return the index path (or the single file when one shard).

    Shards are named as Hugging Face does (``model-00001-of-00003.safetensors`` / ``pytorch_model-00001-of-00003.bin``;
    a single shard is ``model.safetensors`` / ``pytorch_model.bin``). ``index_format="hf"`` writes
    ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``)
    when there are several shards; ``"plain"`` always writes ``index.json`` (``{name: file}``). Tied tensors are saved
    once, under their first name. Files are written atomically; shards of an earlier save in ``folder`` are removed.

    Raises:
        ValueError: a tensor is on the meta device, or ``index_format`` is unknown.
    """
    from lightning_bigmodel.planning.sizes import parse_size

    if index_format not in ("hf", "plain"):
        raise ValueError(f"`index_format` is {index_format!r}; choose 'hf' or 'plain'.")
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"`max_shard_size` is {max_shard_size!r}; it must be positive, e.g. '5GB'.")
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    tensors = _unique_tensors(state)
    shards = _split(tensors, max_bytes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    n = len(shards)
    names = [f"{prefix}.{ext}"] if n == 1 else [f"{prefix}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]
    for shard, name in zip(shards, names):
        _write_shard(shard, folder / name, safe_serialization)
    weight_map = {key: name for shard, name in zip(shards, names) for key in shard}
    if index_format == "plain":
        result = folder / PLAIN_INDEX
        _write_json(weight_map, result)
    elif n > 1:
        result = folder / (SAFE_INDEX if safe_serialization else BIN_INDEX)
        total = sum(t.nbytes for t in tensors.values())
        _write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, result)
    else:
        result = folder / names[0]
    _remove_stale(folder, set(names) | {result.name})
    return result
