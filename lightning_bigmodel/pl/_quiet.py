"""Keep a batch job's output about the job: drop advertising and irrelevant import noise from other libraries.

Installed when the Lightning side (``lightning_bigmodel.pl``) is imported, for the Python API as for the
``lightning-bigmodel`` command. Each filter drops named messages of one named library only: the user's own
warnings and log records (and every other message of those libraries) pass untouched. What is dropped:
Lightning's "Tip" lines advertising cloud products (logged at INFO on every run), and, when ``transformers`` imports
``torchao`` as a side effect (it does whenever torchao is installed), torchao's warnings about GPU kernels that this
torch build cannot load and torch's notices about the enums torchao registers; Lightning 2.6's own deprecation
warning about torch's ``LeafSpec`` (raised inside Lightning on every predict). Everything else passes.
"""

from __future__ import annotations

import logging
import warnings

_DROPPED = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Detected no triton",),  # a logger's filters do not cover its children
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _DropStartingWith(logging.Filter):
    def __init__(self, needles: tuple[str, ...]) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def quiet_banners() -> None:
    """Install the filters once per process (idempotent)."""
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", module="lightning")
    for name, needles in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStartingWith) for f in logger.filters):
            logger.addFilter(_DropStartingWith(needles))
