"""Tiny random transformers models saved in the Hub layout (``save_pretrained`` in shards), for the model-zoo tests.

Each entry builds a model from a tiny config (seeded), and gives inputs for a forward and, for generative models, a
``generate`` call. ``save_pretrained`` writes the Hub layout (transformers reverts its conversion rules on save), so
loading the folder exercises the same renames and expert merges as a real Hub checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)  # greedy: comparable token for token
SHARD = "20KB"  # several shards per tiny model, so merged experts come from more than one file


def _text(**overrides) -> dict:
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    config.update(overrides)
    return config


def _configs() -> dict[str, tuple[str, Callable]]:
    import transformers as T

    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=32)  # fmt: skip
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    return {
        "gpt2": ("GPT2LMHeadModel", lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                         bos_token_id=1, eos_token_id=2)),  # fmt: skip
        "llama": ("LlamaForCausalLM", lambda: T.LlamaConfig(**_text())),
        "mistral": ("MistralForCausalLM", lambda: T.MistralConfig(**_text())),
        "qwen2": ("Qwen2ForCausalLM", lambda: T.Qwen2Config(**_text(tie_word_embeddings=True))),
        "gemma3": ("Gemma3ForCausalLM", lambda: T.Gemma3TextConfig(**_text(head_dim=8))),
        "mixtral": ("MixtralForCausalLM", lambda: T.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2))),
        "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: T.Qwen3MoeConfig(**_text(head_dim=8, **moe))),
        "deepseek_v3": ("DeepseekV3ForCausalLM", lambda: T.DeepseekV3Config(**_text(
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
            topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            n_shared_experts=1))),  # fmt: skip
        "t5": ("T5ForConditionalGeneration", lambda: T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64,
                                                                num_layers=2, num_heads=4, decoder_start_token_id=0)),
        "bert": ("BertModel", lambda: T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64)),  # fmt: skip
        "vit": ("ViTModel", lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8)),  # fmt: skip
        "llava": ("LlavaForConditionalGeneration", lambda: T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**clip), text_config=T.LlamaConfig(**_text()), image_token_index=127)),
    }


ZOO = ("gpt2", "llama", "mistral", "qwen2", "gemma3", "mixtral", "qwen3_moe", "deepseek_v3", "t5", "bert", "vit",
       "llava")  # fmt: skip
MOE = ("mixtral", "qwen3_moe", "deepseek_v3")
SEQ2SEQ = ("t5",)
ENCODERS = ("bert", "vit")


@dataclass
class HubModel:
    """A saved tiny model: its folder, class and config, and the reference loaded by transformers itself."""

    name: str
    folder: Path
    cls: type
    config: object
    reference: torch.nn.Module
    _expected: list = field(default_factory=list)

    def inputs(self) -> dict[str, torch.Tensor]:
        """Inputs for one forward (fixed seed)."""
        g = torch.Generator().manual_seed(1)
        if self.name == "vit":
            return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
        ids = torch.randint(3, 120, (2, 7), generator=g)
        if self.name == "t5":
            return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 120, (2, 4), generator=g)}
        if self.name == "llava":
            image_tokens = torch.full((2, 16), 127)  # 32x32 image, 8x8 patches: 16 features per image
            return {"input_ids": torch.cat([ids[:, :2], image_tokens, ids[:, 2:]], 1),
                    "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}  # fmt: skip
        return {"input_ids": ids}

    @property
    def generates(self) -> bool:
        return self.name not in ENCODERS

    def prompt(self) -> dict[str, torch.Tensor]:
        """The inputs of a ``generate`` call (the forward's, without decoder inputs)."""
        return {k: v for k, v in self.inputs().items() if k != "decoder_input_ids"}

    def expected(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The reference's forward output and greedy ``generate`` tokens (``None`` for encoders), computed once."""
        if not self._expected:
            with torch.no_grad():
                forward = outputs_of(self.reference(**self.inputs()))
            tokens = self.reference.generate(**self.prompt(), **GENERATE) if self.generates else None
            self._expected.append((forward, tokens))
        return self._expected[0]


def save_hub_model(name: str, folder: Path) -> HubModel:
    """Build the tiny ``name`` model with seed 0, ``save_pretrained`` it in shards into ``folder``, and load the
    reference back with ``from_pretrained`` (transformers' own loading, eval mode)."""
    import transformers as T

    class_name, make_config = _configs()[name]
    cls = getattr(T, class_name)
    torch.manual_seed(0)
    cls(make_config()).save_pretrained(folder, max_shard_size=SHARD)
    reference = cls.from_pretrained(folder).eval()
    return HubModel(name, folder, cls, reference.config, reference)


def outputs_of(result) -> torch.Tensor:
    """The main tensor of a transformers output: logits, else the last hidden state."""
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state
