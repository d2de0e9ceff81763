"""The big-model walk-through as a Lightning script: a GPT-2-shaped model, sharded checkpoint, greedy ``generate``.

Offline (default), a tiny GPT with random weights, part of it on disk::

    python examples/gpt_generate.py

GPT-2-XL (1.5B parameters) from the Hub, where there is internet, over the GPUs you have::

    python examples/gpt_generate.py --preset gpt2-xl --hub-id openai-community/gpt2-xl \\
        --accelerator gpu --devices 2 --device-map balanced_low_0 --prompt "The meaning of life is"

The steps: the model is built on ``meta`` inside ``configure_model`` (no memory); a sharded checkpoint
is written once (random weights, or the Hub weights converted to this GPT's names); the strategy plans
a device map with ``no_split_module_classes=["Block"]`` (a residual block is never split), streams the
checkpoint into it and dispatches; ``predict_step`` calls ``generate`` (10 new tokens, greedy), which
runs ``forward`` once per token over the dispatched model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # `python examples/gpt_generate.py`: make `examples.gpt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.gpt import GPT, GPTConfig  # noqa: E402
from lightning_bigmodel import BigModelInferenceStrategy, save_sharded_checkpoint  # noqa: E402
from lightning_bigmodel.pl._tiny_random import require_demo_folder  # noqa: E402


def random_prompts(vocab_size: int, num_prompts: int = 4, prompt_length: int = 8, seed: int = 0) -> torch.Tensor:
    """``num_prompts`` rows of random token ids (for models with random weights there is no text to speak of)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, prompt_length), generator=generator)


def write_random_checkpoint(preset: str, folder: str | Path, seed: int = 0, max_shard_size: str = "50KB") -> Path:
    """Write a seeded random GPT of ``preset`` as a sharded safetensors checkpoint into ``folder``."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.preset(preset))
    return save_sharded_checkpoint(model, folder, max_shard_size=max_shard_size)


def convert_hub_gpt2(
    hub_id: str, folder: str | Path, max_shard_size: str = "2GB", expected: Optional[GPTConfig] = None
) -> Path:
    """Download a Hugging Face GPT-2 checkpoint and write it with this GPT's tensor names.

    GPT-2's ``Conv1D`` stores weights as ``(in, out)``; ``nn.Linear`` wants ``(out, in)``, so those are
    transposed. The attention-mask buffers of the Hub file are dropped, and ``attn.scale`` is added.
    Needs internet (or the Hub cache); reads one tensor at a time.
    """
    from safetensors import safe_open

    from lightning_bigmodel._hub import hub_snapshot  # offline decided once; a failed lookup is one line

    source = hub_snapshot(hub_id, ["*.safetensors", "*.json"], "`--hub-id`")
    config = json.loads((source / "config.json").read_text())
    if expected is not None and (config["n_layer"], config["n_embd"]) != (expected.n_layer, expected.n_embd):
        raise ValueError(
            f"`--hub-id` {hub_id!r} has n_layer={config['n_layer']}, n_embd={config['n_embd']}, but the preset has "
            f"n_layer={expected.n_layer}, n_embd={expected.n_embd}. Pass the matching `--preset` (e.g. gpt2-xl)."
        )
    head_dim = config["n_embd"] // config["n_head"]
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = key.removeprefix("transformer.")
                if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                    continue  # masks are rebuilt by the model; the LM head is tied to wte
                tensor = f.get_tensor(key)
                state[f"transformer.{name}"] = tensor.t().contiguous() if name.endswith(transposed) else tensor
    for layer in range(config["n_layer"]):
        state[f"transformer.h.{layer}.attn.scale"] = torch.tensor(1.0 / math.sqrt(head_dim))
    return save_sharded_checkpoint(state, folder, max_shard_size=max_shard_size)


class GPTGenerator(LightningModule):
    """Greedy generation with ``examples.gpt.GPT`` under ``Trainer.predict``.

    Args:
        preset: GPT shape (``"tiny"``, ``"gpt2"``, ..., ``"gpt2-xl"``).
        prompts: token-id rows (all of one length); default: ``num_prompts`` random rows.
        num_prompts: random prompts made when ``prompts`` is not given.
        prompt_length: tokens per random prompt.
        max_new_tokens: tokens to generate per prompt.
        batch_size: prompts per batch.
        random_checkpoint_dir: when given, a folder that must exist (checked here, before anything runs); nothing
            writes it: ``lightning-bigmodel demo`` makes ``runs/gpt-tiny``, :func:`write_random_checkpoint` any
            preset. Pass the checkpoint to load as ``ckpt_path``.
    """

    def __init__(
        self,
        preset: str = "tiny",
        prompts: Optional[list[list[int]]] = None,
        num_prompts: int = 4,
        prompt_length: int = 8,
        max_new_tokens: int = 10,
        batch_size: int = 2,
        random_checkpoint_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = GPTConfig.preset(preset)
        if prompts:
            self.prompts = torch.tensor(prompts)
        else:
            self.prompts = random_prompts(self.config.vocab_size, num_prompts, prompt_length)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        if random_checkpoint_dir:  # a missing folder is the not-found error: a config never makes a model
            require_demo_folder("`random_checkpoint_dir`", random_checkpoint_dir)
        self.model: Optional[GPT] = None

    def configure_model(self) -> None:
        if self.model is None:  # idempotent: Lightning may call it more than once
            self.model = GPT(self.config)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.prompts, batch_size=self.batch_size, shuffle=False)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model.generate(batch, max_new_tokens=self.max_new_tokens).cpu()


class TokenWriter(BasePredictionWriter):
    """Save the generated token rows of a predict run (one tensor, prompts included) with ``torch.save``.

    Args:
        output_path: where to write (parent folders are created).
    """

    def __init__(self, output_path: str = "runs/gpt_tokens.pt") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        tokens = torch.cat(list(batches))
        path = self.output_path
        if trainer.world_size > 1:  # replicas: each rank writes its own share, never the same file
            path = path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tokens, path)
        print(f"Wrote {tokens.shape[0]} sequences x {tokens.shape[1]} tokens to {path}")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="GPT shape: tiny, small, gpt2, ..., gpt2-xl (default tiny).")
    parser.add_argument("--hub-id", default=None, help="Hugging Face GPT-2 repo to convert (needs internet).")
    parser.add_argument("--checkpoint-dir", default=None, help="Sharded checkpoint folder (default runs/gpt-<preset>).")
    parser.add_argument("--prompt", default=None, help="Text prompt (with --hub-id; uses the repo's tokenizer).")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", default="1")
    parser.add_argument("--device-map", default="auto", help="auto, balanced, balanced_low_0 or sequential.")
    parser.add_argument("--max-memory", default='{"cpu": "150KB"}', help='JSON budget: {"0": "10GiB", "cpu": "30GiB"}.')
    parser.add_argument("--offload-folder", default="runs/offload")
    parser.add_argument("--output", default="runs/gpt_tokens.pt")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> torch.Tensor:
    args = _parse(argv)
    folder = Path(args.checkpoint_dir or f"runs/gpt-{args.preset}")
    if not (folder.is_dir() and any(folder.iterdir())):
        if args.hub_id:
            made = convert_hub_gpt2(args.hub_id, folder, expected=GPTConfig.preset(args.preset))
        else:
            made = write_random_checkpoint(args.preset, folder)
        print(f"Wrote the sharded checkpoint {made}")
    prompts = None
    if args.prompt:
        from transformers import AutoTokenizer  # examples may use transformers; the library never does

        tokenizer = AutoTokenizer.from_pretrained(args.hub_id or "openai-community/gpt2")
        prompts = [tokenizer(args.prompt)["input_ids"]]
    max_memory = {int(k) if k.isdigit() else k: v for k, v in json.loads(args.max_memory).items()}
    strategy = BigModelInferenceStrategy(
        device_map=args.device_map,
        max_memory=max_memory,
        no_split_module_classes=["Block"],
        offload_folder=args.offload_folder,
    )
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    trainer = Trainer(
        accelerator=args.accelerator, devices=devices, strategy=strategy, logger=False,
        callbacks=[TokenWriter(args.output)], enable_progress_bar=False,
    )  # fmt: skip
    module = GPTGenerator(args.preset, prompts=prompts)
    tokens = torch.cat(trainer.predict(module, ckpt_path=str(folder)))
    if args.prompt:
        print(tokenizer.decode(tokens[0]))
    return tokens


if __name__ == "__main__":
    main()
