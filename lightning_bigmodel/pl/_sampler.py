"""The sampler that skips what a :class:`~lightning_bigmodel.pl.writers.ResumablePredictionWriter` has written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional

from torch.utils.data import Sampler, SequentialSampler

if TYPE_CHECKING:
    from lightning_bigmodel.pl.writers import ResumablePredictionWriter


def _uses_resumable_sampler(dataloader: Any) -> bool:
    """Whether Lightning's (possibly distributed, index-tracking) wrappers hold a :class:`ResumableSampler`."""
    todo = [getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None)]
    for _ in range(4):  # batch sampler -> sampler -> distributed wrapper's dataset -> wrapped sampler
        if any(isinstance(s, ResumableSampler) for s in todo):
            return True
        todo = [getattr(s, a, None) for s in todo for a in ("sampler", "_batch_sampler", "dataset", "_sampler")]
    return False


class ResumableSampler(Sampler[int]):
    """Yields the indices of ``sampler`` (default: all of ``data_source`` in order) that ``writer`` has not written.

    Build it with :meth:`ResumablePredictionWriter.sampler`. Lightning keeps it on one process and
    wraps it in its unrepeated distributed sampler under DDP, so each rank loads only undone samples.
    When fewer samples are left than ranks, done indices pad the list (their results are dropped).

    Args:
        writer: The writer whose ``done_indices()`` snapshot is skipped.
        data_source: The (sized) predict dataset.
        sampler: Sampler of dataset indices to filter; default: ``0 .. len(data_source) - 1`` in order.
    """

    def __init__(self, writer: ResumablePredictionWriter, data_source: Any, sampler: Optional[Any] = None) -> None:
        self.writer = writer
        self.data_source = data_source
        self.num_samples_total = len(data_source)
        self.base = sampler if sampler is not None else SequentialSampler(range(self.num_samples_total))
        self._cache: Optional[tuple[int, list[int]]] = None
        writer._num_samples_hint = self.num_samples_total

    def _todo(self) -> list[int]:
        if self._cache is None or self._cache[0] != self.writer._generation:
            self.writer._check_job(self.data_source)  # the model is loaded and the data known: the whole fingerprint
            done, generation = self.writer.done_indices(), self.writer._generation
            todo = [int(i) for i in self.base if int(i) not in done]
            self.writer._report_progress(self.num_samples_total, len(todo))
            short = self.writer._world_size - len(todo)
            if todo and short > 0:  # every rank needs a batch: pad with done indices, the writer drops them
                todo += sorted(done)[:short]
            self._cache = (generation, todo)
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self._todo())

    def __len__(self) -> int:
        return len(self._todo())
