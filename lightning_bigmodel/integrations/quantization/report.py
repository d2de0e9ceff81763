"""What a quantization request does to a model, in one line: the weights it quantizes, by module type, and the
weight-bearing modules it leaves in the compute dtype, by type, with why and their bytes.

Pure (names, types, shapes and dtypes: works on a meta model). Loading logs the line once per load (a warning when
nothing is quantized or a module type is skipped that the user may expect quantized; else at info level), and the
``plan`` command prints it, so a request that finds nothing to act on never passes in silence.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from lightning_bigmodel.integrations.quantization.spec import (
    QuantizationSpec,
    _skipped,
    linear_shape,
    quantized_nbytes,
    quantized_weights,
)

__all__ = ["quantization_report"]

_BY_DESIGN = ("embeddings are never quantized", "skip list", "tied to another weight")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _reason(name: str, module: nn.Module, spec: QuantizationSpec, uses: dict[int, int]) -> str:
    if isinstance(module, nn.Embedding):
        return _BY_DESIGN[0]
    if _skipped(name, spec.skip_modules):
        return _BY_DESIGN[1]
    if uses.get(id(module._parameters["weight"]), 0) > 1:
        return _BY_DESIGN[2]
    shape = linear_shape(module)
    if shape is not None and spec.method == "int4" and shape[1] % spec.group_size:
        return f"input size not a multiple of {spec.group_size}"
    return "not a linear layer torchao quantizes"


def quantization_report(
    model: nn.Module, spec: QuantizationSpec, dtypes: Optional[Mapping[str, torch.dtype]] = None
) -> tuple[str, bool]:
    """``(line, worth_a_warning)`` describing what ``spec`` quantizes in ``model`` and what it leaves untouched.

    ``dtypes`` (by weight name) is the dtype each weight loads in (default: its own), for the bytes shown.

    ``worth_a_warning`` is true when nothing is quantized, or when a module type is left out for a reason other
    than the design (embeddings), the skip list or a tie (e.g. a ``Conv2d`` or a custom layer with a 2-D weight).
    """
    chosen = quantized_weights(model, spec)
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    done: dict[str, list[int]] = {}  # type -> [count, bytes before, bytes after]
    left: dict[tuple[str, str], list[int]] = {}  # (type, reason) -> [count, bytes]
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() < 2 or not weight.dtype.is_floating_point or id(weight) in seen:
            continue
        seen.add(id(weight))
        key = f"{name}.weight" if name else "weight"
        nbytes = weight.numel() * (dtypes or {}).get(key, weight.dtype).itemsize
        kind = type(module).__name__
        if key in chosen:
            entry = done.setdefault(kind, [0, 0, 0])
            after = quantized_nbytes(spec, *chosen[key])
            entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + nbytes, entry[2] + after
        else:
            entry = left.setdefault((kind, _reason(name, module, spec, uses)), [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + nbytes
    head = f"quantization={spec.method!r}: "
    if done:
        before, after = sum(v[1] for v in done.values()), sum(v[2] for v in done.values())
        kinds = ", ".join(f"{kind} x{v[0]}" for kind, v in done.items())
        head += f"{sum(v[0] for v in done.values())} weight(s) quantized ({kinds}; {_mib(before)} -> {_mib(after)})"
    else:
        head += "found no weight to quantize (it quantizes nn.Linear and transformers' Conv1D weights)"
    if left:
        parts = [f"{kind} x{v[0]} ({_mib(v[1])}: {why})" for (kind, why), v in left.items()]
        head += "; left in the compute dtype: " + ", ".join(parts)
    warn = not done or any(why not in _BY_DESIGN for _, why in left)
    return head + ".", warn
