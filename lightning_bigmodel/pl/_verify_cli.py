"""``lightning-bigmodel verify --config ...``: the config's predict job, checked on its first batch and stopped.

The model, data, checkpoint and strategy settings are the config's (the same plan and dispatch as ``predict``); the
strategy verifies the first ``predict_step`` against a CPU reference streamed block by block from the checkpoint
(:mod:`lightning_bigmodel.verify`), only that batch runs, and prediction writers are left out (nothing is written).
Prints the report; a divergence is an error naming the module and its device (exit status 2).
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException


def _before_predict(cli) -> None:
    """``predict`` with ``verify=True`` on the strategy, one batch, and no prediction writer."""
    before = getattr(super(type(cli), cli), "before_predict", None)  # the predict CLI's own checks, if any
    if before is not None:
        before()
    from lightning_bigmodel.pl.strategy import BigModelInferenceStrategy

    trainer = cli.trainer
    strategy = trainer.strategy
    if not isinstance(strategy, BigModelInferenceStrategy):
        raise MisconfigurationException(
            f"`verify` checks a `BigModelInferenceStrategy` run, but the config's strategy is "
            f"{type(strategy).__name__}. Use `trainer.strategy: bigmodel` (the default)."
        )
    if strategy.quantization is not None:
        raise ValueError(
            "`verify` compares with the checkpoint's float weights, which quantized outputs differ from by design: "
            "drop `quantization` from the config to verify its dispatch."
        )
    strategy.verify, strategy._verified = True, False
    trainer.limit_predict_batches = 1
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, BasePredictionWriter)]


def verify(argv: Optional[list[str]], predict_cli: type) -> Any:
    """Run ``lightning-bigmodel verify`` (``argv`` without the word ``verify``) with ``predict_cli`` (the predict
    command's LightningCLI class, passed in by ``pl/cli.py`` so that this module does not import it); print the
    report."""
    import lightning_bigmodel.pl.strategy  # noqa: F401  (registers strategy="bigmodel")

    verify_cli = type("VerifyCLI", (predict_cli,), {"before_predict": _before_predict})
    cli = verify_cli(args=["predict", *(argv or [])])
    report = getattr(cli.trainer.strategy, "verify_report", None)
    if report is None:
        raise ValueError("`verify`: the predict dataloader gave no batch, so nothing was compared. Check the data.")
    print(report)
    return cli
