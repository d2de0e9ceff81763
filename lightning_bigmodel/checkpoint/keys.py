"""Match checkpoint keys to model keys: find the prefix that puts a bare network's checkpoint into a wrapper.

A LightningModule usually holds its network as an attribute (``self.model``), so its keys read
``model.transformer.h.0.attn.c_attn.weight`` while a Hub or accelerate checkpoint of the network reads
``transformer.h.0.attn.c_attn.weight``. :func:`infer_key_prefix` finds the prefix (here ``"model."``) such that the
prefixed checkpoint keys are the keys of exactly one submodule. Linear in the number of keys.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

_SHOWN = 5  # keys of each side shown in an error


def _dotted_splits(key: str) -> Iterable[tuple[str, str]]:
    """``(prefix, rest)`` for every dotted split of ``key``, ``("", key)`` first; ``prefix`` ends with a dot."""
    yield "", key
    start = 0
    while True:
        cut = key.find(".", start)
        if cut < 0:
            return
        yield key[: cut + 1], key[cut + 1 :]
        start = cut + 1


def _prefix_counts(checkpoint_keys: Sequence[str], model_keys: Iterable[str]) -> Counter:
    """For every candidate prefix: how many checkpoint keys, prefixed with it, are model keys."""
    wanted = set(checkpoint_keys)
    counts: Counter = Counter()
    for model_key in set(model_keys):
        for prefix, rest in _dotted_splits(model_key):
            if rest in wanted:
                counts[prefix] += 1
    return counts


def _sample(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(key) for key in list(keys)[:_SHOWN])
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return f"[{shown}{more}]"


def infer_key_prefix(checkpoint_keys: Sequence[str], model_keys: Sequence[str]) -> str:
    """The prefix to put before every checkpoint key so that it names a model key.

    ``""`` when the checkpoint already matches the model (a Lightning ``.ckpt``); ``"model."`` for a bare network's
    checkpoint loaded into a module holding it as ``self.model``. The winning prefix must place more checkpoint keys
    than any other and at least half of them (the rest are reported as unexpected by the strict check).

    Args:
        checkpoint_keys: tensor names in the checkpoint.
        model_keys: the model's ``state_dict`` keys (parameters and persistent buffers, tied names included).

    Raises:
        ValueError: when no prefix places at least half of the checkpoint keys, or several prefixes place as many
            (e.g. a module holding two copies of one network), showing a few keys of each side.
    """
    checkpoint_keys = list(checkpoint_keys)
    model_keys = list(model_keys)
    if not checkpoint_keys:
        raise ValueError("The checkpoint holds no tensors: check the `ckpt_path`/`checkpoint` you passed.")
    counts = _prefix_counts(checkpoint_keys, model_keys)
    if counts.get("", 0) == len(checkpoint_keys):
        return ""  # an exact match needs no prefix, even when a submodule would also fit
    ranked = counts.most_common()
    best_count = ranked[0][1] if ranked else 0
    winners = sorted(prefix for prefix, count in ranked if count == best_count)
    if best_count * 2 >= len(checkpoint_keys) and len(winners) == 1:
        return winners[0]
    sides = f"Checkpoint keys: {_sample(checkpoint_keys)}. Model keys: {_sample(model_keys)}."
    if best_count * 2 >= len(checkpoint_keys):
        options = ", ".join(repr(prefix) for prefix in winners)
        raise ValueError(
            f"The checkpoint keys fit several submodules equally well (prefixes {options}). {sides} "
            f"Pass `key_prefix=` (one of {options}) to `BigModelInferenceStrategy`."
        )
    raise ValueError(
        "Could not match the checkpoint keys to the model: no submodule holds at least half of them. "
        f"{sides} Pass `key_prefix=` (the prefix that turns a checkpoint key into a model key, e.g. \"model.\") "
        "to `BigModelInferenceStrategy`, or check that the checkpoint belongs to this model."
    )
