"""transformers' own checkpoint conversion rules, applied to checkpoint *names* first and to tensors one target at a time.

``from_pretrained`` renames Hub checkpoint keys and builds some model tensors from several checkpoint tensors (per-expert
weights stacked into fused 3-D expert tensors, concatenations, splits). This module asks transformers for the rules of
the model class (``transformers.conversion_mapping.get_model_conversion_mapping``) and matches keys with its own
``rename_source_key``, in its own order (``dot_natural_key``), so the result is what ``from_pretrained`` would load.
Nothing is read here: :func:`plan_conversion` works from the checkpoint's headers, and finds the shapes of converted
tensors by running the conversion on meta tensors. :func:`convert_unit` then builds one conversion's targets from
its source tensors only.

transformers is imported inside the functions (it is an optional dependency).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lightning_bigmodel.checkpoint.reader import TensorSpec
from lightning_bigmodel.integrations.transformers import INSTALL_HINT
_SHOWN = 5


@dataclass
class Unit:
    """One ``WeightConverter`` application: the checkpoint keys it gathers and the model tensors it makes.

    Attributes:
        layer: the first target name (transformers' ``layer_name`` for the conversion).
        converter: a fresh copy of the transformers ``WeightConverter`` (copied again for every run).
        sources: ``(source_pattern, checkpoint_key)`` in transformers' order (experts by index).
        outputs: model name -> ``(shape, dtype)`` of each tensor it makes, from a meta run.
    """

    layer: str
    converter: Any
    sources: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[str, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)


@dataclass
class ConversionPlan:
    """Checkpoint keys seen through a model's conversion rules.

    Attributes:
        renamed: model name -> checkpoint key, for tensors read as they are (a rename, or no change).
        units: conversions, each making one or more model tensors from several checkpoint tensors.
        unexpected: checkpoint keys that fit no model tensor, neither as they are nor through a rule.
    """

    renamed: dict[str, str] = field(default_factory=dict)
    units: list[Unit] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def transformers_import_error(err: ImportError) -> ImportError:
    return ImportError(
        "This is a transformers model whose checkpoint names differ from its modules, so transformers' conversion "
        f"rules are needed to load it, but they cannot be imported ({err}). Install the extra: {INSTALL_HINT} "
        "(transformers 5 or newer)."
    )


def _transformers():
    """The transformers functions used here; a clear ``ImportError`` naming the extra when they are missing."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            Concatenate,
            MergeModulelist,
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError as err:
        raise transformers_import_error(err) from err
    return {
        "mapping": get_model_conversion_mapping,
        "rename": rename_source_key,
        "order": dot_natural_key,
        "Converter": WeightConverter,
        "Renaming": WeightRenaming,
        "Merge": MergeModulelist,
        "Concatenate": Concatenate,
    }


def rename_keys(network: nn.Module, keys: Sequence[str]) -> tuple[dict[str, str], dict[str, tuple], list[str]]:
    """Match checkpoint ``keys`` to ``network``'s names with transformers' rules, as ``from_pretrained`` does.

    Returns:
        ``(renamed, converted, unexpected)``: model name -> key for plain reads; key -> ``(first target, source
        pattern, converter)`` for keys a ``WeightConverter`` takes; and the keys that fit nothing.
    """
    tf = _transformers()
    rules = tf["mapping"](network)
    renamings = [rule for rule in rules if isinstance(rule, tf["Renaming"])]
    converters = [rule for rule in rules if isinstance(rule, tf["Converter"])]
    by_pattern = {pattern: rule for rule in converters for pattern in rule.source_patterns}
    model_names = dict.fromkeys(network.state_dict(keep_vars=True))
    prefix = getattr(network, "base_model_prefix", None) or None
    renamed: dict[str, str] = {}
    converted: dict[str, tuple] = {}
    unexpected: list[str] = []
    for key in sorted(keys, key=tf["order"]):
        name, pattern = tf["rename"](key, renamings, converters, prefix, model_names)
        if name not in model_names and key in model_names:  # as transformers: an exact name is not renamed away
            name, pattern = tf["rename"](key, [], [], base_model_prefix=prefix, meta_state_dict=model_names)
        if name not in model_names:
            unexpected.append(key)
        elif pattern is not None:
            converted[key] = (name, pattern, by_pattern[pattern])
        elif name in renamed:  # two keys for one name (e.g. both layouts in one checkpoint): keep the first
            unexpected.append(key)
        else:
            renamed[name] = key
    return renamed, converted, unexpected


def plan_conversion(network: nn.Module, specs: Mapping[str, TensorSpec]) -> ConversionPlan:
    """The conversion of a checkpoint (its keys and header ``specs``) into ``network``'s tensors, nothing read.

    Raises:
        ImportError: transformers (5 or newer) cannot be imported; the message names the extra.
        ValueError: a conversion's sources disagree in dtype or shape (naming the target and the sources).
    """
    renamed, converted, unexpected = rename_keys(network, list(specs))
    units: dict[str, Unit] = {}
    for key, (name, pattern, rule) in converted.items():  # in transformers' order
        unit = units.get(name)
        if unit is None:
            unit = units[name] = Unit(name, copy.deepcopy(rule))
        unit.sources.append((pattern, key))
    plan = ConversionPlan(renamed=renamed, unexpected=unexpected)
    for unit in units.values():
        unit.outputs = _meta_outputs(network, unit, specs)
        plan.units.append(unit)
    return plan


def _describe(unit: Unit, specs: Mapping[str, TensorSpec]) -> str:
    """A few sources with shape and dtype, those unlike the rest of their pattern first."""
    common = {}
    for pattern, _ in unit.sources:
        kinds = [(tuple(specs[k].shape), specs[k].dtype) for p, k in unit.sources if p == pattern]
        common[pattern] = max(set(kinds), key=kinds.count)
    odd = [(p, k) for p, k in unit.sources if (tuple(specs[k].shape), specs[k].dtype) != common[p]]
    ordered = odd + [source for source in unit.sources if source not in odd]
    shown = [f"`{key}` {list(specs[key].shape)} {specs[key].dtype}" for _, key in ordered[:_SHOWN]]
    more = f", ... ({len(unit.sources)} in all)" if len(unit.sources) > _SHOWN else ""
    return ", ".join(shown) + more


def _meta_outputs(network: nn.Module, unit: Unit, specs: Mapping[str, TensorSpec]) -> dict:
    """Shapes and dtypes of what ``unit`` makes: transformers' conversion run on meta tensors (no data)."""
    dtypes = {specs[key].dtype for _, key in unit.sources}
    if len(dtypes) > 1:
        raise ValueError(
            f"Cannot build `{unit.layer}`: its checkpoint tensors disagree in dtype ({_describe(unit, specs)}). "
            "The checkpoint is inconsistent: re-save it, or check that it belongs to this model class and revision."
        )
    try:
        outputs = convert_unit(network, unit, lambda key: torch.empty(specs[key].shape, dtype=specs[key].dtype,
                                                                     device="meta"), fast=False)  # fmt: skip
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(
            f"Cannot build `{unit.layer}` from its checkpoint tensors ({_describe(unit, specs)}): {err}. The sources "
            "disagree in shape: check that the checkpoint belongs to this model class and revision (config)."
        ) from err
    return {name: (tensor.shape, tensor.dtype) for name, tensor in outputs.items()}


def convert_unit(
    network: nn.Module, unit: Unit, load: Callable[[str], torch.Tensor], fast: bool = True
) -> dict[str, torch.Tensor]:
    """Build ``unit``'s model tensors from its sources, each obtained by ``load(checkpoint_key)`` when needed.

    Expert merges (transformers' ``MergeModulelist``, optionally followed by ``Concatenate``) are written straight
    into one preallocated result when ``fast`` and the shapes are known: the extra memory is the result alone, not
    the stacked intermediates ``torch.stack``/``torch.cat`` would also hold. Every other rule runs transformers'
    own operations.
    """
    if fast and unit.outputs and _is_merge(unit):
        return _merge_into(unit, load)
    converter = copy.deepcopy(unit.converter)
    for pattern, key in unit.sources:
        converter.add_tensor(unit.layer, key, pattern, lambda key=key: load(key))  # read when the op needs it
    with torch.no_grad():
        made = converter.convert(unit.layer, model=network, config=getattr(network, "config", None))
    return {name: value[0] if isinstance(value, list) else value for name, value in made.items()}


def _is_merge(unit: Unit) -> bool:
    tf = _transformers()
    ops = list(unit.converter.operations)
    if len(unit.outputs) != 1 or not ops or type(ops[0]) is not tf["Merge"]:
        return False
    if len(ops) == 1:
        return len(unit.converter.source_patterns) == 1
    return len(ops) == 2 and type(ops[1]) is tf["Concatenate"]


def _merge_into(unit: Unit, load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cat([stack(sources of pattern p) for p in patterns], concat_dim)`` written into one allocation."""
    (name, (shape, dtype)), = unit.outputs.items()
    ops = unit.converter.operations
    stack_dim = ops[0].dim
    concat_dim = ops[1].dim if len(ops) > 1 else None
    out = torch.empty(shape, dtype=dtype)
    offset = 0
    for pattern in unit.converter.source_patterns:  # Concatenate's order: the rule's source patterns
        keys = [key for p, key in unit.sources if p == pattern]
        if not keys:
            continue
        if concat_dim is None:
            part = out
        else:
            width = _stacked_size(load(keys[0]).shape, len(keys), stack_dim, concat_dim)
            part = out.narrow(concat_dim, offset, width)
            offset += width
        for index, key in enumerate(keys):
            part.select(stack_dim, index).copy_(load(key))
    return {name: out}


def _stacked_size(source_shape: torch.Size, count: int, stack_dim: int, concat_dim: int) -> int:
    stacked = list(source_shape)
    stacked.insert(stack_dim if stack_dim >= 0 else len(stacked) + 1 + stack_dim, count)
    return stacked[concat_dim]
