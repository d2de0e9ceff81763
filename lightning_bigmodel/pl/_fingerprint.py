"""What decides a prediction job's outputs, recorded in its folder's manifest so a rerun that is another job refuses.

A fingerprint is a dict of parts, each a small JSON value:

- ``"module"``: the LightningModule's class and its hyperparameters (``save_hyperparameters``), or, for a module
  without any, its attributes named like an ``__init__`` argument and of plain types (numbers, strings, lists);
- ``"precision"``: the Trainer's precision, the strategy's ``dtype``, ``quantization`` and skipped modules;
- ``"checkpoint"``: the ``ckpt_path`` (or the strategy's ``checkpoint``) as an absolute path plus a digest of its
  files' identities, the one offload folders record (:func:`~lightning_bigmodel.offload.disk.source_identity`: size,
  inode, device, ctime, mtime and safetensors header of each; a Hub id that is no local path is kept as given);
- ``"data"``: the dataset's length and a hash of its samples as ``dataset[i]`` returns them (all of them for a list
  or tuple, such as ``TransformersModule``'s prompts; else up to 16 evenly spaced ones, first and last included).

Parts are compared where both sides have them (the checkpoint and data parts are known only once the model is
loaded and the dataloader exists); :func:`describe_change` names what changed in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

_PLAIN = (str, int, float, bool, type(None))
_MAX_REPR = 120  # longer values are kept as a hash (a list of 10k prompts does not go into the manifest)
_SPOT_CHECKS = 16
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _value(value: Any) -> Any:
    """A JSON value standing for ``value``: itself when short and plain, else a digest of it."""
    if isinstance(value, _PLAIN):
        if not isinstance(value, str) or len(value) <= _MAX_REPR:
            return value
    text = repr(value) if _is_plain_tree(value) else None
    if text is not None and len(text) <= _MAX_REPR:
        return text
    digest = hashlib.sha256()
    _feed(digest, value)
    return f"<{type(value).__name__}, sha256 {digest.hexdigest()[:16]}>"


def _is_plain_tree(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_tree(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain_tree(v) for k, v in value.items())
    return False


def _feed(digest: Any, obj: Any) -> None:
    """Hash ``obj`` by content: tensors by dtype, shape and bytes; containers element by element; else its repr."""
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (bytes, bytearray)):
        digest.update(b"B%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        digest.update(b"S%d:" % len(raw) + raw)
    elif isinstance(obj, Mapping):
        digest.update(b"M%d" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(b"L%d" % len(obj))
        for item in obj:
            _feed(digest, item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        digest.update(type(obj).__qualname__.encode())
        _feed(digest, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif hasattr(obj, "__array__") and hasattr(obj, "dtype"):  # numpy arrays and the like
        _feed(digest, torch.as_tensor(obj.__array__()))
    else:  # numbers, None, enums, PIL images ...: repr without memory addresses (they change between runs)
        digest.update(_ADDRESS.sub("", f"{type(obj).__qualname__}:{obj!r}").encode())


def module_part(pl_module: Any, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The module's class and its init arguments (hyperparameters, or plain attributes named like them), less
    ``ignore``."""
    hparams = dict(getattr(pl_module, "hparams", None) or {})
    if not hparams:  # no `save_hyperparameters`: the attributes named like an `__init__` argument, of plain types
        arguments = inspect.signature(type(pl_module).__init__).parameters
        own = vars(pl_module)
        hparams = {name: own[name] for name in arguments if name in own and _is_plain_tree(own[name])}
    cls = type(pl_module)
    kept = {k: _value(v) for k, v in sorted(hparams.items()) if k not in ignore}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **kept}


def precision_part(trainer: Any) -> dict[str, Any]:
    strategy = trainer.strategy
    return {
        "precision": str(getattr(trainer, "precision", None)),
        "dtype": str(getattr(strategy, "dtype", None)),
        "quantization": _value(getattr(strategy, "quantization", None)),
        "quantization_skip_modules": _value(getattr(strategy, "quantization_skip_modules", None)),
    }


def checkpoint_part(checkpoint: Any) -> Optional[dict[str, Any]]:
    """The checkpoint's identity: absolute path, and a digest of the identity of each weight/index/config file (its
    size, inode, device, ctime, mtime and safetensors header: a same-size ``cp -p`` over it changes its ctime)."""
    if checkpoint is None:
        return None
    path = Path(str(checkpoint)).expanduser()
    if not path.exists():  # a Hub id (resolved later by the loader): the id is all there is to compare
        return {"path": str(checkpoint), "files": None}
    files = sorted(_checkpoint_files(path))
    digest = hashlib.sha256()
    for identity in _identities(files):
        digest.update(json.dumps(identity, sort_keys=True).encode() + b"\n")
    return {"path": str(path.resolve()), "files": f"{len(files)} files, sha256 {digest.hexdigest()[:16]}"}


def _identities(files: list[Path]) -> list[dict[str, Any]]:
    """Each file's identity as offload folders record it (one definition for both); a safetensors file whose header
    does not parse is identified without it (the loader reports it, naming the file)."""
    import lightning_bigmodel.checkpoint  # noqa: F401 (first: the offload folder's module imports it)
    from lightning_bigmodel.checkpoint.errors import CheckpointError
    from lightning_bigmodel.offload.disk import source_identity

    out = []
    for file in files:
        try:
            out.extend(source_identity([file]))
        except CheckpointError:
            stat = os.stat(file)
            out.append({"path": str(file.resolve()), "size": stat.st_size, "inode": stat.st_ino,
                        "device": stat.st_dev, "ctime_ns": stat.st_ctime_ns, "mtime_ns": stat.st_mtime_ns})
    return out


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint

    try:
        resolved = resolve_checkpoint(path)
        files = set(resolved.files) | ({resolved.index} if resolved.index else set())
    except Exception:  # noqa: BLE001 - the loader reports an unreadable checkpoint; here every file counts
        files = {p for p in path.iterdir() if p.is_file()}
    files |= {p for p in (path / "config.json", path / "generation_config.json") if p.is_file()}
    return list(files)


def data_part(dataset: Any) -> dict[str, Any]:
    """The dataset's length and a hash of its samples (all of a list or tuple, else an evenly spaced few)."""
    n = len(dataset)
    if isinstance(dataset, (list, tuple)) or n <= _SPOT_CHECKS:
        picked = range(n)
        how = "all samples"
    else:
        picked = sorted({round(i * (n - 1) / (_SPOT_CHECKS - 1)) for i in range(_SPOT_CHECKS)})
        how = f"samples {', '.join(map(str, picked[:3]))}, ..., {picked[-1]}"
    digest = hashlib.sha256()
    for i in picked:
        _feed(digest, dataset[i])
    return {"num_samples": n, "samples": f"{how}, sha256 {digest.hexdigest()[:16]}"}


_PART_NAMES = {
    "module": "the module's arguments",
    "precision": "the precision, dtype or quantization",
    "checkpoint": "the checkpoint",
    "data": "the data",
}


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """``None`` when every part both fingerprints hold is equal; else what changed, e.g. ``the module's arguments
    (max_new_tokens: 16 -> 4)``."""
    changes = []
    for part, label in _PART_NAMES.items():
        before, after = old.get(part), new.get(part)
        if before is None or after is None or before == after:
            continue
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            keys = [k for k in dict.fromkeys([*before, *after]) if before.get(k, "<unset>") != after.get(k, "<unset>")]
            detail = "; ".join(f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}" for k in keys[:4])
            detail += "; ..." if len(keys) > 4 else ""
            if part == "checkpoint" and keys == ["files"]:
                detail = f"same path {after.get('path')!r}, but its files' sizes, inodes or times differ"
            changes.append(f"{label} ({detail})")
        else:
            changes.append(f"{label} ({before!r} -> {after!r})")
    return ", ".join(changes) or None
