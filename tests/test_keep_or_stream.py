"""What the disk stream keeps in memory when a plan was fitted for a batch: the disk weights are kept after their first
read only where they fit beside the room the plan kept for the batch's activations (else they stream each forward),
and the stream's buffers are what the planner and the simulation count."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

import pytest
import torch
from safetensors.torch import save_file

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.fitting import infer_device_map
from lightning_bigmodel.offload import resident
from lightning_bigmodel.offload.readahead import ReadAhead
from lightning_bigmodel.planning.budget import detect_cpu_memory
from lightning_bigmodel.planning.devices import PlannedDeviceMap, planned_from_json
from tests.test_budget_input_shape import TablesLM
from tests.test_cgroup_budget import memory_cgroup, run_in_cgroup  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the disk stream reads with preadv")

MiB = 2**20
SETTINGS = dict(max_memory={"cpu": 38 * MiB}, no_split_module_classes=["Embedding", "Linear"], input_shape="4x256")


def _tables() -> TablesLM:
    return TablesLM(rows=50_000, width=8, tables=4, vocab=8192)  # 1.6 MB tables; 4 x 256 logits: 32 MiB


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = _tables().eval()
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    return reference, tmp_path / "m.safetensors"


def _free(monkeypatch, free: int, headroom: int = MiB) -> None:
    """The stream sees ``free`` bytes this process can still use (``headroom`` of them kept back)."""
    seen = dataclasses.replace(detect_cpu_memory(), free=free, headroom=headroom, budget=free - headroom)
    monkeypatch.setattr(resident, "detect_cpu_memory", lambda: seen)


def _dispatch(path, tmp_path) -> torch.nn.Module:
    with init_empty_weights():
        model = _tables()
    return load_checkpoint_and_dispatch(model, path, device_map="auto", offload_folder=tmp_path / "off", **SETTINGS)


def _plan() -> PlannedDeviceMap:
    with init_empty_weights():
        return infer_device_map(_tables(), **SETTINGS)


def _disk_bytes(model: torch.nn.Module) -> int:
    disk = [name for name, device in model.hf_device_map.items() if device == "disk"]
    return sum(p.numel() * p.element_size() for key in disk for p in model.get_submodule(key).parameters())


def _run_twice(model, reference) -> None:
    ids = torch.arange(4 * 256).reshape(4, 256) * 151 % 50_000
    with torch.inference_mode():
        expected = reference(ids)
        for _ in range(2):
            assert torch.equal(model(ids), expected)


def test_a_fitted_plan_records_its_cpu_activation_room_and_the_json_keeps_it():
    plan = _plan()
    assert "disk" in plan.values() and "cpu" in plan.values()  # the batch's activations pushed tables to disk
    assert plan.activation_bytes is not None and plan.activation_bytes >= 32 * MiB  # the logits at least
    payload = {"device_map": dict(plan), "activation_bytes": plan.activation_bytes}
    assert planned_from_json(payload).activation_bytes == plan.activation_bytes
    with init_empty_weights():
        unfitted = infer_device_map(_tables(), max_memory={"cpu": 38 * MiB}, no_split_module_classes=["Embedding"])
    assert unfitted.activation_bytes is None  # no batch planned for: the stream keeps its old rule


def test_disk_weights_fitting_half_the_memory_but_not_beside_the_activations_stream(checkpoint, tmp_path, monkeypatch,
                                                                                     caplog):
    """The disk weights take less than half of the free memory (the rule without a fitted plan keeps them), but with
    the room the plan kept for the batch's activations and the headroom they do not fit: the stream releases them."""
    reference, path = checkpoint
    room = _plan().activation_bytes
    with caplog.at_level(logging.INFO, logger="lightning_bigmodel.offload"):
        _free(monkeypatch, 2**40)  # loading: plenty
        model = _dispatch(path, tmp_path)
        model.__dict__["_bigmodel_dispatch"].prefetcher.close()
        disk = _disk_bytes(model)
        free = 2 * disk + MiB
        assert disk <= free // 2 and disk + room + MiB > free, "the case would prove nothing"
        _free(monkeypatch, free)
        caplog.clear()
        model = _dispatch(path, tmp_path)
    stream = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(stream, ReadAhead) and stream.release, "kept disk weights the plan sent to disk for the batch"
    assert "Disk weights stream each forward: the disk weights" in caplog.text and "activations" in caplog.text
    _run_twice(model, reference)
    assert stream.reads >= 2 * len(stream._units) - len(stream._kept)  # read again in the second forward
    stream.close()


def test_disk_weights_that_fit_beside_the_activations_are_kept(checkpoint, tmp_path, monkeypatch, caplog):
    reference, path = checkpoint
    room = _plan().activation_bytes
    _free(monkeypatch, 2**40)
    with caplog.at_level(logging.INFO, logger="lightning_bigmodel.offload"):
        model = _dispatch(path, tmp_path)
    stream = model.__dict__["_bigmodel_dispatch"].prefetcher
    assert isinstance(stream, ReadAhead) and not stream.release
    assert "are kept after their first read: they fit beside the plan's room" in caplog.text
    _run_twice(model, reference)
    assert stream.reads == len(stream._units)  # each read once
    assert room > 0
    stream.close()


def test_the_strategys_fitted_plan_writes_its_activation_room_and_disk_unit_to_the_json(tmp_path):
    """``device_map.json`` keeps the plan facts the stream follows: dispatching the plan read back from it keeps the
    disk weights beside the same activation room and sizes the stream by the same unit."""
    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback

    strategy = BigModelInferenceStrategy()
    strategy.accelerator = CPUAccelerator()
    callback = DeviceMapCallback(max_memory={"cpu": 38 * MiB}, no_split_module_classes=["Embedding", "Linear"],
                                 input_shape="4x256")  # fmt: skip
    with init_empty_weights():
        plan = callback.plan(_tables(), strategy)
    assert plan.activation_bytes == _plan().activation_bytes and plan.stream_unit > 0
    reread = planned_from_json(json.loads(callback.write_json(tmp_path).read_text()))
    assert (reread.activation_bytes, reread.stream_unit) == (plan.activation_bytes, plan.stream_unit)


# ------------------------------------------------------------------------------------ the stream's buffers
def _streaming(monkeypatch) -> None:
    from lightning_bigmodel.offload import attach

    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: True)  # memory short: stream every forward


def _simulated_pools(monkeypatch) -> list:
    """The simulation's stream pools, as it makes them."""
    from lightning_bigmodel.simulate import _staging

    made = []

    class Spy(_staging.SimStreamPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_staging, "SimStreamPool", Spy)
    return made


def test_a_whole_model_on_disk_streams_through_two_buffers_of_its_largest_unit_as_the_simulation_counts(
    checkpoint, tmp_path, monkeypatch
):
    """``{"": "disk"}``: the stream was sized by the largest device-map key, the whole model, twice (five buffers
    here, eight at most, where the planner counts two of the largest unit)."""
    from lightning_bigmodel.simulate import simulate_memory

    reference, path = checkpoint
    _streaming(monkeypatch)
    with init_empty_weights():
        model = _tables()
    model = load_checkpoint_and_dispatch(model, path, device_map={"": "disk"})
    _run_twice(model, reference)
    stream = model.__dict__["_bigmodel_dispatch"].prefetcher
    table = max(unit.layout.nbytes for unit in stream._units.values())
    assert 50_000 * 8 * 4 <= table <= 50_000 * 8 * 4 + 2**16  # an Embedding (the largest no-split unit), aligned
    assert stream.pool.slots == 2 and stream.pool.made <= 2, stream.pool.slots
    assert stream.buffer_bytes <= 2 * table
    stream.close()
    pools = _simulated_pools(monkeypatch)
    with init_empty_weights():
        skeleton = _tables()
    simulate_memory(skeleton, {"": "disk"}, torch.zeros((4, 256), dtype=torch.long), stream_pool=True)
    assert [pool.slots for pool in pools] == [stream.pool.slots]  # the simulation counts the real pool
    assert stream.pool.slot_bytes <= pools[0].slot_bytes <= stream.pool.slot_bytes + 2**16  # + alignment padding


def test_a_planned_container_on_disk_streams_within_the_planners_reserve(tmp_path, monkeypatch):
    """A plan with ``no_split_module_classes=["Block"]`` sends the whole ``transformer.h`` to disk under one key: the
    stream takes the planner's reserve, two blocks, in buffers of its largest unit (an MLP weight), not two times
    every block (eight buffers, the most the stream makes)."""
    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel.simulate import simulate_memory

    config = GPTConfig(vocab_size=512, block_size=32, n_layer=6, n_head=4, n_embd=128)
    torch.manual_seed(0)
    reference = GPT(config).eval()
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: saved once
    save_file(state, str(tmp_path / "m.safetensors"))
    settings = dict(max_memory={"cpu": 2_500_000}, no_split_module_classes=["Block"], stream_reserve=True)
    with init_empty_weights():
        plan = infer_device_map(GPT(config), **settings)
    assert plan["transformer.h"] == "disk" and plan.stream_unit > 12 * 128 * 128 * 4  # a block
    assert plan.reserve >= 2 * plan.stream_unit  # what the planner keeps free for the stream
    _streaming(monkeypatch)
    with init_empty_weights():
        model = GPT(config)
    model = load_checkpoint_and_dispatch(model, tmp_path / "m.safetensors", device_map=plan)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(ids), reference(ids))
    stream = model.__dict__["_bigmodel_dispatch"].prefetcher
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules())
    assert largest == 128 * 512 * 4 + 512 * 4  # the MLP's first Linear: the largest unit the stream reads at once
    assert stream.pool.slots == 2 * plan.stream_unit // largest == 6  # the planner's reserve, in buffers of that unit
    assert stream.buffer_bytes <= stream.pool.slots * (largest + 2**16)  # each at most aligned
    stream.close()
    pools = _simulated_pools(monkeypatch)
    with init_empty_weights():
        skeleton = GPT(config)
    simulate_memory(skeleton, plan, ids, stream_pool=True)
    assert [pool.slots for pool in pools] == [stream.pool.slots]


# ---------------------------------------------------------------------------------------------- a real cgroup
_CHILD = r'''
import json, sys, torch
from pathlib import Path
sys.path.insert(0, "tests")  # as the test session has it
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from tests.test_budget_input_shape import TablesLM, _compact
cgroup, checkpoint, offload, room = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
with init_empty_weights():
    model = TablesLM(tables=16, rows=625_000)
v2 = (cgroup / "memory.max").exists()
usage = int((cgroup / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
(cgroup / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(usage + room))  # room beyond torch itself
model = load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", max_memory=None, offload_folder=offload,
                                     no_split_module_classes=["Embedding", "Linear"], input_shape="4x256")
ids = torch.arange(4 * 256).reshape(4, 256) * 151 % 625_000
with torch.inference_mode():
    for _ in range(2):
        sums = _compact(model(ids))
stream = model.__dict__["_bigmodel_dispatch"].prefetcher
peak = cgroup / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
peak = int(peak.read_text()) - usage if peak.exists() else None  # beyond torch, as the room
print(json.dumps({"map": sorted(set(model.hf_device_map.values())), "release": stream.release, "peak": peak,
                  "sums": sums.tolist()}))
'''


def test_under_a_real_cgroup_the_disk_weights_of_a_plan_for_a_batch_stream(tmp_path, memory_cgroup):
    """A child limits its memory cgroup to 640 MiB beyond torch and loads 16 tables of 20 MB planned for a 4 x 256
    batch (320 MiB of logits): the plan sends 288 MiB of them to disk, less than half of the memory left, so the stream
    kept them (the forward reached 855 of 862 MiB; wider tables were OOM-killed). Now they stream."""
    from tests.test_budget_input_shape import _compact
    _, directory = memory_cgroup
    torch.manual_seed(0)
    reference = TablesLM(tables=16, rows=625_000).eval()
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    ids = torch.arange(4 * 256).reshape(4, 256) * 151 % 625_000
    with torch.inference_mode():
        expected = _compact(reference(ids))
    del reference
    args = [str(directory), str(tmp_path / "m.safetensors"), str(tmp_path / "offload"), str(640 * MiB)]
    done = run_in_cgroup(directory, _CHILD, *args, CUDA_VISIBLE_DEVICES="")  # the CPU executes, also with GPUs
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["map"] == ["cpu", "disk"], probe["map"]
    assert probe["release"], ("the disk weights the plan sent to disk for the batch were kept", probe["peak"])
    assert torch.equal(torch.tensor(probe["sums"], dtype=torch.float32), expected)
