"""A replica prediction job that the integration tests run in subprocesses.

Usage: ``python replica_job.py CHECKPOINT OUT_DIR [--accelerator cpu] [--devices 2] [--devices-per-replica 1]
[--num-samples 7] [--batch-size 2]``, either plainly
(Lightning's ``_SubprocessScriptLauncher`` re-runs this script for the other replicas) or under
``torchrun --nproc_per_node=2``. A tiny GPT is planned over 230 kB of RAM per replica (two blocks of it kept for
the disk stream), the rest on disk (on GPUs:
60 kB on the replica's first GPU, 60 kB of RAM, the rest on disk).
Rank 0 saves the returned (gathered) predictions to ``OUT_DIR/predictions.pt``; every rank writes
``OUT_DIR/rank-<r>.json`` with its ranks, devices, plan, offload files and the dataset indices it predicted.
"""

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # tests/ and the repository root (for `examples`)


def main() -> None:
    import lightning.pytorch as pl
    import torch
    from lightning_models import GPTModule, token_loader, tokens

    from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy

    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--devices-per-replica", type=int, default=1)
    parser.add_argument("--num-samples", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()

    strategy = ReplicatedBigModelStrategy(
        devices_per_replica=args.devices_per_replica,
        max_memory={"cpu": 230_000} if args.accelerator == "cpu" else {0: 60_000, "cpu": 60_000},
        no_split_module_classes=["Block"],
        offload_folder=args.out_dir / "offload",
    )
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=args.out_dir)  # fmt: skip
    loader = token_loader(tokens(n=args.num_samples, t=5), batch_size=args.batch_size)
    predictions = trainer.predict(GPTModule(), loader, ckpt_path=args.checkpoint)

    offload = Path(strategy.offload_folder)
    report = {
        "global_rank": trainer.global_rank,
        "local_rank": trainer.local_rank,
        "world_size": trainer.world_size,
        "backend": torch.distributed.get_backend(),
        "parallel_devices": [str(d) for d in strategy.parallel_devices],
        "root_device": str(strategy.root_device),
        "plan_devices": sorted({str(d) for d in strategy.plan.values()}),
        "offload_folder": str(offload),
        "offload_files": sorted(p.name for p in offload.rglob("*") if p.is_file()) if offload.exists() else [],
        "seen_indices": [i for batch in trainer.predict_dataloaders.batch_sampler.seen_batch_indices for i in batch],
        "returned": len(predictions),
    }
    (args.out_dir / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))
    if trainer.is_global_zero:
        torch.save(predictions, args.out_dir / "predictions.pt")


if __name__ == "__main__":
    main()
