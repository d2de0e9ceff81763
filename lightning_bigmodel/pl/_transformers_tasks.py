"""The three jobs of :class:`~lightning_bigmodel.pl.transformers_module.TransformersModule`, one batch at a time.

Pure functions of a (dispatched) transformers model, its tokenizer and a tokenized batch; they return what the
prediction writer stores: one row (or one item) per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

TASKS = ("generate", "embed", "logits")
POOLINGS = ("mean", "cls", "last")


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of ``task: generate`` (``None`` keeps the model's ``generation_config`` value)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0


def generate(model: Any, tokenizer: Any, batch: dict[str, Tensor], texts: Sequence[str], sampling: Sampling) -> list:
    """Continue every prompt of ``batch`` (left-padded); one ``{"index", "prompt", "completion", "token_ids"}`` each.

    With sampling, the global RNG is seeded with ``seed`` plus the batch's first prompt index, so a rerun of the same
    batch (e.g. after a resume) draws the same tokens.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    indices = [int(i) for i in batch["index"]]
    options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample}
    if sampling.do_sample:
        options.update({k: v for k, v in vars(sampling).items() if k in ("temperature", "top_k", "top_p") and v})
        torch.manual_seed(sampling.seed + indices[0])
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, pad_token_id=tokenizer.pad_token_id, **options
    )
    start = 1 if model.config.is_encoder_decoder else input_ids.shape[1]  # seq2seq outputs start with one start token
    stops = _eos_ids(model)
    results = []
    for index, text, row in zip(indices, texts, output[:, start:].tolist()):
        tokens = _until_eos(row, stops)
        completion = tokenizer.decode(tokens, skip_special_tokens=True)
        results.append({"index": index, "prompt": text, "completion": completion, "token_ids": tokens})
    return results


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _until_eos(tokens: list[int], stops: set[int]) -> list[int]:
    """The generated tokens up to and including the first end-of-sequence token (what follows is padding)."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[: position + 1]
    return tokens


def embed(model: Any, batch: dict[str, Tensor], pooling: str, normalize: bool) -> Tensor:
    """One vector per prompt of the (right-padded) batch: the mean of its token states, its first or last token."""
    attention_mask = batch["attention_mask"]
    hidden = model(input_ids=batch["input_ids"], attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.to(hidden.device)
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    elif pooling == "cls":
        vectors = hidden[:, 0]
    else:
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(dim=1) - 1]
    vectors = vectors.float()
    return F.normalize(vectors, p=2, dim=-1) if normalize else vectors


def logits(model: Any, batch: dict[str, Tensor], positions: str) -> Any:
    """The model's logits for each prompt of the (right-padded) batch: at its last token (a ``[batch, vocab]``
    tensor) or at every token (a list of ``[tokens, vocab]`` tensors, padding removed)."""
    attention_mask = batch["attention_mask"]
    scores = model(input_ids=batch["input_ids"], attention_mask=attention_mask).logits.float()
    if scores.dim() == 2:  # one row per prompt already (a sequence-classification head)
        return scores
    lengths = attention_mask.sum(dim=1).to(scores.device)
    if positions == "last":
        return scores[torch.arange(scores.shape[0], device=scores.device), lengths - 1]
    return [row[:length] for row, length in zip(scores, lengths.tolist())]
