"""Plans whose offloaded layers execute on the CPU: where room for one offloaded layer on a GPU would leave a GPU without
modules, "cpu" entries compute in place and "disk" ones stream to the CPU, so every GPU holds modules up to its budget.
Each plan is dispatched on simulated GPUs and compared with the same model run plainly on the CPU."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from benchmarks.placement import BUDGETS, MODELS, MoE, gpu_bytes, model_bytes
from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import dispatch_model, infer_device_map, init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.planning.devices import planned_from_json
from lightning_bigmodel.planning.table import prefetch_line
from lightning_bigmodel.simulate import simulated_gpus

POLICIES = ["auto", "balanced", "balanced_low_0", "sequential"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the simulation shadows CUDA for the rest of the process")


def _gpt() -> GPT:
    config = GPTConfig.preset("small")
    config.vocab_size, config.tie_weights = 2048, False
    return GPT(config).eval()


CASES = {  # name -> (model factory, no-split classes, budget name of the placement table, input)
    "gpt-untied-uneven": (_gpt, ["Block"], "uneven", lambda: torch.randint(0, 2048, (2, 7))),
    "moe-tight": (lambda: MoE().eval(), ["MoEBlock"], "tight", lambda: torch.randint(0, 2048, (2, 5))),
}


def _budget(model, name: str) -> dict:
    return {device: int(fraction * model_bytes(model)) for device, fraction in BUDGETS[name].items()}


@no_cuda
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", CASES)
def test_a_cpu_execution_plan_fills_every_gpu_stays_within_budget_and_runs_like_the_plain_model(case, policy, tmp_path):
    make, no_split, budget_name, inputs = CASES[case]
    torch.manual_seed(0)
    plain = make()
    budget = _budget(plain, budget_name)
    with torch.device("meta"):
        device_map = infer_device_map(make(), budget, no_split_module_classes=no_split, policy=policy)
    gpus = [device for device in budget if isinstance(device, int)]
    assert device_map.execution_device == "cpu" and device_map.prefetch_depth == 0, device_map
    assert set(gpus) <= set(device_map.values()), device_map  # every GPU holds modules (the GPU plan left one empty)
    ids = inputs()
    with torch.no_grad():
        expected = plain(ids)
    with simulated_gpus(len(gpus)) as simulated:
        model = make()
        model.load_state_dict(plain.state_dict())
        dispatch_model(model, device_map, offload_folder=tmp_path / "offload")
        assert model._bigmodel_dispatch.main_device == torch.device("cpu")
        resident = {gpu: simulated.memory_allocated(gpu) for gpu in gpus}
        assert all(resident[gpu] > 0 for gpu in gpus), resident
        with torch.no_grad():
            got = model(ids).cpu()
        peaks = {gpu: simulated.max_memory_allocated(gpu) for gpu in gpus}
    torch.testing.assert_close(got, expected)
    # each GPU holds its modules and its activations, never an offloaded layer: well within its budget
    assert all(peaks[gpu] <= budget[gpu] for gpu in gpus), (peaks, budget)


def test_the_choice_of_cpu_execution_is_logged_with_the_gpu_the_room_and_the_budget_that_would_keep_it(caplog):
    make, no_split, budget_name, _ = CASES["moe-tight"]
    with torch.device("meta"):
        model = make()
    budget = _budget(model, budget_name)
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        device_map = infer_device_map(model, budget, no_split_module_classes=no_split)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_bigmodel.planning"]
    assert len(lines) == 1, lines
    # by hand: GPU 0 holds the embedding (2048 x 64 floats); one offloaded layer is one MoEBlock (router and 8 MLPs)
    block = 64 * 8 * 4 + 8 * ((64 * 256 + 256 + 256 * 64 + 64) * 4)
    embedding = 2048 * 64 * 4
    assert device_map.execution_device == "cpu" and {0, 1, 2} <= set(device_map.values()), device_map
    assert lines[0].startswith("Offloaded layers run on the CPU: executing them on GPU 0 needs room there for one "
                               f"offloaded layer and the offloaded buffers (") and f"{block} bytes)" in lines[0], lines[0]
    assert f"raise `max_memory[0]` to at least {embedding + block} bytes (now {budget[0]}" in lines[0], lines[0]
    # that budget is enough: the offloaded layers then execute on GPU 0, and every GPU still holds modules
    raised = infer_device_map(model, {**budget, 0: embedding + block}, no_split_module_classes=no_split)
    assert raised.execution_device == 0 and {0, 1, 2} <= set(raised.values()), raised


def test_gpu_execution_is_kept_where_it_leaves_no_gpu_empty():
    make, no_split = MODELS["nested-split"]
    model = make()
    budget = {device: int(fraction * model_bytes(model)) for device, fraction in BUDGETS["tight"].items()}
    device_map = infer_device_map(model, budget, no_split_module_classes=no_split)
    assert device_map.execution_device == 0 and device_map.prefetch_depth == 2, device_map
    assert "execution: offloaded layers compute on cuda:0" in prefetch_line(2, device_map.reserve, device_map)


def test_int4_plans_keep_gpu_execution_it_has_no_cpu_kernel():
    pytest.importorskip("torchao")
    with torch.device("meta"):
        model = MoE()
    budget = _budget(model, "tight")
    plain = infer_device_map(model, budget, no_split_module_classes=["MoEBlock"])
    int4 = infer_device_map(model, budget, no_split_module_classes=["MoEBlock"], quantization="int4")
    assert plain.execution_device == "cpu" and {0, 1, 2} <= set(plain.values()), plain
    on_gpus = any(isinstance(device, int) for device in int4.values())
    assert not (on_gpus and int4.execution_device == "cpu"), int4  # GPU execution (here: no GPU can hold a module)


@no_cuda
def test_the_trainer_runs_a_cpu_execution_plan_and_device_map_json_round_trips_it(tmp_path, caplog):
    """Two simulated GPUs where a block does not fit beside GPU 0's embeddings: the offloaded blocks compute on the CPU,
    the table and device_map.json say so, and the plan read back from the JSON dispatches the same way."""
    from lightning_models import plain_gpt, predicted_on_simulated_gpus, reference_outputs

    budget = {0: 60_000, 1: 20_000, "cpu": 10**6}
    with predicted_on_simulated_gpus(tmp_path, budget, caplog) as (callback, module, outputs, checkpoint):
        assert {0, 1, "cpu"} <= set(callback.device_map.values()), callback.device_map
        assert callback.execution_device == "cpu" and callback.prefetch_depth == 0
        assert module.model._bigmodel_dispatch.main_device == torch.device("cpu")
    assert "execution: offloaded layers compute on the cpu" in caplog.text
    for got, want in zip(outputs, reference_outputs(), strict=True):
        torch.testing.assert_close(got, want)
    written = json.loads((tmp_path / "device_map.json").read_text())
    assert written["execution_device"] == "cpu" and written["prefetch_depth"] == 0
    planned = planned_from_json(written)
    assert planned.execution_device == "cpu" and planned.reserve == written["reserve_bytes"]
    network = {key.removeprefix("model."): device for key, device in planned.items()}
    reread = planned_from_json({**written, "device_map": network})
    with simulated_gpus(2):
        with init_empty_weights():
            model = GPT(GPTConfig.preset("tiny")).eval()
        load_checkpoint_and_dispatch(model, checkpoint, device_map=reread)
        assert model._bigmodel_dispatch.main_device == torch.device("cpu")
        ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = model(ids).cpu()
    with torch.no_grad():
        torch.testing.assert_close(got, plain_gpt()(ids))


def test_a_device_map_json_with_an_execution_device_that_computes_nothing_is_refused():
    with pytest.raises(ValueError, match=r"`execution_device` 'disk' in the device-map JSON is not a device that"):
        planned_from_json({"device_map": {"": "cpu"}, "execution_device": "disk"})
    with pytest.raises(ValueError, match="has no `device_map` object"):
        planned_from_json({"map": {}})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cpu_execution_plan_on_a_real_gpu_runs_like_the_plain_model(tmp_path):
    make, no_split, _, inputs = CASES["moe-tight"]
    torch.manual_seed(0)
    plain = make()
    budget = {0: 700_000, "cpu": 10**8}  # the embedding (524 kB) fits, and so would a block (530 kB), not both
    with torch.device("meta"):
        device_map = infer_device_map(make(), budget, no_split_module_classes=no_split)
    assert device_map.execution_device == "cpu" and 0 in device_map.values(), device_map
    folder = save_sharded_checkpoint(plain, tmp_path / "ckpt", max_shard_size="1MB")
    ids = inputs()
    with torch.no_grad():
        expected = plain(ids)
    with torch.device("meta"):
        model = make()
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path / "offload")
    assert model._bigmodel_dispatch.main_device == torch.device("cpu")
    assert torch.cuda.memory_allocated(0) <= budget[0]
    with torch.no_grad():
        got = model(ids.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_offload_execution_overrides_the_choice_either_way():
    with torch.device("meta"):
        moe = MoE()
    tight = _budget(moe, "tight")
    on_gpu = infer_device_map(moe, tight, no_split_module_classes=["MoEBlock"], offload_execution="gpu")
    assert on_gpu.execution_device != "cpu" or not any(isinstance(d, int) for d in on_gpu.values()), on_gpu
    make, no_split = MODELS["nested-split"]
    nested = make()
    budget = {device: int(fraction * model_bytes(nested)) for device, fraction in BUDGETS["tight"].items()}
    auto = infer_device_map(nested, budget, no_split_module_classes=no_split)
    on_cpu = infer_device_map(nested, budget, no_split_module_classes=no_split, offload_execution="cpu")
    assert auto.execution_device == 0 and on_cpu.execution_device == "cpu" and on_cpu.reserve == 0, (auto, on_cpu)
    held, held_auto = gpu_bytes(nested, on_cpu), gpu_bytes(nested, auto)
    assert set(held) == {0, 1, 2} and sum(held.values()) > sum(held_auto.values()), (held, held_auto)  # no reserve
    assert all(held[gpu] <= budget[gpu] for gpu in held), (held, budget)


def test_a_bad_offload_execution_fails_where_it_is_given():
    from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback

    with torch.device("meta"):
        model = MoE()
    with pytest.raises(ValueError, match=r"`offload_execution='sometimes'` is not an execution setting; pass \"auto\""):
        infer_device_map(model, {0: 10**6, "cpu": 10**8}, offload_execution="sometimes")
    with pytest.raises(ValueError, match=r"`prefetch=True` prefetches offloaded layers onto the execution GPU, but"):
        infer_device_map(model, {0: 10**6, "cpu": 10**8}, offload_execution="cpu", prefetch=True)
    for make in (BigModelInferenceStrategy, DeviceMapCallback):
        with pytest.raises(ValueError, match=r"`offload_execution='sometimes'` is not an execution setting"):
            make(offload_execution="sometimes")
    callback = DeviceMapCallback(offload_execution="cpu")
    with pytest.raises(ValueError, match=r"`offload_execution`: 'gpu' \(strategy\) vs 'cpu' \(DeviceMapCallback\)"):
        callback.reconcile(object(), {"offload_execution": "gpu"})


@no_cuda
@pytest.mark.parametrize("setting", ["cpu", "gpu", "auto"])
def test_an_explicit_map_computes_its_offloaded_entries_where_offload_execution_says(setting, tmp_path):
    from lightning_models import plain_gpt, write_bare_checkpoint

    plain = plain_gpt()
    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain)
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h": "cpu", "transformer.ln_f": 1,
                  "lm_head": 0}  # fmt: skip
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = plain(ids)
    with simulated_gpus(2):
        with init_empty_weights():
            model = GPT(GPTConfig.preset("tiny")).eval()
        load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_execution=setting)
        main = model._bigmodel_dispatch.main_device
        with torch.no_grad():
            got = model(ids).cpu()
    assert (main.type == "cpu") == (setting == "cpu"), main  # "auto": an explicit map's lowest GPU, as before
    torch.testing.assert_close(got, expected)


@no_cuda
def test_the_micro_batch_pipeline_locks_cpu_executed_entries_on_the_cpu_and_matches_the_plain_model(tmp_path):
    from lightning_bigmodel.pipeline import MicroBatchPipeline

    make, no_split, budget_name, inputs = CASES["moe-tight"]
    torch.manual_seed(0)
    plain = make()
    budget = _budget(plain, budget_name)
    with torch.device("meta"):
        device_map = infer_device_map(make(), budget, no_split_module_classes=no_split)
    assert device_map.execution_device == "cpu", device_map
    ids = torch.randint(0, 2048, (4, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = plain(ids)
    with simulated_gpus(3):
        model = make()
        model.load_state_dict(plain.state_dict())
        dispatch_model(model, device_map)
        with MicroBatchPipeline(model, micro_batches=2) as pipe, torch.no_grad():
            domains = dict(pipe.domains)
            got = pipe(ids).cpu()
    offloaded = [key for key, device in device_map.items() if device in ("cpu", "disk")]
    assert offloaded and all(domains[key] == "cpu" for key in offloaded), domains  # not GPU 0's lock
    torch.testing.assert_close(got, expected)
