"""The command's help and parser errors: top-level help without Lightning, a short `plan --help`, a YAML key typo
reported first with a close match, configs that import `examples` from any directory, and `demo`."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")  # the CLI is built on it

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "lightning-bigmodel: error: "


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    """Whether the project imports without the repository on PYTHONPATH (it is installed, as a user has it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('lightning_bigmodel') is None)"
    return subprocess.run([sys.executable, "-c", check], env=env, cwd=tempfile.gettempdir()).returncode == 0


def run_module(args, cwd, env=None):
    """``python -m lightning_bigmodel ARGS`` from ``cwd`` with the repository NOT on PYTHONPATH (as a user runs it)."""
    if not _installed():
        pytest.skip("needs the project installed (pip install -e .): run as a user does, without the repo on PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lightning_bigmodel", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_top_level_help_and_usage_errors_import_neither_lightning_nor_torch():
    code = (
        "import sys, contextlib, io\n"
        "from lightning_bigmodel._command import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    main(['--help'])\n"
        "try:\n"
        "    main(['trian'])\n"
        "except SystemExit as e:\n"
        "    print(e.code)\n"
        "heavy = sorted(m for m in ('lightning', 'torch', 'jsonargparse', 'transformers') if m in sys.modules)\n"
        "print(out.getvalue().count('\\n'), heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == (
        "lightning-bigmodel: error: unknown subcommand 'trian'; choose `predict`, `plan`, `demo`, `verify`."
    )
    count, heavy = lines[1].split(" ", 1)
    assert heavy == "[]" and 5 < int(count) < 20  # the three subcommands, nothing imported


def test_plan_help_is_short_and_lists_no_module_classes(capsys):
    from lightning_bigmodel.pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 150, len(out.splitlines())
    assert "--max_memory" in out and "--model" in out and "torch.nn.Linear" not in out


def test_a_yaml_key_typo_is_reported_first_with_a_close_match(tmp_path, capsys):
    from lightning_bigmodel.pl.cli import main

    config = tmp_path / "typo.yaml"
    text = (ROOT / "configs" / "gpt_tiny.yaml").read_text()
    config.write_text(text.replace("offload_folder: runs/offload", "offload_fodler: runs/offload"))
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        PREFIX + "`offload_fodler` is not an option of `lightning_bigmodel.BigModelInferenceStrategy`; did you mean"
        " `offload_folder`?"
    )
    assert len(err) <= 12 and not any(line.startswith("usage:") for line in err), err
    assert err[-1] == "Options: `lightning-bigmodel predict --help`."


def test_a_top_level_key_typo_names_the_key_and_the_close_one(tmp_path, capsys):
    from lightning_bigmodel.pl.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "--config", str(ROOT / "configs" / "gpt_tiny.yaml"), "--trainer.acclerator", "cpu"])
    first = capsys.readouterr().err.splitlines()[0]
    assert first == PREFIX + "`trainer.acclerator` is not an option; did you mean `trainer.accelerator`?"


def test_configs_that_import_examples_work_from_another_directory(tmp_path):
    done = run_module(["plan", "--config", str(ROOT / "configs" / "plan_gpt2_xl.yaml")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Plan for GPT" in done.stdout


def test_a_config_whose_examples_cannot_be_imported_says_where_to_run_from(tmp_path):
    (tmp_path / "configs").mkdir()  # a copy outside the repository: nothing holds `examples/`
    copy = tmp_path / "configs" / "plan.yaml"
    copy.write_text((ROOT / "configs" / "plan_gpt2_xl.yaml").read_text())
    done = run_module(["plan", "--config", str(copy)], cwd=tmp_path)
    assert done.returncode == 2
    first = done.stderr.splitlines()[0]
    assert first == (
        PREFIX + "cannot import `examples.gpt.GPT` (No module named 'examples'): run from the repository root (the"
        " folder that holds `examples/`), or add its folder to PYTHONPATH."
    )


def test_demo_writes_the_demo_models_once(tmp_path):
    pytest.importorskip("transformers")
    done = run_module(["demo", "--dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "tiny-llama" / "config.json").is_file()
    assert (tmp_path / "runs" / "tiny-mixtral" / "model.safetensors.index.json").is_file()
    for folder in ("gpt-tiny", "minilm-sharded"):  # the checkpoints of gpt_tiny/replicas_cpu.yaml and minilm_embed.yaml
        assert (tmp_path / "runs" / folder / "model.safetensors.index.json").is_file(), done.stdout
    assert f"Created 'tiny-random-llama' in {tmp_path / 'runs' / 'tiny-llama'}" in done.stdout
    again = run_module(["demo", "--dir", str(tmp_path / "runs")], cwd=tmp_path)
    assert "Kept 'tiny-random-llama'" in again.stdout and "Created 'tiny-random" not in again.stdout


NOISY_API_USE = """
import logging, warnings
logging.basicConfig()
import torch
import lightning.pytorch as pl
from torch.utils.data import DataLoader
from lightning_bigmodel import BigModelInferenceStrategy
try:
    import transformers, torchao  # noqa: F401  (torchao's kernel-load warnings, torch's enum notices)
except ImportError:
    pass

class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def predict_step(self, batch, batch_idx):
        return self.net(batch)

trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     strategy=BigModelInferenceStrategy(device_map={"": "cpu"}))
trainer.predict(M(), DataLoader(torch.randn(8, 4), batch_size=4))
warnings.warn("the user's own deprecation", FutureWarning)
logging.getLogger("torchao").warning("the user's own torchao-logger line")
"""


def test_the_python_api_drops_the_noise_our_imports_cause_but_not_the_users(tmp_path):
    # from tmp_path: the Trainer writes device_map.json into its working directory
    done = subprocess.run([sys.executable, "-c", NOISY_API_USE], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for noise in ("💡 Tip", "LeafSpec", "Failed to load", "is an Enum subclass", "Detected no triton"):
        assert noise not in output, output[-3000:]
    assert "FutureWarning: the user's own deprecation" in output
    assert "the user's own torchao-logger line" in output
    assert "Device map:" in output  # our own report stays
