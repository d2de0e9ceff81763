"""``BigModelInferenceStrategy(verify=True)``: the first ``predict_step`` is checked against a CPU reference.

The step runs once on the dispatched model (its outputs are the step's predictions) and once more on the CPU through
the same modules, each block's weights streamed from the checkpoint (see :mod:`lightning_bigmodel.verify`); the first
module that diverges stops the job with one message naming it and its device. Cost: one extra CPU forward of one
batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_bigmodel.checkpoint.reader import CheckpointReader
from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint
from lightning_bigmodel.offload.hooks import move_to

_CPU = torch.device("cpu")


def verified_step(strategy, step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Run ``step(*args, **kwargs)`` (the strategy's predict step) and verify it; return its outputs.

    Raises:
        RuntimeError: a module's outputs diverge from the CPU reference (the message names it and its device).
        MisconfigurationException: no checkpoint to compare with.
    """
    from lightning_bigmodel.pl.loader import _infer_prefix
    from lightning_bigmodel.verify import verify_outputs

    module = strategy.lightning_module
    checkpoint = strategy.loaded_from or strategy.checkpoint
    if not checkpoint or checkpoint == "<in-memory state dict>":
        raise MisconfigurationException(
            "`verify=True` compares the outputs with a reference streamed from the checkpoint, but the model was "
            "loaded from none. Pass `ckpt_path=` (or `checkpoint=`), or drop `verify`."
        )
    prefix = strategy.key_prefix
    if prefix is None:
        with CheckpointReader(resolve_checkpoint(checkpoint)) as reader:
            prefix = _infer_prefix(module, list(reader.keys()))

    def reference() -> Any:
        saved = getattr(module, "_device", None)
        module._device = _CPU  # `self.device` inside predict_step names the CPU during the reference
        try:
            with strategy.precision_plugin.predict_step_context():
                return module.predict_step(*move_to(args, _CPU), **move_to(kwargs, _CPU))
        finally:
            module._device = saved

    report, outputs = verify_outputs(
        module, checkpoint, lambda: step(*args, **kwargs), reference, key_prefix=prefix,
        no_split_module_classes=strategy.no_split_module_classes,
    )  # fmt: skip
    strategy.verify_report = report
    if not report.ok:
        raise RuntimeError(f"{report} Stopped before writing predictions from this dispatch.")
    rank_zero_info(str(report))
    return outputs
