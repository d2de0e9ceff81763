"""What quantization means for a model, without torchao: the accepted names, which weights get quantized, their bytes.

Pure: reads module types, names and shapes only (works on a meta model), so the planner can size quantized weights
and a bad name fails before anything is imported or read. The quantizing itself is in
:mod:`lightning_bigmodel.integrations.quantization.torchao`.

Which weights: the ``weight`` of every ``nn.Linear`` (as torchao's own ``quantize_`` picks them: not the
``out_projection`` of ``nn.MultiheadAttention``, which never calls ``F.linear`` on it) and of every transformers
``Conv1D`` (GPT-2 and its family: a linear layer storing its weight transposed, ``(in, out)``; torchao's ``quantize_``
skips it, which quantized nothing in GPT-2), except

* weights tied to another parameter (a tied LM head shares the embedding, which stays in the compute dtype),
* modules matched by ``skip_modules`` (default ``["lm_head"]``: the LM head stays in the compute dtype unless asked),
* for ``"int4"``, weights whose input size is not a multiple of the group size.

Embeddings, norms, biases and buffers are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

from torch import nn

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "INT4_GROUP_SIZE",
    "QUANTIZATIONS",
    "Quantization",
    "QuantizationSpec",
    "quantized_nbytes",
    "quantized_weights",
    "resolve_quantization",
    "revert_linear_forms",
    "transposed_weights",
]

Quantization = Literal["int8", "int4"]
QUANTIZATIONS = ("int8", "int4")
DEFAULT_SKIP_MODULES = ("lm_head",)
INT4_GROUP_SIZE = 128  # torchao's default; one bf16 scale and zero point per 128 input features


@dataclass(frozen=True)
class QuantizationSpec:
    """A checked quantization request.

    Attributes:
        method: ``"int8"`` (weight-only, per output channel) or ``"int4"`` (weight-only, groups of ``group_size``).
        skip_modules: module names (or dotted name parts) whose ``nn.Linear`` weights stay in the compute dtype.
        group_size: input features per scale for ``"int4"``.
    """

    method: str
    skip_modules: tuple[str, ...] = DEFAULT_SKIP_MODULES
    group_size: int = INT4_GROUP_SIZE


def resolve_quantization(
    quantization: Union[str, QuantizationSpec, None], skip_modules: Optional[Sequence[str]] = None
) -> Optional[QuantizationSpec]:
    """Check ``quantization`` (and ``skip_modules``) and return the spec, or ``None`` when none is asked.

    ``skip_modules=None`` keeps the default ``["lm_head"]``; a list given replaces it (``[]`` quantizes the LM head
    too). An entry matches a module whose dotted name is it, contains it as whole parts, or lies under such a module.

    Raises:
        ValueError: an unknown name, a skip list that is not a list of names, or a skip list without a quantization.
    """
    if isinstance(quantization, QuantizationSpec):
        return quantization
    if quantization is None:
        if skip_modules:
            raise ValueError(
                f"`quantization_skip_modules`={list(skip_modules)!r} is given without `quantization`. Pass "
                f"`quantization=` one of {list(QUANTIZATIONS)}, or drop the skip list."
            )
        return None
    if not isinstance(quantization, str) or quantization.strip().lower() not in QUANTIZATIONS:
        raise ValueError(
            f"`quantization`={quantization!r} is not supported. Use one of {list(QUANTIZATIONS)} (weight-only, through "
            "torchao), or None to load the weights in the compute dtype."
        )
    if skip_modules is None:
        skip = DEFAULT_SKIP_MODULES
    elif isinstance(skip_modules, str) or not all(isinstance(name, str) for name in skip_modules):
        raise ValueError(
            f"`quantization_skip_modules`={skip_modules!r} must be a list of module names, e.g. [\"lm_head\"]."
        )
    else:
        skip = tuple(skip_modules)
    return QuantizationSpec(quantization.strip().lower(), skip)


def _skipped(module_name: str, skip_modules: Sequence[str]) -> bool:
    """Whether ``module_name`` is, or lies under, a module matched by an entry (a name or a run of its dotted parts)."""
    padded = f".{module_name}."
    return any(f".{entry.strip('.')}." in padded for entry in skip_modules if entry.strip("."))


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (or a subclass), recognised by name: transformers is not imported for it."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(out_features, in_features)`` of a quantizable linear layer's float weight, else ``None``.

    ``nn.Linear`` stores ``(out, in)``; transformers' ``Conv1D`` stores ``(in, out)`` (one already converted by
    loading computes with an ``(out, in)`` weight and says so with ``_bigmodel_linear_weight``)."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None
    if isinstance(module, nn.Linear) or getattr(module, "_bigmodel_linear_weight", False):
        return tuple(weight.shape)
    if is_conv1d(module):
        return weight.shape[1], weight.shape[0]
    return None


def quantized_weights(model: nn.Module, spec: Optional[QuantizationSpec]) -> dict[str, tuple[int, int]]:
    """``{weight name: (out_features, in_features)}`` of the weights ``spec`` quantizes (``{}`` for ``None``)."""
    if spec is None:
        return {}
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None or _skipped(name, spec.skip_modules):
            continue
        if uses.get(id(module._parameters["weight"]), 0) > 1:
            continue  # tied: quantizing it would quantize its partner (the embedding) too
        if spec.method == "int4" and shape[1] % spec.group_size:
            continue
        out[f"{name}.weight" if name else "weight"] = shape
    return out


def transposed_weights(model: nn.Module, names) -> frozenset[str]:
    """Those of the weight ``names`` that belong to a transformers ``Conv1D`` still storing them ``(in, out)``."""
    out = set()
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        if is_conv1d(module) and not getattr(module, "_bigmodel_linear_weight", False):
            out.add(name)
    return frozenset(out)


def quantized_nbytes(spec: QuantizationSpec, out_features: int, in_features: int) -> int:
    """Bytes of one quantized ``(out_features, in_features)`` weight as torchao stores it.

    ``"int8"``: int8 data, plus a float32 scale and an int8 zero point per output row (torchao ``Int8Tensor``).
    ``"int4"``: two values per byte, plus a bfloat16 scale and zero point per group, on the shape torchao's tinygemm
    layout pads to (input features to a multiple of 1024, output features to a multiple of 8).
    """
    if spec.method == "int8":
        return out_features * in_features + out_features * (4 + 1)
    rows, cols = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
    return rows * cols // 2 + (cols // spec.group_size) * rows * 2 * 2


def revert_linear_forms(model: nn.Module) -> None:
    """Turn back each ``Conv1D`` that loading made compute with an ``(out, in)`` quantized weight, once that weight was
    released to meta: its class and its ``(in, out)`` meta weight, so that the checkpoint loads into it again."""
    for module in model.modules():
        weight = module._parameters.get("weight")
        if getattr(type(module), "_bigmodel_linear_weight", False) and weight is not None and weight.is_meta:
            module.__class__ = type(module).__mro__[1]
            empty = weight.new_empty((weight.shape[1], weight.shape[0]))
            module._parameters["weight"] = nn.Parameter(empty, requires_grad=weight.requires_grad)
