"""Big-model inference for PyTorch Lightning.

Importing the package is cheap: names are loaded on first use (PEP 562), so the core API
(``init_empty_weights``, ``infer_device_map``, ``load_checkpoint_and_dispatch``, ...) never imports
Lightning. The Lightning names (``BigModelInferenceStrategy``, ``DeviceMapCallback``, ...) import it
when first touched. ``strategy="bigmodel"`` is registered with Lightning as soon as both this package
and ``lightning.pytorch`` are imported, in either order (see :mod:`lightning_bigmodel._registration`).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lightning_bigmodel._registration import register_when_lightning_is_imported

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CheckpointError": "lightning_bigmodel.checkpoint.errors",
    "CheckpointNotFoundError": "lightning_bigmodel.checkpoint.errors",
    "check_device_map": "lightning_bigmodel.planning.device_map",
    "clean_device_map": "lightning_bigmodel.planning.device_map",
    "compute_module_sizes": "lightning_bigmodel.planning.sizes",
    "dispatch_model": "lightning_bigmodel.dispatch",
    "find_tied_parameters": "lightning_bigmodel.planning.sizes",
    "get_max_memory": "lightning_bigmodel.planning.budget",
    "infer_device_map": "lightning_bigmodel.fitting",
    "init_empty_weights": "lightning_bigmodel.init",
    "load_checkpoint_and_dispatch": "lightning_bigmodel.dispatch",
    "load_checkpoint_in_model": "lightning_bigmodel.checkpoint.loading",
    "MicroBatchPipeline": "lightning_bigmodel.pipeline.microbatch",
    "parse_size": "lightning_bigmodel.planning.sizes",
    "pipelined_forward": "lightning_bigmodel.pipeline.microbatch",
    "remove_dispatch": "lightning_bigmodel.dispatch",
    "save_sharded_checkpoint": "lightning_bigmodel.checkpoint.writer",
    # the Lightning side (imports Lightning on first use)
    "BigModelInferenceStrategy": "lightning_bigmodel.pl.strategy",
    "DeviceMapCallback": "lightning_bigmodel.pl.callback",
    "PredictionFolderError": "lightning_bigmodel.pl.writers",
    "ReplicatedBigModelStrategy": "lightning_bigmodel.pl.replicas",
    "ResumablePredictionWriter": "lightning_bigmodel.pl.writers",
    "ShardedCheckpointIO": "lightning_bigmodel.pl.io",
    "TransformersModule": "lightning_bigmodel.pl.transformers_module",  # imports transformers only when used
    "gather_predictions": "lightning_bigmodel.pl.gather",
    "read_predictions": "lightning_bigmodel.pl.writers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_bigmodel' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from lightning_bigmodel.checkpoint.errors import CheckpointError, CheckpointNotFoundError
    from lightning_bigmodel.checkpoint.loading import load_checkpoint_in_model
    from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
    from lightning_bigmodel.dispatch import dispatch_model, load_checkpoint_and_dispatch, remove_dispatch
    from lightning_bigmodel.init import init_empty_weights
    from lightning_bigmodel.pipeline.microbatch import MicroBatchPipeline, pipelined_forward
    from lightning_bigmodel.pl.callback import DeviceMapCallback
    from lightning_bigmodel.pl.gather import gather_predictions
    from lightning_bigmodel.pl.io import ShardedCheckpointIO
    from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy
    from lightning_bigmodel.pl.strategy import BigModelInferenceStrategy
    from lightning_bigmodel.pl.transformers_module import TransformersModule
    from lightning_bigmodel.pl.writers import PredictionFolderError, ResumablePredictionWriter, read_predictions
    from lightning_bigmodel.planning.budget import get_max_memory
    from lightning_bigmodel.fitting import infer_device_map
    from lightning_bigmodel.planning.device_map import check_device_map, clean_device_map
    from lightning_bigmodel.planning.sizes import compute_module_sizes, find_tied_parameters, parse_size

register_when_lightning_is_imported()
