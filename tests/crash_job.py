"""A small resumable prediction job that the crash tests run (and kill) in a subprocess.

Usage: ``python crash_job.py OUTPUT_DIR [--sleep S] [--kill-at-chunk K] [--fail-at-batch B] [--devices D]``.
With ``--kill-at-chunk`` the process SIGKILLs itself on the K-th chunk write, after the temp file is
complete and before the rename; ``--fail-at-batch`` raises in ``predict_step`` on every rank;
``--devices 2`` runs DDP on CPU. Each rank prints ``RANK <r> SEEN <n>``: the samples it loaded.
"""

import argparse
import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_SAMPLES, FEATURES, OUT, BATCH_SIZE = 64, 8, 3, 4


def build_net() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, OUT)


def build_inputs() -> torch.Tensor:
    return torch.randn(NUM_SAMPLES, FEATURES, generator=torch.Generator().manual_seed(1))


def main() -> None:
    import lightning.pytorch as pl

    from lightning_bigmodel.pl import _chunks, writers

    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-at-chunk", type=int, default=0)
    parser.add_argument("--fail-at-batch", type=int, default=-1)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    if args.kill_at_chunk:
        commit, calls = _chunks._commit, []

        def crashing_commit(tmp, final):
            if final.name.startswith("chunk-"):
                calls.append(final)
                if len(calls) == args.kill_at_chunk:
                    os.kill(os.getpid(), signal.SIGKILL)
            commit(tmp, final)

        _chunks._commit = crashing_commit

    class Job(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_net()
            self.seen = 0

        def predict_step(self, batch, batch_idx):
            if batch_idx == args.fail_at_batch:
                raise RuntimeError("simulated failure")
            self.seen += batch[0].shape[0]
            time.sleep(args.sleep)
            return self.net(batch[0])

    writer = writers.ResumablePredictionWriter(args.output_dir, job_id="crash-test")
    dataset = TensorDataset(build_inputs())
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=writer.sampler(dataset))
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[writer], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    job = Job()
    try:
        trainer.predict(job, loader, return_predictions=False)
    finally:
        print(f"RANK {trainer.global_rank} SEEN {job.seen}", flush=True)


if __name__ == "__main__":
    main()
