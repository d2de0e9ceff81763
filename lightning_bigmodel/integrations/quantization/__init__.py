"""Quantized weights (optional: ``pip install "lightning-bigmodel[quantization]"``): weight-only int8/int4 via torchao.

Importing this package imports neither torchao nor anything heavy: :mod:`.spec` is pure (names, which weights, their
bytes); torchao is imported by :mod:`.torchao` when a load actually quantizes.
"""

from lightning_bigmodel.integrations.quantization.spec import (
    DEFAULT_SKIP_MODULES,
    QUANTIZATIONS,
    Quantization,
    QuantizationSpec,
    quantized_nbytes,
    quantized_weights,
    resolve_quantization,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "QUANTIZATIONS",
    "Quantization",
    "QuantizationSpec",
    "quantized_nbytes",
    "quantized_weights",
    "resolve_quantization",
]
