"""The detected CPU budget and the activations of a forward on the CPU: with ``input_shape`` the plan keeps room for the
simulated activations (and the disk stream's buffers) under the detected budget; without it, one log line says so and
how to fix it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from models import LinearLM
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.fitting import infer_device_map
from lightning_bigmodel.planning import budget
from lightning_bigmodel.planning.budget import detect_cpu_memory
from lightning_bigmodel.planning.device_map import largest_layer
from lightning_bigmodel.planning.devices import PlannedDeviceMap
from lightning_bigmodel.planning.sizes import compute_module_sizes
from lightning_bigmodel.planning.table import bytes_per_device
from lightning_bigmodel.simulate import simulate_memory
from tests.test_cgroup_budget import fake_root, memory_cgroup, run_in_cgroup, v2_files  # noqa: F401 (a fixture)

MiB = 2**20
KB = 1000


@pytest.fixture
def limit(tmp_path, monkeypatch):
    """``limit(nbytes)``: this process is seen in a cgroup v2 limited to ``nbytes`` (nothing used yet), without GPUs."""
    from lightning_bigmodel.planning import cgroup

    monkeypatch.setattr(budget, "gpu_count", lambda: 0)

    def use(nbytes: int) -> int:
        monkeypatch.setattr(cgroup, "SYSTEM_ROOT", fake_root(tmp_path / str(nbytes), 2, {"/job": v2_files(str(nbytes), 0)}))
        return detect_cpu_memory().budget

    return use


def _meta(**kwargs) -> LinearLM:
    with init_empty_weights():
        return LinearLM(**kwargs)


def test_cpu_plan_under_a_detected_budget_keeps_room_for_the_activations(limit):
    """12 layers of 4 MiB and an 8 x 512 batch (64 MiB of logits) in a 400 MiB cgroup: the weights alone fit the
    detected budget (400 MiB less the 256 MiB headroom), weights and activations do not. The old fit loop reserved only
    the excess on the CPU, below which the weights already sat: it re-planned the same map until it gave up."""
    model = _meta(width=1024, vocab=4096, layers=12)
    cpu_budget = limit(400 * MiB)
    ids = torch.zeros((8, 512), dtype=torch.long)
    unsized = infer_device_map(model, no_split_module_classes=["Linear"])
    assert set(unsized.values()) == {"cpu"}
    assert simulate_memory(model, unsized, ids)["cpu"]["peak"] > cpu_budget, "the check would prove nothing"

    planned = infer_device_map(model, no_split_module_classes=["Linear"], input_shape="8x512")
    memory = simulate_memory(model, planned, ids, stream_pool=True)  # the stream's buffers: in a detected budget
    assert memory["cpu"]["peak"] <= cpu_budget, (planned, memory)  # weights + stream buffers + activations
    placed = bytes_per_device(planned, compute_module_sizes(model))
    assert 0 < placed["cpu"] < compute_module_sizes(model)[""] and placed["disk"] > 0  # the rest streams from disk


def test_a_batch_whose_activations_fit_no_plan_fails_early_naming_the_cpu(limit):
    limit(400 * MiB)
    model = _meta(width=1024, vocab=4096, layers=12)
    with pytest.raises(ValueError, match=r"batch of \(8, 1024\).*after [1-4] plans: cpu by"):
        infer_device_map(model, no_split_module_classes=["Linear"], input_shape="8x1024")  # 128 MiB of logits alone


def test_the_simulated_cpu_peak_holds_the_disk_streams_buffers(tmp_path, monkeypatch):
    """The stream on a CPU execution device holds a pool of buffers of its largest unit, as many as its reserve (two
    disk blocks) holds: 6 here, where the old simulation counted the unit computing and the one read ahead (2)."""
    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel.offload import attach

    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: True)  # memory is short: stream every forward
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=64)
    torch.manual_seed(0)
    reference = GPT(config).eval()
    save_file({k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "m.safetensors"))
    device_map = PlannedDeviceMap({"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h": "disk",
                                   "transformer.ln_f": "cpu", "lm_head": "cpu"})  # fmt: skip
    with init_empty_weights():
        model = GPT(config)
    device_map.stream_unit = largest_layer(model, ["Block"])[0]  # a plan's disk unit: a block (no-split Block)
    model = load_checkpoint_and_dispatch(model, tmp_path / "m.safetensors", device_map=device_map,
                                         offload_folder=tmp_path / "offload")  # fmt: skip
    ids = torch.randint(0, 64, (1, 8))
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(ids), reference(ids))
    stream = model.__dict__["_bigmodel_dispatch"].prefetcher
    pool = stream.buffer_bytes  # the buffers the stream allocated
    assert stream.pool.made > 2
    with init_empty_weights():
        skeleton = GPT(config)
    memory = simulate_memory(skeleton, device_map, ids, stream_pool=True)
    assert memory["cpu"]["peak"] - memory["cpu"]["weights"] >= pool, (memory, pool)


def test_load_checkpoint_and_dispatch_plans_for_the_input_shape(tmp_path):
    """100 small layers and a 2 x 512 batch under a 2 MB CPU budget: the weights fit, weights and activations do not;
    ``input_shape=`` reaches the plan (the map is the fitted one), and the outputs equal the plain model's."""
    torch.manual_seed(0)
    reference = LinearLM(width=64, vocab=100, layers=100).eval()
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    settings = dict(max_memory={"cpu": 2000 * KB}, no_split_module_classes=["Linear"])
    unsized = infer_device_map(_meta(width=64, vocab=100, layers=100), **settings)
    fitted = infer_device_map(_meta(width=64, vocab=100, layers=100), input_shape="2x512", **settings)
    assert set(unsized.values()) == {"cpu"} and "disk" in fitted.values()
    model = load_checkpoint_and_dispatch(_meta(width=64, vocab=100, layers=100), tmp_path / "m.safetensors",
                                         offload_folder=tmp_path / "offload", input_shape="2x512", **settings)  # fmt: skip
    assert model.hf_device_map == dict(fitted)
    ids = torch.randint(0, 100, (2, 512))
    with torch.inference_mode():
        assert torch.equal(model(ids), reference(ids))


def test_input_shape_with_a_given_map_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`input_shape`/`max_new_tokens` plan a device map.*device_map='auto'"):
        load_checkpoint_and_dispatch(_meta(), tmp_path / "none.safetensors", device_map={"": "cpu"}, input_shape="1x8")


def test_a_detected_budget_planned_without_input_shape_says_so_once(limit, caplog):
    model = _meta(width=1024, vocab=4096, layers=12)
    limit(400 * MiB)
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        infer_device_map(model, no_split_module_classes=["Linear"])
    lines = [r.getMessage() for r in caplog.records if "without `input_shape`" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "cgroup limit 400.0 MiB" in lines[0] and "Pass `input_shape=` (your largest batch" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        infer_device_map(model, no_split_module_classes=["Linear"], input_shape="2x16")  # sized: nothing to say
        infer_device_map(model, {"cpu": "100MiB"}, no_split_module_classes=["Linear"])  # a given budget: the user's
        limit(64 * 2**30)
        infer_device_map(model, no_split_module_classes=["Linear"])  # roomy: 80 MiB of weights in 64 GiB
    assert "without `input_shape`" not in caplog.text


# ---------------------------------------------------------------------------------------------- a real cgroup
class TablesLM(torch.nn.Module):
    """19 embedding tables of 24 MB summed (cheap to run, many units to stream) and a narrow head to an 81920-token
    vocabulary: a batch of 4 x 256 has 320 MiB of logits, more than the detected budget's 256 MiB headroom."""

    def __init__(self, rows: int = 750_000, width: int = 8, tables: int = 19, vocab: int = 81_920) -> None:
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(rows, width) for _ in range(tables))
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(sum(table(ids) for table in self.tables))


_CHILD = r'''
import json, sys, torch
from pathlib import Path
sys.path.insert(0, "tests")  # as the test session has it
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from tests.test_budget_input_shape import TablesLM, _compact
cgroup, checkpoint, offload, room, shape = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
with init_empty_weights():
    model = TablesLM()
v2 = (cgroup / "memory.max").exists()
usage = int((cgroup / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text())
(cgroup / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(usage + room))  # room beyond torch itself
model = load_checkpoint_and_dispatch(model, checkpoint, device_map="auto", max_memory=None, offload_folder=offload,
                                     no_split_module_classes=["Embedding", "Linear"], **({"input_shape": shape} if shape else {}))
ids = torch.arange(4 * 256).reshape(4, 256) * 151 % 750_000
with torch.inference_mode():
    for _ in range(2):
        sums = _compact(model(ids))
print(json.dumps({"map": sorted(set(model.hf_device_map.values())), "sums": sums.tolist()}))
'''


def _compact(logits: torch.Tensor) -> torch.Tensor:
    """What is compared: the logits' sum at each position and the last position whole (no float64 copy: 640 MiB)."""
    return torch.cat([logits.sum(dim=-1).flatten(), logits[:, -1].flatten()])


def test_a_batch_planned_for_runs_under_a_real_cgroup_limit(tmp_path, memory_cgroup):
    """A child process limits its own memory cgroup to 704 MiB beyond what torch takes (so the room is the same
    whatever torch's build), loads with the detected budget planned for its 4 x 256 batch, and runs it twice: 320 MiB
    of logits beside 459 MB of weights, most of them streamed from disk. Without `input_shape` the plan keeps every
    weight in RAM and the first forward gets the process OOM-killed (checked by hand with the same child; an OOM is
    not asserted here)."""
    _, directory = memory_cgroup
    torch.manual_seed(0)
    reference = TablesLM().eval()
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    ids = torch.arange(4 * 256).reshape(4, 256) * 151 % 750_000
    with torch.inference_mode():
        expected = _compact(reference(ids))
    del reference
    args = [str(directory), str(tmp_path / "m.safetensors"), str(tmp_path / "offload"), str(704 * MiB), "4x256"]
    done = run_in_cgroup(directory, _CHILD, *args, CUDA_VISIBLE_DEVICES="")  # the CPU executes, also with GPUs
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["map"] == ["cpu", "disk"], probe["map"]  # the limit binds: part of the weights stream
    assert torch.equal(torch.tensor(probe["sums"], dtype=torch.float32), expected)


def test_the_strategys_plan_under_a_detected_budget_sizes_the_batch_or_says_so(limit, caplog):
    """The callback plans with budgets it detected itself (bytes, not ``None``): without ``input_shape`` it logs the
    same line; with one, its plan and the peaks it reports keep the CPU within the detected budget."""
    from lightning.pytorch.accelerators import CPUAccelerator

    from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback

    strategy = BigModelInferenceStrategy()
    strategy.accelerator = CPUAccelerator()
    cpu_budget = limit(400 * MiB)
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        DeviceMapCallback(no_split_module_classes=["Linear"]).plan(_meta(width=1024, vocab=4096, layers=12), strategy)
    assert "without `input_shape`" in caplog.text and "cgroup limit 400.0 MiB" in caplog.text
    callback = DeviceMapCallback(no_split_module_classes=["Linear"], input_shape="8x512")
    plan = callback.plan(_meta(width=1024, vocab=4096, layers=12), strategy)
    assert "disk" in plan.values() and callback.memory["cpu"]["peak"] <= cpu_budget, callback.memory
    assert callback.reserve > 0  # the disk stream's room, kept under a detected budget as without `input_shape`
