"""Several replica prediction runs in one pair of processes, for the two-process integration tests.

Usage: ``torchrun --nproc_per_node=2 replica_cases_job.py CHECKPOINT OUT_DIR``. Under torchrun every Trainer of the
script joins the same two-process gloo world, so the runs below share one start-up:

- ``batches``, ``samples``, ``none``: ``ReplicatedBigModelStrategy(gather=...)`` over two dataloaders;
- ``writer-crash`` then ``writer-resume``: ``ResumablePredictionWriter`` with ``gather="none"``; the first run fails
  on every rank at its second batch, the second run (a new Trainer and writer on the same folder) finishes the job;
- ``one-sample``: a dataset with fewer samples than replicas (last: a rank that fails alone would break the world).

Each rank saves ``OUT_DIR/rank-<r>.pt``: per run, what ``trainer.predict`` returned (or the error it raised, as
``"Type: message"``), the dataset indices the rank predicted per dataloader, and how many samples it computed. Every
run plans the tiny GPT over 190 kB of RAM per replica, the rest on disk.
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/ and the repository root (for `examples`)

LOADERS = ((5, 4, 2), (4, 6, 3))  # (samples, tokens, batch size) of the two dataloaders
WRITER_SAMPLES, WRITER_BATCH = 9, 2


def main() -> None:
    import lightning.pytorch as pl
    import torch
    from lightning_models import GPTModule, token_loader, tokens
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy
    from lightning_bigmodel.pl.writers import ResumablePredictionWriter

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()

    class Job(GPTModule):
        def __init__(self, fail_at_batch: int = -1) -> None:
            super().__init__()
            self.fail_at_batch, self.computed = fail_at_batch, 0

        def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
            if batch_idx == self.fail_at_batch:
                raise RuntimeError("simulated failure")
            self.computed += batch[0].shape[0]
            return super().predict_step(batch, batch_idx)

    def trainer(gather: str, callbacks=(), root: Path = args.out_dir) -> pl.Trainer:
        strategy = ReplicatedBigModelStrategy(gather=gather, max_memory={"cpu": 190_000},
                                              no_split_module_classes=["Block"], offload_folder=root / "off")
        return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root, callbacks=list(callbacks))

    def seen(t: pl.Trainer) -> list[list[int]]:
        loaders = t.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        return [[int(i) for b in dl.batch_sampler.seen_batch_indices for i in b] for dl in loaders]

    def run(name: str, t: pl.Trainer, module: Job, loaders, **kwargs) -> None:
        try:
            returned = t.predict(module, loaders, ckpt_path=args.checkpoint, **kwargs)
        except Exception as err:  # noqa: BLE001 - reported to the test, which decides
            returned = f"{type(err).__name__}: {err}"
        report[name] = {"returned": returned, "computed": module.computed}
        try:
            report[name]["seen"] = seen(t)
        except Exception:  # noqa: BLE001 - no loader was built (an error before predict started)
            report[name]["seen"] = None

    report: dict = {}
    for gather in ("batches", "samples", "none"):
        loaders = [token_loader(tokens(n=n, t=t, seed=i + 1), batch_size=b) for i, (n, t, b) in enumerate(LOADERS)]
        run(gather, trainer(gather), Job(), loaders)

    dataset = TensorDataset(tokens(n=WRITER_SAMPLES, t=4, seed=3))
    for name, fail_at in (("writer-crash", 1), ("writer-resume", -1)):
        # the injected failure is no part of the job: a rerun without it is the same job
        writer = ResumablePredictionWriter(args.out_dir / "preds", job_id="replicas-none",
                                           ignore_hparams=["fail_at_batch"])
        loader = DataLoader(dataset, batch_size=WRITER_BATCH, sampler=writer.sampler(dataset))
        run(name, trainer("none", [writer]), Job(fail_at_batch=fail_at), loader, return_predictions=False)

    one = trainer("batches", root=args.out_dir / "one-sample")  # its own folder: nothing may be written there
    run("one-sample", one, Job(), token_loader(tokens(n=1, t=4, seed=4), batch_size=2))
    torch.save(report, args.out_dir / f"rank-{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main()
