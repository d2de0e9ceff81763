"""Crash-safe, resumable prediction writing for long ``Trainer.predict`` batch jobs.

Layout of ``output_dir``::

    manifest.json                                   {"format", "job_id", "num_samples"}
    chunk-000000000-000000007-r0.safetensors        indices + predictions of one chunk
    chunk-000000008-000000015-r0.pt                 (``.pt`` when predictions are not tensors)

Every file is written to a temporary file in the same folder, fsynced, renamed over its final name
and the folder is fsynced, so a crash (even ``kill -9``) leaves either the complete file or a
leftover ``.*.tmp`` that the next run deletes. Chunk names carry the smallest and largest global
dataset index they hold and the global rank that wrote them. A rerun of the same job scans the
complete chunks once in ``setup`` (before any rank writes) and skips the done indices:
:class:`ResumableSampler` does not even load them, and the writer drops any done index it is
still given, so in the end every input has exactly one prediction.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import IterableDataset

from lightning_bigmodel.pl._chunks import (
    _FORMAT,
    _TMP_RE,
    MANIFEST_NAME,
    PredictionFolderError,
    _atomic_write,
    _chunk_files,
    _concat,
    _encode_chunk,
    _read_chunk,
    _read_manifest,
    _rows,
    _select,
    _to_cpu,
    _write_manifest,
    read_predictions,
)
from lightning_bigmodel.pl._fingerprint import checkpoint_part, data_part, describe_change, module_part, precision_part
from lightning_bigmodel.pl._sampler import ResumableSampler, _uses_resumable_sampler

__all__ = ["PredictionFolderError", "ResumablePredictionWriter", "ResumableSampler", "read_predictions"]

_EMPTY_LOADER = r"Total length of `\w+` across ranks is zero"  # Lightning's warning when every sample is done


class ResumablePredictionWriter(BasePredictionWriter):
    """Write predictions in atomic chunks and resume an interrupted job exactly where it stopped.

    Pass it as a callback and, to skip loading done samples, use its sampler::

        writer = ResumablePredictionWriter("preds/", job_id="embed-v1")
        loader = DataLoader(dataset, batch_size=64, sampler=writer.sampler(dataset))
        Trainer(callbacks=[writer]).predict(model, loader, return_predictions=False)
        predictions = read_predictions("preds/")

    ``predict_step`` must return, per batch, a tensor or a ``{str: tensor}`` dict with one row per
    sample, or a list with one picklable item per sample.

    A job is what decides its outputs: ``manifest.json`` records ``job_id`` and a fingerprint of the module's
    hyperparameters (or plain attributes), the checkpoint's identity (path, and each file's size, inode and mtime),
    the precision, dtype and quantization, and the data (its length and a hash of its samples). A rerun whose
    fingerprint differs stops before any prediction, naming what changed; a matching rerun logs how many samples are
    done and predicts the rest. Batch size and number of processes may change between runs. Under DDP let
    Lightning distribute the samples (its predict sampler never repeats one); a user
    ``DistributedSampler`` pads ranks with repeated samples, which ``read_predictions`` reports as duplicates.

    Args:
        output_dir: Folder for the chunks and ``manifest.json``; shared by all ranks.
        job_id: Name of the job; a folder holding another job is refused.
        chunk_size: Number of batches buffered into one chunk file (lost on a crash, recomputed on rerun).
        overwrite: Delete the chunks of a different job found in ``output_dir`` instead of raising.
        ignore_hparams: Hyperparameters that do not change the outputs, left out of the fingerprint.
    """

    def __init__(
        self,
        output_dir: Union[str, Path],
        job_id: str = "default",
        chunk_size: int = 1,
        overwrite: bool = False,
        ignore_hparams: Sequence[str] = ("batch_size", "num_workers", "pin_memory"),
    ) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive number of batches, got {chunk_size!r}.")
        self.output_dir = Path(output_dir)
        self.job_id = str(job_id)
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        self.ignore_hparams = tuple(ignore_hparams)
        self._rank, self._world_size, self._generation = 0, 1, 0
        self._trainer: Any = None
        self._fingerprint: dict[str, Any] = {}
        self._checked_generation = -1
        self._quiet_filter: Any = None
        self._done: Optional[frozenset[int]] = None
        self._buffer: list[tuple[torch.Tensor, Any]] = []
        self._num_samples_hint: Optional[int] = None

    def sampler(self, data_source: Any, sampler: Optional[Any] = None) -> ResumableSampler:
        """A sampler over ``data_source`` (or over ``sampler``'s indices) that skips written samples."""
        return ResumableSampler(self, data_source, sampler)

    def done_indices(self) -> frozenset[int]:
        """Global dataset indices already in complete chunks (snapshot taken in ``setup``)."""
        if self._done is None:
            self._done = self._scan()
        return self._done

    def _scan(self) -> frozenset[int]:
        done: set[int] = set()
        for path in _chunk_files(self.output_dir):
            done.update(_read_chunk(path, indices_only=True)[0].tolist())
        return frozenset(done)

    def _conflict(self) -> Optional[str]:
        manifest, chunks = _read_manifest(self.output_dir), _chunk_files(self.output_dir)
        if not chunks:  # no prediction to lose (e.g. a run that failed before its first batch): start afresh
            return None
        if manifest is None:
            return f"holds {len(chunks)} chunk files but no {MANIFEST_NAME}"
        n_old, n_new = manifest.get("num_samples"), self._num_samples_hint
        if manifest.get("job_id") != self.job_id:
            return f"belongs to job {manifest.get('job_id')!r}, not {self.job_id!r}"
        if manifest.get("format") != _FORMAT:
            old = manifest.get("format")
            return f"was written by an older version of this writer (format {old}, no job fingerprint)"
        if n_old is not None and n_new is not None and n_old != n_new:
            return f"was written for {n_old} samples, but the dataset has {n_new}"
        change = describe_change(manifest.get("fingerprint") or {}, self._fingerprint)
        if change is None:
            return None
        unless = " (an argument that does not change the outputs goes in the writer's `ignore_hparams`)"
        return f"holds the predictions of another job: {change} changed{unless if 'arguments' in change else ''}"

    def _refuse(self, conflict: str) -> PredictionFolderError:
        return PredictionFolderError(
            f"`output_dir` {str(self.output_dir)!r} {conflict}. Set `overwrite: true` on the writer (`overwrite=True`"
            " in Python) to delete them and start this job, or give this job another `output_dir` (and `job_id`)."
        )

    def _clear(self) -> None:
        for path in _chunk_files(self.output_dir):
            path.unlink()
        (self.output_dir / MANIFEST_NAME).unlink(missing_ok=True)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        self._rank, self._world_size, self._trainer = trainer.global_rank, trainer.world_size, trainer
        self._buffer = []
        # What is known before the model is built: the module's arguments, precision and a strategy `checkpoint`.
        # The `ckpt_path` and the data are checked once the dataloader asks (`_check_job`), before any batch runs.
        self._fingerprint = {
            "module": module_part(pl_module, self.ignore_hparams),
            "precision": precision_part(trainer),
            "checkpoint": checkpoint_part(getattr(trainer.strategy, "checkpoint", None)),
        }
        conflict = self._conflict()  # every rank decides alike: nothing changes before the barrier
        if conflict and not self.overwrite:
            raise self._refuse(conflict)
        trainer.strategy.barrier("ResumablePredictionWriter.check")
        if self._rank == 0:
            self._writing(self._prepare_folder, conflict)
        trainer.strategy.barrier("ResumablePredictionWriter.prepare")
        self._done, self._generation = self._scan(), self._generation + 1

    def _prepare_folder(self, conflict: Optional[str]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for path in self.output_dir.iterdir():
            if _TMP_RE.match(path.name):  # left by a crash mid-write: never a complete file
                path.unlink(missing_ok=True)
        if conflict:
            self._clear()
        if conflict or not _chunk_files(self.output_dir) or _read_manifest(self.output_dir) is None:
            _write_manifest(self.output_dir, self.job_id, self._num_samples_hint, self._fingerprint)

    def _check_job(self, dataset: Any) -> None:
        """Compare the whole fingerprint (checkpoint as loaded, data) with the manifest once per run; record it."""
        if self._checked_generation == self._generation or self._trainer is None:
            return
        self._checked_generation = self._generation
        strategy = self._trainer.strategy
        source = self._trainer.ckpt_path or getattr(strategy, "checkpoint", None)
        self._fingerprint.update(checkpoint=checkpoint_part(source), data=data_part(dataset))
        self._num_samples_hint = len(dataset)
        conflict = self._conflict()
        if conflict and not self.overwrite:
            raise self._refuse(conflict)
        if self._rank == 0:
            manifest = _read_manifest(self.output_dir) or {}
            if conflict or manifest.get("fingerprint") != self._fingerprint:
                self._writing(self._record, conflict)
        strategy.barrier("ResumablePredictionWriter.record")
        if conflict:
            self._done = self._scan()

    def _record(self, conflict: Optional[str]) -> None:
        if conflict:
            self._clear()
        _write_manifest(self.output_dir, self.job_id, self._num_samples_hint, self._fingerprint)

    def _report_progress(self, total: int, remaining: int) -> None:
        """Say what a rerun does; with nothing left, in place of Lightning's empty-dataloader warning."""
        done = total - remaining
        if done == 0:
            return
        where = f"`ResumablePredictionWriter`: {str(self.output_dir)!r}"
        if remaining:
            rank_zero_info(f"{where}: {done} of {total} samples already done; predicting the remaining {remaining}.")
            return
        rank_zero_info(f"{where}: all {total} samples already done; nothing to predict.")
        if self._quiet_filter is None:
            warnings.filterwarnings("ignore", message=_EMPTY_LOADER)
            self._quiet_filter = warnings.filters[0]

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._quiet_filter is not None:
            with contextlib.suppress(ValueError):
                warnings.filters.remove(self._quiet_filter)
            self._quiet_filter = None

    def _writing(self, action: Callable[..., Any], *args: Any) -> Any:
        """Run ``action``; a full disk (or any write error) names the folder and says that a rerun resumes."""
        try:
            return action(*args)
        except OSError as err:
            cause = err.strerror or str(err)
            raise PredictionFolderError(
                f"Cannot write predictions into `output_dir` {str(self.output_dir)!r}: {cause} (errno {err.errno})."
                " Every chunk already there is complete and no temporary file is left: free space (or make the folder"
                " writable) and run the same job again, it resumes where it stopped."
            ) from err

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        if len(loaders) != 1 or not hasattr(loaders[0], "dataset"):
            raise ValueError(
                f"`ResumablePredictionWriter` needs exactly one `torch.utils.data.DataLoader` to predict on, got"
                f" {[type(dl).__name__ for dl in loaders]}. Run one `trainer.predict` (and `output_dir`) per dataset."
            )
        dataset = loaders[0].dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"`ResumablePredictionWriter` needs a map-style dataset (with `__len__`), got {type(dataset).__name__}:"
                " Lightning gives no sample indices for an iterable one, so nothing could be resumed. Index the data"
                " (a `torch.utils.data.Dataset` with `__getitem__` and `__len__`)."
            )
        self._check_job(dataset)  # without our sampler, the first time the whole fingerprint is known
        if self._done and not _uses_resumable_sampler(loaders[0]):
            warnings.warn(
                f"{len(self._done)} samples are already in {str(self.output_dir)!r}; they will be recomputed and"
                " dropped. Pass `sampler=writer.sampler(dataset)` to your DataLoader to skip loading them."
            )

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not batch_indices:
            raise ValueError(
                f"Lightning gave no sample indices for predict batch {batch_idx}: `ResumablePredictionWriter` needs"
                " a `torch.utils.data.DataLoader` with a map-style dataset."
            )
        indices = [int(i) for i in batch_indices]
        if any(r != len(indices) for r in _rows(prediction)):
            raise ValueError(
                f"`predict_step` returned {type(prediction).__name__} with leading sizes {_rows(prediction)} for batch"
                f" {batch_idx} of {len(indices)} samples. Return a tensor or a {{str: tensor}} dict with one row per"
                " sample, or a list with one item per sample."
            )
        done = self.done_indices()
        keep = [p for p, i in enumerate(indices) if i not in done]
        if not keep:
            return
        if len(keep) < len(indices):
            prediction, indices = _select(prediction, keep), [indices[p] for p in keep]
        pred = {k: _to_cpu(v) for k, v in prediction.items()} if isinstance(prediction, Mapping) else prediction
        pred = [_to_cpu(v) for v in pred] if isinstance(pred, list) else _to_cpu(pred)
        self._buffer.append((torch.tensor(indices, dtype=torch.long), pred))
        if len(self._buffer) >= self.chunk_size:
            self.flush()

    def flush(self) -> Optional[Path]:
        """Write the buffered batches as one chunk file; returns its path (``None`` if nothing was buffered)."""
        if not self._buffer:
            return None
        indices = torch.cat([b[0] for b in self._buffer])
        pred = _concat([b[1] for b in self._buffer])
        ext, data = _encode_chunk(indices, pred)
        name = f"chunk-{int(indices.min()):09d}-{int(indices.max()):09d}-r{self._rank}.{ext}"
        path = self.output_dir / name
        self._buffer = []  # on a failed write too: a rerun recomputes these samples, nothing half-written is kept
        self._writing(_atomic_write, path, data)
        return path

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        try:  # the buffered batches finished: keep them (best effort, the rerun redoes them otherwise)
            self.flush()
        except Exception as err:  # noqa: BLE001 - never hide the original exception
            warnings.warn(f"`ResumablePredictionWriter` could not flush after {exception!r}: {err!r}")
