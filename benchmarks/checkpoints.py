"""Build the benchmark checkpoints: a GPT of each size, written as HF-style safetensors and ``.bin`` shards.

The writer is independent of every library under test (plain ``safetensors.torch.save_file`` / ``torch.save``),
so no library reads a format it wrote itself. Tied weights are saved once (``lm_head.weight`` is dropped, as
transformers does). A folder is reused when its ``done.json`` matches the size and shard limit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from examples.gpt import GPT, GPTConfig

FORMATS = ("safetensors", "bin")
_MB = 10**6
_INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}
_STEM = {"safetensors": "model", "bin": "pytorch_model"}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's unique parameters plus all its buffers (what a fully resident model holds)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def shard_limit(nbytes: int) -> int:
    """200 MB shards for models of 500 MB and more (GPT-2 small gets three); about 40% of smaller models."""
    return min(200 * _MB, max(1, math.ceil(nbytes * 0.4)))


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # a tied duplicate (lm_head.weight)
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().clone().contiguous()
    return out


def _plan_shards(state_dict: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(state_dict: dict[str, torch.Tensor], folder: Path, fmt: str, limit: int) -> list[Path]:
    """Write ``state_dict`` as HF-style shards plus index into ``folder``; return the shard paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    groups = _plan_shards(state_dict, limit)
    weight_map, paths = {}, []
    ext = "safetensors" if fmt == "safetensors" else "bin"
    for i, names in enumerate(groups, start=1):
        path = folder / f"{_STEM[fmt]}-{i:05d}-of-{len(groups):05d}.{ext}"
        shard = {name: state_dict[name] for name in names}
        if fmt == "safetensors":
            save_file(shard, str(path), metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        weight_map.update({name: path.name for name in names})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / _INDEX[fmt]).write_text(json.dumps(index, indent=2))
    return paths


def build_checkpoints(size: str, cache: Path, seed: int = 0, shard_bytes: int | None = None) -> dict[str, object]:
    """Return facts about the ``size`` checkpoints under ``cache``, writing them first when missing or stale.

    ``shard_bytes``: the shard limit (default :func:`shard_limit`); another limit gets a folder of its own
    (``<size>-<N>MB``), so the default checkpoints other benchmarks share stay as they are."""
    root = cache / "checkpoints" / (size if shard_bytes is None else f"{size}-{shard_bytes // _MB}MB")
    marker = root / "done.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("size") == size and all(Path(p).exists() for f in FORMATS for p in info["shards"][f]):
            return info
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(size)).eval()
    nbytes = model_bytes(model)
    limit = shard_limit(nbytes) if shard_bytes is None else shard_bytes
    state_dict = _unique_state_dict(model)
    info = {
        "size": size,
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": nbytes,
        "shard_limit": limit,
        "folders": {},
        "shards": {},
    }
    for fmt in FORMATS:
        paths = write_shards(state_dict, root / fmt, fmt, limit)
        info["folders"][fmt] = str(root / fmt)
        info["shards"][fmt] = [str(p) for p in paths]
    marker.write_text(json.dumps(info, indent=2))
    return info
