"""Every YAML in configs/ starts with a comment (what it needs, the command that runs it) and parses with the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jsonargparse")  # the CLI is built on it; the GPU machine may lack it
from lightning_bigmodel.pl.cli import BigModelCLI, _plan_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class _ParseOnlyCLI(BigModelCLI):
    """The predict CLI's parser and validation, without building the model or the Trainer."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def _leading_comment(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    comment = []
    for line in lines:
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("# ").rstrip())
    return comment


def _command(path: Path) -> str:
    """``plan`` or ``predict``: the subcommand named by the run line of the leading comment."""
    for line in _leading_comment(path):
        if f"lightning-bigmodel plan --config configs/{path.name}" in line:
            return "plan"
        if f"lightning-bigmodel predict --config configs/{path.name}" in line:
            return "predict"
    raise AssertionError(f"{path.name}: the leading comment names no `lightning-bigmodel ... --config` command")


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {"minilm_embed.yaml", "plan_gpt2_xl.yaml", "gpt_tiny.yaml", "multi_gpu_template.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_starts_with_needs_and_command(path):
    comment = _leading_comment(path)
    assert comment, f"{path.name} must begin with a comment"
    assert any(line.startswith("Needs") or "Needs:" in line for line in comment), f"{path.name}: say what it needs"
    _command(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_parses_with_the_cli(path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # class paths like examples.gpt.GPT resolve from the repo root
    if _command(path) == "plan":
        cfg = _plan_parser().parse_args(["--config", str(path)])
        assert cfg.model.class_path
    else:
        cli = _ParseOnlyCLI(args=["predict", "--config", str(path)])
        config = cli.config.predict
        if config.model.class_path.endswith(".TransformersModule"):  # the module names its weights itself
            assert config.model.init_args.model_name_or_path and config.model.init_args.prompts
        else:
            assert config.model.class_path.startswith("examples.")
            assert config.ckpt_path
        strategy = config.trainer.strategy
        assert strategy.class_path.rsplit(".", 1)[-1] in ("BigModelInferenceStrategy", "ReplicatedBigModelStrategy")


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_the_models_a_config_reads_from_runs_are_made_by_the_demo_step(path):
    """No config writes a model: every model folder it names under runs/ is one `lightning-bigmodel demo` makes (and
    the folder options that used to write one are gone from the configs)."""
    import yaml

    from lightning_bigmodel.pl._tiny_random import DEMO_FOLDERS

    text = path.read_text()
    config = yaml.safe_load(text)
    init_args = (config.get("model") or {}).get("init_args") or {}
    assert not {"random_checkpoint_dir", "shard_dir", "create_if_missing"} & set(init_args), path.name
    if "# EDIT" in text:  # a template: the user names their own checkpoint
        return
    for value in (config.get("ckpt_path"), init_args.get("model_name_or_path")):
        parts = Path(value).parts if isinstance(value, str) else ()
        if len(parts) == 2 and parts[0] == "runs":
            assert parts[1] in DEMO_FOLDERS, f"{path.name}: {value} is made by nothing"


def test_config_with_a_wrong_option_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "configs" / "plan_gpt2_xl.yaml").read_text()
    bad.write_text(text.replace("policy: balanced_low_0", "policy: fast"))
    with pytest.raises(SystemExit) as exit_info:
        _plan_parser().parse_args(["--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'key "policy"' in err and "Got value: fast" in err and "'balanced_low_0'" in err, err  # culprit, choices


def test_predict_strategy_defaults_to_bigmodel(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    cli = _ParseOnlyCLI(args=["predict", "--model", "examples.gpt_generate.GPTGenerator"])
    assert cli.config.predict.trainer.strategy.class_path.endswith(".BigModelInferenceStrategy")
