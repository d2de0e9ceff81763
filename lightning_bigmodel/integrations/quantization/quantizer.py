"""Check a quantization request against the model and the devices, then build the quantizer.

Called by loading before the checkpoint is opened (:mod:`.prequantized` checks the checkpoint next): the name,
whether torchao is installed, and whether the method has a kernel on every execution device of a quantized weight.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lightning_bigmodel.integrations.quantization.report import quantization_report
from lightning_bigmodel.integrations.quantization.spec import (
    QuantizationSpec,
    quantized_weights,
    resolve_quantization,
    transposed_weights,
)

__all__ = ["build_quantizer"]

_log = logging.getLogger("lightning_bigmodel.quantization")


def build_quantizer(
    model: nn.Module,
    quantization: Union[str, QuantizationSpec, None],
    skip_modules: Optional[Sequence[str]],
    devices: Mapping[str, torch.device],
    dtypes: Mapping[str, torch.dtype],
):
    """The :class:`~lightning_bigmodel.integrations.quantization.torchao.TorchaoQuantizer` for this load, or ``None``.

    Args:
        model: the model being loaded (only names, types and shapes are read).
        quantization: ``"int8"``, ``"int4"``, a spec, or ``None``.
        skip_modules: module names whose ``nn.Linear`` weights stay unquantized (``None``: ``["lm_head"]``).
        devices: execution device of every model tensor (by its first name).
        dtypes: dtype each tensor is loaded in.

    Raises:
        ValueError: an unknown name, or no kernel on an execution device.
        ImportError: torchao is missing (the message names the extra).
    """
    spec = resolve_quantization(quantization, skip_modules)
    if spec is None:
        return None
    weights = {name: shape for name, shape in quantized_weights(model, spec).items() if name in devices}
    from lightning_bigmodel.integrations.quantization.torchao import TorchaoQuantizer, check_kernel

    check_kernel(spec, [devices[name] for name in weights], [dtypes[name] for name in weights])
    quantizer = TorchaoQuantizer(spec, weights, transposed_weights(model, weights))
    line, warn = quantization_report(model, spec, dtypes)
    _log.log(logging.WARNING if warn else logging.INFO, "%s", line)  # once per load
    return quantizer
