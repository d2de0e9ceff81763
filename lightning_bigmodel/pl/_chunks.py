"""Chunk files and manifest of a prediction folder: names, atomic writes, encoding and reading.

Used by :mod:`lightning_bigmodel.pl.writers`. Every file is written to ``.NAME.PID.tmp`` in the same folder, fsynced,
renamed over ``NAME`` (:func:`_commit`, its own function so tests can inject a crash) and the folder is fsynced.
A chunk holds the global dataset ``indices`` of its samples and their predictions: safetensors for a tensor or a
``{str: tensor}`` dict, ``torch.save`` (read back with ``weights_only=True``) for a per-sample list.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lightning_bigmodel._atomic import atomic_write

MANIFEST_NAME = "manifest.json"
_FORMAT = 2  # 2: with the job's fingerprint (what decides its outputs)
_CHUNK_RE = re.compile(r"^chunk-(\d{9})-(\d{9})-r(\d+)\.(safetensors|pt)$")
_TMP_RE = re.compile(r"^\.(chunk-.*|manifest\.json)\.\d+\.tmp$")


class PredictionFolderError(RuntimeError):
    """A prediction folder belongs to another job, or its chunks break exactly-once."""

    __module__ = "lightning_bigmodel.pl.writers"  # its public home (re-exported there), as shown in tracebacks


def _commit(tmp: Path, final: Path) -> None:
    """Atomically publish ``tmp`` as ``final`` (its own function so tests can inject a crash)."""
    os.replace(tmp, final)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename + folder fsync."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), commit=lambda tmp, final: _commit(tmp, final), sync_folder=True)


def _to_cpu(x: Any) -> Any:
    return x.detach().cpu().contiguous().clone() if isinstance(x, torch.Tensor) else x


def _rows(pred: Any) -> list[int]:
    """Leading sizes of a prediction: a tensor, a ``{str: tensor}`` dict, or a per-sample list."""
    if isinstance(pred, torch.Tensor):
        return [pred.shape[0] if pred.dim() else -1]
    if isinstance(pred, Mapping):
        return [v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else -1 for v in pred.values()]
    if isinstance(pred, list):
        return [len(pred)]
    return [-1]


def _select(pred: Any, positions: list[int]) -> Any:
    if isinstance(pred, torch.Tensor):
        return pred[positions]
    if isinstance(pred, Mapping):
        return {k: v[positions] for k, v in pred.items()}
    return [pred[p] for p in positions]


def _concat(preds: Sequence[Any]) -> Any:
    first = preds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(preds))
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in preds]) for k in first}
    return [item for p in preds for item in p]


def _encode_chunk(indices: torch.Tensor, pred: Any) -> tuple[str, bytes]:
    """Serialize one chunk: safetensors for tensors and tensor dicts, ``torch.save`` otherwise."""
    if isinstance(pred, torch.Tensor):
        return "safetensors", st_save({"indices": indices, "prediction": pred}, metadata={"kind": "tensor"})
    if isinstance(pred, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in pred.items()):
        tensors = {f"prediction/{k}": v for k, v in pred.items()}
        return "safetensors", st_save({"indices": indices, **tensors}, metadata={"kind": "dict"})
    buf = io.BytesIO()
    torch.save({"indices": indices, "predictions": list(pred)}, buf)
    return "pt", buf.getvalue()


def _read_chunk(path: Path, indices_only: bool = False) -> tuple[torch.Tensor, Any]:
    """Load ``(indices, predictions)`` of a chunk; pickled chunks only with ``weights_only=True``."""
    try:
        if path.suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=indices_only)
            return data["indices"], None if indices_only else data["predictions"]
        if indices_only:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor("indices"), None
        with safe_open(path, framework="pt") as f:
            kind = (f.metadata() or {}).get("kind")
        tensors = st_load(path.read_bytes())
        indices = tensors.pop("indices")
        if kind == "tensor":
            return indices, tensors["prediction"]
        return indices, {k[len("prediction/") :]: v for k, v in tensors.items()}
    except Exception as err:
        raise PredictionFolderError(
            f"Prediction chunk {str(path)!r} cannot be read ({type(err).__name__}: {err}). It was not written by"
            " this writer or the disk corrupted it: delete the file and rerun the job to recompute its samples."
        ) from err


def _chunk_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CHUNK_RE.match(p.name))


def _read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PredictionFolderError(
            f"Prediction manifest {str(path)!r} is unreadable ({err}). Use a new `output_dir` or pass `overwrite=True`."
        ) from err


def _write_manifest(folder: Path, job_id: str, num_samples: Optional[int], fingerprint: Optional[dict] = None) -> None:
    doc = {"format": _FORMAT, "job_id": job_id, "num_samples": num_samples, "fingerprint": fingerprint or {}}
    _atomic_write(folder / MANIFEST_NAME, json.dumps(doc, indent=1).encode())


def _short(values: Sequence[int], limit: int = 10) -> str:
    head = ", ".join(str(v) for v in values[:limit])
    return f"[{head}{', ...' if len(values) > limit else ''}] ({len(values)} in all)"


def read_predictions(output_dir: Union[str, Path], num_samples: Optional[int] = None) -> Any:
    """Read every chunk of ``output_dir`` and return the predictions in dataset-index order.

    Args:
        output_dir: A folder written by :class:`ResumablePredictionWriter`.
        num_samples: Expected number of inputs; defaults to the one recorded in ``manifest.json``.

    Returns:
        A tensor (or ``{str: tensor}`` dict, or list) whose row ``i`` is the prediction for input ``i``.

    Raises:
        PredictionFolderError: when an index is missing, written twice, or out of range.
    """
    folder = Path(output_dir)
    chunks = _chunk_files(folder)
    if not chunks:
        raise PredictionFolderError(f"`output_dir` {str(folder)!r} holds no prediction chunks. Run the job first.")
    if num_samples is None:
        num_samples = (_read_manifest(folder) or {}).get("num_samples")
    loaded = [_read_chunk(p) for p in chunks]
    indices = torch.cat([ix for ix, _ in loaded])
    n = int(num_samples) if num_samples is not None else int(indices.max()) + 1
    bad = indices[(indices < 0) | (indices >= n)].tolist()
    if bad:
        raise PredictionFolderError(f"`output_dir` {str(folder)!r} holds indices outside 0..{n - 1}: {_short(bad)}.")
    counts = torch.bincount(indices, minlength=n)
    dups = torch.nonzero(counts > 1).flatten().tolist()
    if dups:
        files = sorted({p.name for p, (ix, _) in zip(chunks, loaded) if bool(torch.isin(ix, torch.tensor(dups)).any())})
        raise PredictionFolderError(
            f"`output_dir` {str(folder)!r} has more than one prediction for indices {_short(dups)}, in {files}."
        )
    gaps = torch.nonzero(counts == 0).flatten().tolist()
    if gaps:
        raise PredictionFolderError(
            f"`output_dir` {str(folder)!r} has no prediction for indices {_short(gaps)} of {n}. Rerun the same job"
            " to finish it."
        )
    order = torch.argsort(indices).tolist()
    return _select(_concat([pred for _, pred in loaded]), order)
