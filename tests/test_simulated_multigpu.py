"""Multi-GPU code paths run on simulated GPUs (real values on the CPU): every configuration is compared with the
model loaded plainly on the CPU, never with itself.

What a real GPU may legitimately change (kernels, float rounding) is absent here: the simulated GPUs compute with the
CPU's kernels, except attention, which falls back from the fused CPU kernel to the math kernel (float32 rounding).
"""

from __future__ import annotations

import os

import pytest
import torch

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import (
    compute_module_sizes,
    dispatch_model,
    infer_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.pipeline import pipelined_forward
from lightning_bigmodel.simulate import simulated_gpus

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the simulation registers a PrivateUse1 backend, which shadows CUDA for the rest of the process",
)

POLICIES = ["auto", "balanced", "balanced_low_0", "sequential"]
GPT_CONFIG = dict(vocab_size=97, block_size=64, n_layer=8, n_head=2, n_embd=32)
LLAMA_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
LLAMA_LAYER = "LlamaDecoderLayer"


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.device == want.device and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # attention: math kernel vs the CPU's fused one


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """``(plain model, sharded safetensors checkpoint, bytes of one block)``."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**GPT_CONFIG)).eval()
    folder = save_sharded_checkpoint(model, tmp_path_factory.mktemp("gpt") / "ckpt", max_shard_size="60KB")
    return model, folder, compute_module_sizes(model)["transformer.h.0"]


def empty_gpt() -> GPT:
    with init_empty_weights():
        return GPT(GPTConfig(**GPT_CONFIG)).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**LLAMA_CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = save_sharded_checkpoint(model, tmp_path_factory.mktemp("llama") / "ckpt", max_shard_size="40KB")
    return model, folder, compute_module_sizes(model)["model.layers.0"], config


def tight_budget(gpus: int, layer: int) -> dict:
    """About one layer per GPU and one in RAM, GPU 0 with room to stage offloaded layers: the rest goes to disk."""
    return {0: int(3.4 * layer), **{index: int(1.2 * layer) for index in range(1, gpus)}, "cpu": int(1.2 * layer)}


def prompt(vocab: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ every policy, GPT
@pytest.mark.parametrize("gpus", [2, 4])
def test_gpt_every_policy_over_gpus_cpu_and_disk_matches_the_plain_model(gpt, tmp_path, gpus):
    reference, checkpoint, layer = gpt
    ids = prompt(GPT_CONFIG["vocab_size"])
    with torch.no_grad():
        expected = reference(ids)
    budget = tight_budget(gpus, layer)
    with simulated_gpus(gpus) as sim:
        for policy in POLICIES:
            model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map=policy, max_memory=budget,
                                                 no_split_module_classes=["Block"], offload_folder=tmp_path / policy)  # fmt: skip
            placed = set(model.hf_device_map.values())
            assert {"cpu", "disk"} <= placed and len(placed & set(range(gpus))) >= 2, (policy, model.hf_device_map)
            used = [index for index in range(gpus) if index in placed]
            assert all(sim.memory_allocated(index) > 0 for index in used)  # the weights really sit on those GPUs
            with torch.no_grad():
                close(model(ids), expected)  # returned to the input's device (CPU)


def test_gpt_generate_and_outputs_on_the_inputs_device(gpt, tmp_path):
    reference, checkpoint, layer = gpt
    ids = prompt(GPT_CONFIG["vocab_size"])
    with torch.no_grad():
        expected, expected_tokens = reference(ids), reference.generate(ids, max_new_tokens=2)
    with simulated_gpus(2) as sim:
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map="auto",
                                             max_memory=tight_budget(2, layer), no_split_module_classes=["Block"],
                                             offload_folder=tmp_path)  # fmt: skip
        assert model.hf_device_map["lm_head"] != model.hf_device_map["transformer.h.0"]  # the model spans devices
        with torch.no_grad():
            on_gpu1 = model(ids.to(sim.devices[1]))
            assert on_gpu1.device == sim.devices[1]  # not left on the GPU of the last module
            close(on_gpu1.cpu(), expected)
        assert torch.equal(model.generate(ids, max_new_tokens=2), expected_tokens)


def test_balanced_low_0_keeps_gpu_0_lightest(gpt):
    reference, checkpoint, layer = gpt
    budget = {index: 6 * layer for index in range(4)}  # the whole model fits on the GPUs
    ids = prompt(GPT_CONFIG["vocab_size"])
    with torch.no_grad():
        expected = reference(ids)
    with simulated_gpus(4) as sim:
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map="balanced_low_0", max_memory=budget,
                                             no_split_module_classes=["Block"])  # fmt: skip
        held = [sim.memory_allocated(index) for index in range(4)]
        assert held[0] < min(held[1:]), held  # bytes really resident on each simulated GPU
        with torch.no_grad():
            close(model(ids), expected)


# ------------------------------------------------------------------------------ transformers Llama, KV cache
@pytest.mark.parametrize("gpus", [2, 4])
def test_llama_generate_with_kv_cache_every_policy(llama, tmp_path, gpus):
    reference, checkpoint, layer, config = llama
    ids = prompt(config.vocab_size)
    mask = torch.ones_like(ids)
    generate = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, **generate)
    budget = tight_budget(gpus, layer)
    policies = POLICIES if gpus == 2 else ["auto", "balanced_low_0"]  # the other two plan as "auto" does here
    with simulated_gpus(gpus):
        for policy in policies:
            with init_empty_weights():
                model = type(reference)(config).eval()
            load_checkpoint_and_dispatch(model, checkpoint, device_map=policy, max_memory=budget,
                                         no_split_module_classes=[LLAMA_LAYER], offload_folder=tmp_path / policy)  # fmt: skip
            placed = set(model.hf_device_map.values())
            assert len(placed & set(range(gpus))) >= 2 and "disk" in placed, (policy, model.hf_device_map)
            with torch.no_grad():
                got = model.generate(ids, attention_mask=mask, **generate)
            assert torch.equal(got.sequences, expected.sequences), policy  # greedy tokens, cache built on the GPUs
            for step, (logits, want) in enumerate(zip(got.logits, expected.logits, strict=True)):
                assert logits.device == want.device, (policy, step)
                close(logits, want)


# ------------------------------------------------------------------------------------------------- prefetch
def test_prefetch_brings_offloaded_weights_to_the_execution_gpu_in_order_on_the_side_stream(gpt, tmp_path):
    reference, checkpoint, _ = gpt
    offloaded = ["transformer.h.1", "transformer.h.2", "transformer.h.3", "transformer.h.5", "transformer.h.6"]
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
                  "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.h.4": 1, "transformer.h.5": "disk",
                  "transformer.h.6": "cpu", "transformer.h.7": 1, "transformer.ln_f": 1, "lm_head": 0}  # fmt: skip
    ids = prompt(GPT_CONFIG["vocab_size"])
    with torch.no_grad():
        expected = reference(ids)
    with simulated_gpus(2) as sim, torch.no_grad():
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map=device_map, offload_folder=tmp_path)
        for name in offloaded:  # milestones: before the dispatch hooks of the module run, and when it computes
            module = model.get_submodule(name)
            module.register_forward_pre_hook(lambda *_, n=name: sim.mark(f"enter {n}"), prepend=True)
            module.register_forward_pre_hook(lambda *_, n=name: sim.mark(f"run {n}"))
        close(model(ids), expected)  # the first forward learns the execution order
        sim.clear_log()
        close(model(ids), expected)
        log = sim.log
    marks = {r.detail: i for i, r in enumerate(log) if r.kind == "mark"}
    assert [r.detail for r in log if r.kind == "mark"][::2] == [f"enter {name}" for name in offloaded]
    jobs, copies, first = [], [], None  # the prefetch thread's jobs in order: side-stream copies, then an event
    for index, record in enumerate(log):
        if record.thread.startswith("bigmodel-prefetch") and record.kind == "copy":
            first = index if not copies else first
            copies.append(record)
        elif record.thread.startswith("bigmodel-prefetch") and record.kind == "record_event" and copies:
            jobs.append((first, record.detail, copies))
            copies = []
    # Waited for by the compute stream (GPU 0's default stream, current in the forward's thread), not the side stream.
    waited = {r.detail: i for i, r in enumerate(log) if r.kind == "wait_event" and r.thread == "MainThread"
              and (r.device, r.stream) == (0, 0)}  # fmt: skip
    # Each module's weights: one prefetch job issued once the module before it started, waited for by the compute
    # stream before the module runs (the first module's job ran at the end of the forward before).
    for before, name in zip(offloaded, offloaded[1:]):
        mine = [job for job in jobs if marks[f"enter {name}"] < waited.get(job[1], -1) < marks[f"run {name}"]]
        assert len(mine) == 1, (name, jobs)
        first, _, copies = mine[0]
        params = list(model.get_submodule(name).parameters())
        assert [r.nbytes for r in copies] == [p.numel() * p.element_size() for p in params], name
        assert all(r.device == 0 and r.stream != 0 and r.detail == "h2d pinned non_blocking" for r in copies), name
        assert first > marks[f"enter {before}"], name  # issued once the module before started
        own = log[marks[f"enter {name}"] : marks[f"run {name}"]]
        assert not [r for r in own if r.kind == "copy" and r.thread == "MainThread" and r.detail.startswith("h2d")]
        # Each copy is marked as used by the compute stream, so its memory is not reused before compute is done.
        recorded = [r for r in own if r.kind == "record_stream"]
        assert all((r.device, r.stream, r.thread) == (0, 0, "MainThread") for r in recorded), name
        assert [r.nbytes for r in recorded] == [r.nbytes for r in copies], name


# -------------------------------------------------------------------------------------- micro-batch pipeline
def test_micro_batch_pipeline_over_two_gpus_matches_the_unsplit_model(gpt):
    reference, checkpoint, _ = gpt
    ids = prompt(GPT_CONFIG["vocab_size"], batch=4)
    with torch.no_grad():
        expected = reference(ids)
    half = {"transformer.wte": 0, "transformer.wpe": 0, **{f"transformer.h.{i}": i // 4 for i in range(8)},
            "transformer.ln_f": 1, "lm_head": 0}  # fmt: skip
    with simulated_gpus(2) as sim, torch.no_grad():
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map=half)
        sim.clear_log()
        close(pipelined_forward(model, ids, micro_batches=2), expected)
        workers = {r.thread for r in sim.log if r.kind == "copy" and r.detail.startswith("d2d")}
    assert workers == {"micro-batch-0", "micro-batch-1"}  # each micro-batch crossed from GPU 0 to GPU 1 itself


# ------------------------------------------------------------------------------------------------- replicas
@pytest.fixture
def rank_restored():
    """A Trainer built with a torchrun environment sets the process's rank-zero rank: put it back."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    ranks = (rank_zero_only.rank, utils_rank_zero_only.rank)
    yield
    rank_zero_only.rank, utils_rank_zero_only.rank = ranks


def test_each_replica_plans_and_runs_on_its_own_gpu_group(gpt, monkeypatch, tmp_path, rank_restored):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning_bigmodel import DeviceMapCallback
    from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy

    reference, checkpoint, _ = gpt
    ids = prompt(GPT_CONFIG["vocab_size"])
    with torch.no_grad():
        expected = reference(ids)
    for key in [k for k in list(os.environ) if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    env = {"WORLD_SIZE": 2, "RANK": 1, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2, "GROUP_RANK": 0,
           "TORCHELASTIC_RUN_ID": "simulated", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}  # fmt: skip
    for key, value in env.items():  # torchrun's environment for the second replica of the node
        monkeypatch.setenv(key, str(value))
    with simulated_gpus(4, memory_per_gpu="2GiB") as sim:
        strategy = ReplicatedBigModelStrategy(devices_per_replica=2)
        pl.Trainer(accelerator="gpu", devices=4, strategy=strategy, logger=False)  # Lightning sees 4 "CUDA" GPUs
        assert strategy.owned_gpus() == [2, 3]
        budget = strategy.replica_budget(None)  # detected: the simulated free memory of GPUs 2 and 3 only
        assert [key for key in budget if isinstance(key, int)] == [2, 3]
        assert budget[2] == budget[3] == 2**30  # 2 GiB free, less the 1 GiB headroom
        callback = DeviceMapCallback(no_split_module_classes=["Block"])
        strategy._restrict_callback(callback)
        plan = callback.plan(empty_gpt(), strategy)
        assert {device for device in plan.values() if isinstance(device, int)} == {2, 3}  # balanced over its group
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map=plan, offload_folder=tmp_path)
        assert sim.memory_allocated(0) == sim.memory_allocated(1) == 0 < sim.memory_allocated(2)
        with torch.no_grad():
            close(model(ids), expected)


# -------------------------------------------------------------------------------------------------- Trainer
def test_trainer_predict_with_the_gpu_accelerator_on_simulated_gpus(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gpu_expectations import DeviceSpy
    from lightning_bigmodel import BigModelInferenceStrategy
    from lightning_models import GPTModule, reference_outputs, token_loader, write_bare_checkpoint, plain_gpt

    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    device_map = {"model.transformer.wte": 0, "model.transformer.wpe": 0, "model.transformer.h.0": 0,
                  "model.transformer.h.1": 1, "model.transformer.h.2": "cpu", "model.transformer.h.3": "disk",
                  "model.transformer.ln_f": 1, "model.lm_head": 0}  # fmt: skip
    with simulated_gpus(2) as sim:
        strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "offload")
        spy = DeviceSpy()
        trainer = pl.Trainer(accelerator="gpu", devices=2, strategy=strategy, callbacks=[spy], logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)  # fmt: skip
        outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(checkpoint))
        assert strategy.root_device == sim.devices[0]
        assert spy.devices == [sim.devices[0]] * 2  # predict_step's outputs on the root GPU; Lightning returns them on CPU
    expected = reference_outputs()
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        close(got, want)


# -------------------------------------------------------------------------------------------------- Mixtral
def test_mixtral_generate_over_simulated_gpus_cpu_and_disk(tmp_path):
    """Mixtral in the Hub layout (experts converted while loading), routed on simulated GPUs, against transformers'
    own ``from_pretrained`` on the CPU."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(**{**LLAMA_CONFIG, "num_hidden_layers": 4, "num_local_experts": 4,
                                           "num_experts_per_tok": 2, "pad_token_id": 0})  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "hub", max_shard_size="20KB")
    reference = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hub").eval()
    ids = prompt(config.vocab_size)
    generate = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True,
                    pad_token_id=0, attention_mask=torch.ones_like(ids))  # fmt: skip
    with torch.no_grad():
        expected = reference.generate(ids, **generate)
    with simulated_gpus(2):
        with init_empty_weights():
            model = transformers.MixtralForCausalLM(reference.config).eval()
        layer = compute_module_sizes(model)["model.layers.0"]
        budget = {0: int(2.4 * layer), 1: int(1.2 * layer), "cpu": int(1.2 * layer)}  # the experts make layers big
        load_checkpoint_and_dispatch(model, tmp_path / "hub", device_map="auto", max_memory=budget,
                                     no_split_module_classes=model._no_split_modules, offload_folder=tmp_path / "off")  # fmt: skip
        placed = set(model.hf_device_map.values())
        assert {0, 1, "cpu", "disk"} <= placed, model.hf_device_map
        with torch.no_grad():
            got = model.generate(ids, **generate)
    assert torch.equal(got.sequences, expected.sequences)
    for logits, want in zip(got.logits, expected.logits, strict=True):
        close(logits, want)


# ----------------------------------------------------------------------------- fake-tensor peaks, cross-checked
@pytest.mark.parametrize("offloaded", [None, "disk"])
def test_fake_tensor_peaks_match_the_peaks_measured_on_simulated_gpus(gpt, tmp_path, offloaded):
    """``simulate_memory`` (fake tensors, no compute) predicts the weights and peak of each GPU that the real-value
    simulation measures on the same forward (its storages counted as they are born and die)."""
    from lightning_bigmodel.simulate import simulate_memory

    _, checkpoint, _ = gpt
    middle = offloaded or 1
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.ln_f": 1, "lm_head": 0,
                  **{f"transformer.h.{i}": 0 if i < 2 else (middle if i < 5 else 1) for i in range(8)}}  # fmt: skip
    ids = prompt(GPT_CONFIG["vocab_size"], batch=4, length=32)
    predicted = simulate_memory(empty_gpt(), device_map, ids)
    with simulated_gpus(2) as sim, torch.no_grad():
        model = load_checkpoint_and_dispatch(empty_gpt(), checkpoint, device_map=device_map, offload_folder=tmp_path)
        model(ids)  # learns the prefetch order
        resident = [sim.memory_allocated(index) for index in range(2)]
        sim.reset_peak_memory_stats()
        model(ids.to(sim.devices[0]))  # inputs start on the main GPU, as simulate_memory assumes
        peaks = [sim.max_memory_allocated(index) for index in range(2)]
    for index in range(2):
        assert predicted[index]["weights"] == resident[index]
        assert peaks[index] == pytest.approx(predicted[index]["peak"], rel=0.01), (index, peaks, predicted)


# ----------------------------------------------------------------------------- twins of test_strategy.py's CUDA tests
_CPU_DISK_MAP = {"model.transformer.wte": "cpu", "model.transformer.wpe": "cpu", "model.transformer.h.0": "cpu",
                 "model.transformer.h.1": "cpu", "model.transformer.h.2": "disk", "model.transformer.h.3": "disk",
                 "model.transformer.ln_f": "disk", "model.lm_head": "cpu"}  # fmt: skip
_GPU_CPU_DISK_MAP = {**_CPU_DISK_MAP, "model.transformer.wte": 0, "model.transformer.h.0": 0, "model.lm_head": 0}


def _extra_buffer_module(mode: str = "logits"):
    """test_strategy.py's ``_ExtraBuffer``: a tensor outside ``self.model`` (the hooks go on the LightningModule)."""
    from lightning_models import GPTModule

    class ExtraBuffer(GPTModule):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.register_buffer("scale", torch.tensor(2.0), persistent=False)

        def predict_step(self, batch, batch_idx):
            (idx,) = batch
            if self.mode == "generate":
                return self.model.generate(idx, max_new_tokens=self.max_new_tokens)
            return self.model(idx) * self.scale

    return ExtraBuffer(mode=mode)


def test_simulated_gpu_cpu_disk_map_matches_the_plain_model(tmp_path, monkeypatch):
    """Twin of test_strategy.py::test_gpu_cpu_disk_map_matches_stock_lightning (32-true: the simulated GPUs have no
    autocast of their own)."""
    pytest.importorskip("lightning.pytorch")
    from gpu_expectations import DeviceSpy
    from lightning_bigmodel import BigModelInferenceStrategy
    from lightning_models import GPTModule, bigmodel_trainer, plain_gpt, reference_outputs, token_loader
    from lightning_models import write_bare_checkpoint

    monkeypatch.chdir(tmp_path)
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    with simulated_gpus(1) as sim:
        strategy = BigModelInferenceStrategy(device_map=_GPU_CPU_DISK_MAP, offload_folder=tmp_path / "offload")
        spy = DeviceSpy()
        trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=1, callbacks=[spy], default_root_dir=tmp_path)
        outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(checkpoint))
        assert strategy.root_device == sim.devices[0] and spy.devices == [sim.devices[0]] * 2
    expected = reference_outputs()
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        close(got, want)


def test_simulated_gpu_module_with_tensors_outside_the_network_prefetches(tmp_path, monkeypatch):
    """Twin of test_strategy.py::test_gpu_module_with_tensors_outside_the_network_prefetches."""
    pytest.importorskip("lightning.pytorch")
    from gpu_expectations import DeviceSpy
    from lightning_bigmodel import BigModelInferenceStrategy
    from lightning_bigmodel.pl.loader import prefetchers
    from lightning_models import bigmodel_trainer, plain_gpt, reference_outputs, token_loader, write_bare_checkpoint

    monkeypatch.chdir(tmp_path)
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    module = _extra_buffer_module()
    with simulated_gpus(1) as sim:
        device_map = {**_GPU_CPU_DISK_MAP, "scale": 0}
        strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "off")
        spy = DeviceSpy()
        trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=1, callbacks=[spy], default_root_dir=tmp_path)
        outputs = trainer.predict(module, token_loader(), ckpt_path=str(checkpoint))
        found = prefetchers(module)
        assert found and not any(p.recording for p in found)  # the order was fixed after the first step
        assert spy.devices == [sim.devices[0]] * 2
    expected = [out * 2 for out in reference_outputs()]
    assert len(outputs) == len(expected) == 2
    for got, want in zip(outputs, expected, strict=True):
        close(got, want)


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_simulated_two_gpus_outputs_come_back_to_the_root_device(tmp_path, monkeypatch, mode):
    """Twin of test_strategy.py::test_two_gpus_outputs_come_back_to_the_root_device."""
    pytest.importorskip("lightning.pytorch")
    from gpu_expectations import DeviceSpy
    from lightning_bigmodel import BigModelInferenceStrategy
    from lightning_models import bigmodel_trainer, plain_gpt, token_loader, tokens, write_bare_checkpoint

    monkeypatch.chdir(tmp_path)
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    device_map = {**{key: 0 for key in _CPU_DISK_MAP}, "model.transformer.h.2": 1, "model.transformer.h.3": "cpu",
                  "model.transformer.ln_f": 1, "model.lm_head": 1, "scale": 0}  # fmt: skip
    with simulated_gpus(2) as sim:
        strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "off")
        spy = DeviceSpy()
        trainer = bigmodel_trainer(strategy, accelerator="gpu", devices=2, callbacks=[spy], default_root_dir=tmp_path)
        outputs = trainer.predict(_extra_buffer_module(mode), token_loader(), ckpt_path=str(checkpoint))
        assert spy.devices == [sim.devices[0]] * 2  # back on the root device
    reference = plain_gpt()
    prompts = tokens().split(3)
    assert len(outputs) == len(prompts) == 2
    with torch.no_grad():
        for got, prompt in zip(outputs, prompts, strict=True):
            if mode == "generate":  # the simulated GPUs compute as the CPU does: the same greedy tokens
                assert torch.equal(got, reference.generate(prompt, max_new_tokens=4))
            else:
                close(got, reference(prompt) * 2)
