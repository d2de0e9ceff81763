"""Refuse a checkpoint that is already quantized in another format (GPTQ, AWQ, bitsandbytes, FP8, ...).

Quantizing while loading starts from floating-point weights; a checkpoint holding packed integer weights and their
scales would either fail much later with a shape error or, worse, be cast as if its codes were weights. The signs
checked here come from the names and dtypes in the checkpoint's headers and its ``config.json``: no weight is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

__all__ = ["check_not_prequantized"]

# Tensor names only quantized formats write (last dotted part), and the format that writes them.
_FORMAT_NAMES = {
    "qweight": "GPTQ/AWQ",
    "qzeros": "GPTQ/AWQ",
    "g_idx": "GPTQ",
    "SCB": "bitsandbytes int8",
    "weight_format": "bitsandbytes int8",
    "absmax": "bitsandbytes 4-bit",
    "quant_map": "bitsandbytes 4-bit",
    "nested_absmax": "bitsandbytes 4-bit",
    "weight_scale_inv": "FP8 (block-scaled)",
    "weight_packed": "compressed-tensors",
    "weight_zero_point": "compressed-tensors",
}
_SCALE_NAMES = ("scale", "scales", "weight_scale", "SCB")
_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))
_CODE_DTYPES = {torch.int8, torch.uint8, torch.int32, *_FP8}
_FIX = (
    "Quantizing while loading needs floating-point weights: point `checkpoint` at the unquantized (fp32/bf16/fp16) "
    "weights, or drop `quantization=` and load this checkpoint with the library that wrote it."
)


def _config_quantization(root: Path) -> Optional[str]:
    """The ``quant_method`` (or ``"yes"``) when ``root/config.json`` declares a ``quantization_config``."""
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not ours to validate; the weights are checked below
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return str(method) if method else "yes"


def _suspicious(keys: dict[str, torch.dtype]) -> list[str]:
    """Keys that only quantized formats write, and integer/FP8 ``weight`` tensors that have a scale beside them."""
    found = []
    for key, dtype in keys.items():
        module, _, last = key.rpartition(".")
        if last in _FORMAT_NAMES or ".quant_state." in f".{key}":
            found.append(f"`{key}` ({_FORMAT_NAMES.get(last, 'bitsandbytes 4-bit')})")
        elif last == "weight" and dtype in _CODE_DTYPES:
            companions = [f"{module}.{name}" if module else name for name in _SCALE_NAMES]
            scaled = any(c in keys for c in companions)
            if scaled or dtype not in (torch.int8, torch.uint8, torch.int32):  # FP8 weights are quantized anyway
                found.append(f"`{key}` ({str(dtype).removeprefix('torch.')} weight{' with scales' if scaled else ''})")
    return found


def check_not_prequantized(root: Path, keys: Iterable[tuple[str, torch.dtype]], where: str) -> None:
    """Raise ``ValueError`` when the checkpoint at ``root`` (shown as ``where``) is already quantized.

    Args:
        root: the checkpoint's folder (its ``config.json`` is read when there is one).
        keys: ``(name, dtype)`` of every tensor, from the checkpoint's headers.
        where: how to name the checkpoint in the message.
    """
    method = _config_quantization(root)
    if method is not None:
        raise ValueError(
            f"Checkpoint {where!r} is already quantized: its config.json has a `quantization_config` (quant_method "
            f"{method!r}), and `quantization=` cannot re-quantize it. {_FIX}"
        )
    found = _suspicious(dict(keys))
    if found:
        shown = found[:5] + ([f"... ({len(found) - 5} more)"] if len(found) > 5 else [])
        raise ValueError(
            f"Checkpoint {where!r} looks already quantized in another format: {', '.join(shown)}. {_FIX}"
        )
