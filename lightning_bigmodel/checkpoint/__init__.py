"""Reading and writing (sharded) checkpoints, and streaming them into a model."""

from lightning_bigmodel.checkpoint.loading import load_checkpoint_in_model
from lightning_bigmodel.checkpoint.reader import CheckpointReader, TensorSpec
from lightning_bigmodel.checkpoint.resolve import ResolvedCheckpoint, resolve_checkpoint
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint

__all__ = [
    "CheckpointReader",
    "ResolvedCheckpoint",
    "TensorSpec",
    "load_checkpoint_in_model",
    "resolve_checkpoint",
    "save_sharded_checkpoint",
]
