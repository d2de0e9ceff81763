"""The CLI speaks plainly: a bad input is one line on stderr and exit status 2; ``--debug`` shows the traceback.

Also where a missing checkpoint is looked for: a path that can only be local is "not found" without asking the Hub;
an ``org/name`` that is neither a local folder nor on the Hub gets a message that says both, local first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from lightning_bigmodel.checkpoint.errors import CheckpointNotFoundError
from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint

pytest.importorskip("jsonargparse")  # the CLI is built on it; the GPU machine may lack it
from lightning_bigmodel.pl.cli import _raised_on_purpose, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "lightning-bigmodel: error: "
TINY_PLAN = ["plan", "--model", "examples.gpt.GPT", "--model.config.n_layer", "2", "--model.config.n_embd", "32",
             "--model.config.n_head", "2", "--model.config.vocab_size", "97",
             "--model.config.block_size", "16"]  # fmt: skip


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "LIGHTNING_BIGMODEL_DEBUG"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "lightning_bigmodel", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def error_line(stderr: str) -> str:
    """The one line of our report: the last of stderr, checked to be the only line that starts like it."""
    lines = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1 and stderr.rstrip().splitlines()[-1] == lines[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ the real command
def test_predict_with_a_checkpoint_found_nowhere_says_both_places(tmp_path):
    config = str(ROOT / "configs" / "gpt_tiny.yaml")
    done = run_cli(["predict", "--config", config, "--ckpt_path", "runs/does-not-exist",
                    "--model.init_args.random_checkpoint_dir", "null"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done.stderr)
    looked_for = str(tmp_path / "runs" / "does-not-exist")
    assert line.startswith(
        f"{PREFIX}`checkpoint` 'runs/does-not-exist' not found: no local path {looked_for!r}, and no Hugging Face Hub"
        " repo 'runs/does-not-exist' (Hub not asked: HF_HUB_OFFLINE is set; only the cache "
    ) and line.endswith("was read). (--debug shows the traceback)")
    assert "Restoring states" not in done.stdout + done.stderr  # nothing misleading before the one line


def _config_with(tmp_path: Path, name: str, ckpt_path: str, option: Optional[str] = None) -> Path:
    """A copy of ``configs/<name>`` (outside the folder the job runs in) with ``ckpt_path`` and, when given, the
    model's checkpoint folder option set to that same path."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    config["ckpt_path"] = ckpt_path
    if option is not None:
        config["model"]["init_args"][option] = ckpt_path
    path = tmp_path / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_typo_in_both_checkpoint_paths_makes_no_model_and_predicts_nothing(tmp_path):
    """Issue 20 item 2 as reported: the same typo in the model's checkpoint folder option and in ``ckpt_path``. The
    command used to write a random GPT there and predict with it (exit 0); now: exit 2, the not-found line naming the
    option, the path and `lightning-bigmodel demo`, and nothing written (not even the folder it runs in)."""
    config = _config_with(tmp_path, "gpt_tiny.yaml", "runs/gpt-tinyy", option="random_checkpoint_dir")
    job = tmp_path / "job"
    job.mkdir()
    done = run_cli(["predict", "--config", str(config)], cwd=job)
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert error_line(done.stderr) == (
        f"{PREFIX}`random_checkpoint_dir` 'runs/gpt-tinyy' not found: no folder {str(job / 'runs' / 'gpt-tinyy')!r}; a"
        " config never writes a model, `lightning-bigmodel demo` makes the demo models. (--debug shows the traceback)"
    )
    assert list(job.iterdir()) == []  # no checkpoint, no offload folder, no tokens, no logs
    assert "Wrote" not in done.stdout


@pytest.mark.parametrize(
    ("name", "option", "typo"),
    [("gpt_tiny.yaml", "random_checkpoint_dir", "runs/gpt-tinyy"),
     ("replicas_cpu.yaml", "random_checkpoint_dir", "runs/gpt-tinyy"),
     ("minilm_embed.yaml", "shard_dir", "runs/minilm-shardd")],
)  # fmt: skip
def test_no_example_config_option_turns_a_missing_folder_into_a_model(in_repo, capsys, name, option, typo):
    (in_repo / "runs").mkdir()
    (in_repo / "runs" / typo.split("/")[1][:-1]).mkdir()  # the folder meant: named in the hint
    config = _config_with(in_repo, name, typo, option=option)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(config)])
    assert exit_info.value.code == 2
    meant = in_repo / "runs" / typo.split("/")[1][:-1]
    assert error_line(capsys.readouterr().err) == (
        f"{PREFIX}`{option}` {typo!r} not found: no folder {str(in_repo / typo)!r} (did you mean {str(meant)!r}?); a"
        " config never writes a model, `lightning-bigmodel demo` makes the demo models. (--debug shows the traceback)"
    )
    assert sorted(path.name for path in in_repo.iterdir()) == ["configs", "runs"]
    assert [path.name for path in (in_repo / "runs").iterdir()] == [meant.name]


@pytest.mark.parametrize("name", ["gpt_tiny.yaml", "replicas_cpu.yaml", "minilm_embed.yaml"])
def test_an_example_config_before_the_demo_step_says_what_makes_its_model(in_repo, capsys, monkeypatch, name):
    """The shipped configs in a folder where `lightning-bigmodel demo` has not run: the not-found line says how."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(ROOT / "configs" / name)])
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    folder = "runs/minilm-sharded" if name.startswith("minilm") else "runs/gpt-tiny"
    assert line.startswith(f"{PREFIX}`checkpoint` {folder!r} not found: no local path {str(in_repo / folder)!r}")
    assert line.endswith("; make the demo models with `lightning-bigmodel demo`. (--debug shows the traceback)")
    assert list(in_repo.iterdir()) == []


def test_plan_with_a_malformed_size_is_one_line(tmp_path):
    done = run_cli([*TINY_PLAN, "--max_memory", '{"cpu": "2 gigs"}'], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert line.startswith(f"{PREFIX}`max_memory['cpu']`: Memory size '2 gigs' is malformed") and "GiB" in line
    assert done.stdout == ""  # nothing was planned


# ------------------------------------------------------------------------------------------ in process
@pytest.fixture
def in_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.delenv("LIGHTNING_BIGMODEL_DEBUG", raising=False)
    return tmp_path


def test_local_only_checkpoint_is_not_found_in_one_line(in_repo, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_hub_lookup)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--config", str(ROOT / "configs" / "gpt_tiny.yaml"), "--ckpt_path", "./runs/nope",
              "--model.init_args.random_checkpoint_dir", "null"])  # fmt: skip
    assert exit_info.value.code == 2
    line = error_line(capsys.readouterr().err)
    looked_for = str(in_repo / "runs" / "nope")
    assert line.startswith(f"{PREFIX}`checkpoint` './runs/nope' does not exist (looked for {looked_for!r})")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_original_error(in_repo, monkeypatch, how):
    argv = [*TINY_PLAN, "--max_memory", '{"cpu": "2 gigs"}']
    if how == "flag":
        argv.insert(1, "--debug")
    else:
        monkeypatch.setenv("LIGHTNING_BIGMODEL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"`max_memory\['cpu'\]`: Memory size '2 gigs' is malformed"):
        main(argv)


def test_foreign_errors_keep_their_traceback(in_repo, monkeypatch):
    def broken_plan(argv):
        {}["bug"]  # a bug is not a bad input: it must not be dressed up as one

    monkeypatch.setattr("lightning_bigmodel.pl.cli.plan", broken_plan)
    with pytest.raises(KeyError, match="bug"):
        main(["plan"])


def _raise(error: Exception) -> Exception:
    try:
        raise error
    except Exception as caught:  # noqa: BLE001 - returned with its traceback
        return caught


def test_only_our_own_reports_count_as_bad_input():
    from lightning_bigmodel.offload.disk import OffloadFolderError
    from lightning_bigmodel.pl.writers import PredictionFolderError

    for ours in (CheckpointNotFoundError("x"), OffloadFolderError("x"), PredictionFolderError("x")):
        assert _raised_on_purpose(ours)  # our types, wherever raised
    with pytest.raises(ValueError) as ours:
        resolve_checkpoint(Path("/nonexistent-for-sure/x.npz"))  # raised inside the package
    assert _raised_on_purpose(ours.value)
    assert not _raised_on_purpose(_raise(ValueError("raised by a test, not by the package")))
    assert not _raised_on_purpose(_raise(KeyError("a bug")))


# ------------------------------------------------------------------------------------------ where to look
def _no_hub_lookup(*args, **kwargs):
    raise AssertionError(f"the Hub was asked for {args} {kwargs}")


@pytest.mark.parametrize(
    "checkpoint",
    ["./ckpt", "../ckpt", "/nonexistent-for-sure/ckpt", "~/nonexistent-for-sure-ckpt", "runs/org/name",
     "model.safetensors", "org/model.bin", "org/weights.PT", "org/model.safetensors.index.json", ".hidden"],
)  # fmt: skip
def test_a_path_that_can_only_be_local_is_not_found_without_the_hub(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_hub_lookup)
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist \(looked for '/") as info:
        resolve_checkpoint(checkpoint)
    assert repr(checkpoint) in str(info.value)


@pytest.mark.parametrize("checkpoint", ["org/name", "gpt2", "runs/does-not-exist"])
def test_a_repo_id_shape_is_looked_for_locally_then_on_the_hub(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    asked = []

    def offline(repo_id, **kwargs):
        asked.append(repo_id)
        raise OSError("Cannot find an appropriate cached snapshot folder;\noutgoing traffic has been disabled.")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint(checkpoint)
    message = str(info.value)
    assert asked == [checkpoint]
    local = str(tmp_path / checkpoint)
    assert message.startswith(f"`checkpoint` {checkpoint!r} not found: no local path {local!r}, and no Hugging Face"
                              f" Hub repo {checkpoint!r} (Hub not asked: HF_HUB_OFFLINE is set; only")
    assert "\n" not in message and len(message.replace(str(tmp_path), "<tmp>")) < 300  # short, whatever the tmp path
