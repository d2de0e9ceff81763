"""Big-model inference for PyTorch Lightning."""

from lightning_bigmodel.callback import DeviceMapCallback
from lightning_bigmodel.checkpoint import load_checkpoint_in_model, save_sharded_checkpoint
from lightning_bigmodel.checkpoint.errors import CheckpointError, CheckpointNotFoundError
from lightning_bigmodel.device_map import check_device_map, clean_device_map, infer_device_map
from lightning_bigmodel.dispatch import dispatch_model, load_checkpoint_and_dispatch, remove_dispatch
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.io import ShardedCheckpointIO
from lightning_bigmodel.memory import compute_module_sizes, find_tied_parameters, get_max_memory, parse_size
from lightning_bigmodel.pipeline import MicroBatchPipeline, pipelined_forward
from lightning_bigmodel.replicas import ReplicatedBigModelStrategy, gather_predictions
from lightning_bigmodel.strategy import BigModelInferenceStrategy
from lightning_bigmodel.writers import PredictionFolderError, ResumablePredictionWriter, read_predictions

__version__ = "0.1.0"

__all__ = [
    "BigModelInferenceStrategy",
    "CheckpointError",
    "CheckpointNotFoundError",
    "DeviceMapCallback",
    "MicroBatchPipeline",
    "PredictionFolderError",
    "ReplicatedBigModelStrategy",
    "ResumablePredictionWriter",
    "ShardedCheckpointIO",
    "check_device_map",
    "clean_device_map",
    "compute_module_sizes",
    "dispatch_model",
    "find_tied_parameters",
    "gather_predictions",
    "get_max_memory",
    "infer_device_map",
    "init_empty_weights",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "parse_size",
    "pipelined_forward",
    "read_predictions",
    "remove_dispatch",
    "save_sharded_checkpoint",
]
