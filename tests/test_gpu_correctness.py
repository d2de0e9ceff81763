"""GPU-correctness fixes checked on CPU: what the CUDA paths do is simulated by mocks of the CUDA queries, fakes of
Lightning's CUDA accelerator and spies on the collectives (the real things: ``test_gpu_correctness_integration.py``)."""

from __future__ import annotations

import threading
import time

import lightning.fabric.accelerators.cuda as fabric_cuda
import lightning.pytorch as pl
import lightning.pytorch.accelerators.cuda as pl_cuda
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

import lightning_bigmodel.pl.replicas as replicas
from lightning_bigmodel import BigModelInferenceStrategy, DeviceMapCallback
from lightning_bigmodel.planning.budget import get_max_memory
from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy
from lightning_models import GPTModule, plain_gpt, token_loader, write_bare_checkpoint


# The simulated GPUs register a PrivateUse1 backend, which shadows CUDA for the rest of the process: under CUDA these
# tests are skipped (their CUDA twins are in test_gpu_correctness_integration.py).
shadows_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the rest of the process"
)


@pytest.fixture(autouse=True)
def _restore_ranks():
    ranks = (rank_zero_only.rank, utils_rank_zero_only.rank)
    yield
    rank_zero_only.rank, utils_rank_zero_only.rank = ranks


@pytest.fixture
def four_fake_gpus(monkeypatch):
    """Lightning's CUDA accelerator sees 4 GPUs, `setup_device` runs for real (it rejects a non-GPU root) but the
    device switch it ends with is recorded instead; every memory query is recorded too."""
    calls = {"set_device": [], "mem_get_info": []}
    for module in (fabric_cuda, pl_cuda):
        monkeypatch.setattr(module, "num_cuda_devices", lambda: 4)
    monkeypatch.setattr(pl_cuda, "_check_cuda_matmul_precision", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)

    def mem_get_info(index):
        calls["mem_get_info"].append(index)
        return 30 * 2**30, 40 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return calls


# ---------------------------------------------------------------------------------------------- finding 5
def test_detection_queries_only_the_given_gpus(four_fake_gpus):
    budget = get_max_memory(None, gpus=[2, 3])
    assert four_fake_gpus["mem_get_info"] == [2, 3]
    assert [key for key in budget if isinstance(key, int)] == [2, 3]
    assert budget[2] == 30 * 2**30 - 4 * 2**30  # free minus 10% of the total


def test_trainer_budget_queries_only_the_trainers_gpus(four_fake_gpus):
    trainer = pl.Trainer(accelerator="gpu", devices=[2, 3], strategy=BigModelInferenceStrategy(), logger=False)
    budget = DeviceMapCallback()._budget([2, 3])
    assert trainer.strategy.parallel_devices == [torch.device("cuda", 2), torch.device("cuda", 3)]
    assert four_fake_gpus["mem_get_info"] == [2, 3]  # GPUs 0 and 1 get no context
    assert set(budget) == {2, 3, "cpu"}


def test_a_gpu_that_cannot_be_queried_gets_no_budget(four_fake_gpus, monkeypatch):
    def mem_get_info(index):
        if index == 1:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
        return 30 * 2**30, 40 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    with pytest.warns(UserWarning, match=r"GPU 1 cannot be queried \(CUDA error: all CUDA-capable devices are busy"):
        budget = get_max_memory(None)
    assert budget[1] == 0 and budget[0] > 0


# ---------------------------------------------------------------------------------------------- finding 3
@pytest.mark.parametrize("max_memory", [{"cpu": "1GiB"}, {0: 0, "cpu": "1GiB"}])
def test_gpu_trainer_whose_plan_uses_no_gpu_fails_before_loading(tmp_path, four_fake_gpus, max_memory):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy(max_memory=max_memory, no_split_module_classes=["Block"])
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)  # fmt: skip
    module = GPTModule()
    with pytest.raises(MisconfigurationException, match=r"puts no module on the Trainer's GPU\(s\) \[0\] \(budget: "):
        trainer.predict(module, token_loader(), ckpt_path=str(ckpt))
    assert all(p.is_meta for p in module.parameters())  # nothing was loaded
    assert torch.device("cpu") not in four_fake_gpus["set_device"]  # `setup_device(cpu)` never ran


# ---------------------------------------------------------------------------------------------- finding 8
def test_replica_collectives_stay_on_the_gpu_the_group_is_bound_to(monkeypatch, four_fake_gpus):
    env = {"WORLD_SIZE": 2, "RANK": 1, "LOCAL_RANK": 1, "LOCAL_WORLD_SIZE": 2, "GROUP_RANK": 0,
           "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    strategy = ReplicatedBigModelStrategy(devices_per_replica=2)
    pl.Trainer(accelerator="gpu", devices=4, strategy=strategy, logger=False)
    seen = {}
    monkeypatch.setattr(replicas, "_init_dist_connection", lambda *a, device_id=None, **k: seen.update(init=device_id))
    monkeypatch.setattr(replicas, "_distributed_is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: seen.update(barrier=kwargs))
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objs, src, device=None: seen.update(broadcast=device))
    strategy.setup_environment()
    assert seen["init"] == torch.device("cuda", 2)  # replica 1 owns GPUs 2 and 3
    strategy._root_device = torch.device("cuda", 3)  # as `setup` does when the plan leaves GPU 2 empty
    strategy.barrier()
    assert strategy.broadcast("x") == "x"
    assert seen["barrier"] == {"device_ids": [2]} and seen["broadcast"] == torch.device("cuda", 2)
    monkeypatch.setattr(replicas, "_sync_ddp_if_available", lambda t, group, reduce_op: seen.update(reduce=t) or t)
    moved = seen.setdefault("moved", [])
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, *a, **k: moved.append(device) or self)
    strategy.reduce(torch.ones(1))
    assert seen["moved"] == [torch.device("cuda", 2), torch.device("cpu")]  # reduced on GPU 2, back where it was


# ---------------------------------------------------------------------------------------------- findings 4, 6, 10
def _prefetched_run(monkeypatch, device_map, calls=3, cls_name="UntiedMLP", copy_delay=0.0):
    """Dispatch a test model (``UntiedMLP``) over 2 simulated GPUs, run ``calls`` forwards (the first learns the
    order), check the outputs against the plain model; return the harness log and the events the prefetch thread
    waited for on the CPU. ``copy_delay`` seconds are slept before each of the prefetch thread's copies."""
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.simulate import simulated_gpus
    from lightning_bigmodel.simulate._runtime import SimEvent
    import models
    from models import example_input, make_reference

    cls = getattr(models, cls_name)
    synced, spinning = [], []
    def synchronize(event):
        synced.append((threading.current_thread().name, event.sim_id))
        if not event.blocking:
            spinning.append(threading.current_thread().name)

    monkeypatch.setattr(SimEvent, "synchronize", synchronize)
    if copy_delay:
        import lightning_bigmodel.offload.prefetch as prefetch

        def slow_copy_to(*args, **kwargs):
            time.sleep(copy_delay)
            return copy_to(*args, **kwargs)

        copy_to = prefetch.copy_to
        monkeypatch.setattr(prefetch, "copy_to", slow_copy_to)
    x = example_input(cls)
    with torch.inference_mode():
        expected = make_reference(cls)(x)
    with simulated_gpus(2) as gpus, torch.no_grad():  # (the harness's `.to("cpu")` misbehaves in inference mode)
        model = dispatch_model(make_reference(cls), device_map)
        outputs = [model(x) for _ in range(calls)]
        # After the last forward the prefetch thread is already copying the first module in for a next one: the log is
        # read once `remove_dispatch` has waited for that job, never halfway through it.
        remove_dispatch(model)
        log = gpus.log
    for out in outputs:
        torch.testing.assert_close(out, expected)
    assert spinning == []  # every CPU wait for the GPU sleeps: a default event's synchronize spins a core meanwhile
    return log, synced


@shadows_cuda
def test_prefetch_thread_never_switches_to_gpu_0(monkeypatch):
    log, _ = _prefetched_run(monkeypatch, {"inp": 1, "blocks": "cpu", "out": "cpu"})  # computes on GPU 1 only
    prefetch = [r for r in log if r.thread.startswith("bigmodel-prefetch")]
    assert any(r.kind == "copy" for r in prefetch)
    assert {r.device for r in prefetch} == {1}  # with the bug: leaving the side stream switched back to GPU 0
    assert not any(r.kind == "set_device" and r.device == 0 for r in log)


@shadows_cuda
def test_prefetch_copies_wait_until_compute_freed_the_module_before(monkeypatch):
    # Slow copies: the job the last forward starts (the first module, for a next forward) is still copying when the
    # forwards return; the log must be read after it, not with its wait recorded and its copies missing.
    log, synced = _prefetched_run(monkeypatch, {"inp": 1, "blocks": "cpu", "out": "cpu"}, copy_delay=0.05)
    reached = {r.detail for r in log if r.kind == "record_event" and not r.thread.startswith("bigmodel-prefetch")
               and r.stream == 0}  # fmt: skip
    prefetch = [r for r in log if r.thread.startswith("bigmodel-prefetch")]
    jobs, current = [], None
    for record in prefetch:  # one job: wait for compute, copy on the side stream, record the ready event
        if record.kind == "wait_event":
            current = {"waited": record.detail, "copies": []}
            jobs.append(current)
        elif record.kind == "copy":
            assert current is not None, "a prefetch copy was issued before waiting for the compute stream"
            current["copies"].append(record)
    assert jobs and all(job["waited"] in reached and job["copies"] for job in jobs)
    assert all(copy.stream != 0 for job in jobs for copy in job["copies"])  # on the side stream
    waited_on_cpu = {sim_id for thread, sim_id in synced if thread.startswith("bigmodel-prefetch")}
    assert {job["waited"] for job in jobs} == {str(sim_id) for sim_id in waited_on_cpu}  # allocation waits too


@shadows_cuda
def test_tied_weight_on_another_gpu_is_copied_gpu_to_gpu(monkeypatch):
    # `head` computes on GPU 1 with the weight it shares with `wte`, resident on GPU 0; `ln_f` is in RAM
    log, _ = _prefetched_run(monkeypatch, {"wte": 0, "blocks": 0, "ln_f": "cpu", "head": 1}, cls_name="TiedLM")
    copies = [r for r in log if r.kind == "copy" and r.thread.startswith("bigmodel-prefetch")]
    assert any(r.detail.startswith("d2d") and r.device == 1 for r in copies)  # the tied weight, GPU 0 -> GPU 1
    assert not any(r.detail.startswith("d2h") for r in copies)  # with the bug: staged through pinned RAM


# ---------------------------------------------------------------------------------------------- findings 7, 10
@shadows_cuda
def test_pipelined_micro_batches_hand_each_gpu_over_with_an_event_on_reused_streams():
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.pipeline import MicroBatchPipeline
    from lightning_bigmodel.simulate import simulated_gpus
    from models import UntiedMLP, example_input, make_reference

    x = example_input(UntiedMLP, batch=4)
    with torch.no_grad():
        expected = make_reference(UntiedMLP)(x)
    device_map = {"inp": 0, "blocks.0": 0, "blocks.1": 1, "blocks.2": 1, "out": 1}
    with simulated_gpus(2) as gpus, torch.no_grad():
        model = dispatch_model(make_reference(UntiedMLP), device_map)
        calls = []
        with MicroBatchPipeline(model, micro_batches=2) as pipe:
            for _ in range(2):
                gpus.clear_log()
                out = pipe(x)
                calls.append((out.to("cpu"), gpus.log))
            gpus.clear_log()
            on_gpu = pipe(x.to(gpus.devices[0]))  # outputs made on the workers' streams, handed to the caller's
            handed_over = gpus.log
        remove_dispatch(model)
    torch.testing.assert_close(on_gpu.to("cpu"), expected)
    # Each micro-batch's output is marked as used by the caller's stream (GPU 0's default stream), once.
    recorded = [r for r in handed_over if r.kind == "record_stream"]
    half = on_gpu.numel() * on_gpu.element_size() // 2
    assert [(r.thread, r.device, r.stream, r.nbytes) for r in recorded] == [("MainThread", 0, 0, half)] * 2
    streams = []
    for out, log in calls:
        torch.testing.assert_close(out, expected)
        workers = [r for r in log if r.thread.startswith("micro-batch-")]
        for gpu in (0, 1):  # micro-batch 0 releases the GPU with an event; micro-batch 1's stream waits for it
            mine = [r for r in workers if r.device == gpu]
            handed = [r for r in mine if r.kind == "record_event" and r.thread == "micro-batch-0"]
            waits = [r for r in mine if r.kind == "wait_event" and r.thread == "micro-batch-1"]
            assert handed and {r.detail for r in handed} & {r.detail for r in waits}
            first_wait = log.index(next(r for r in waits if r.detail in {h.detail for h in handed}))
            early = [r for r in log[:first_wait] if r.thread == "micro-batch-1" and r.device == gpu]
            assert [r for r in early if r.kind == "copy"] == []  # nothing of micro-batch 1 ran there before the wait
        streams.append({(r.thread, r.device, r.stream) for r in workers if r.kind in ("record_event", "wait_event")})
    assert streams[0] == streams[1] and all(stream != 0 for _, _, stream in streams[0])  # no new streams per call


# ---------------------------------------------------------------------------------------------- finding 9
@pytest.mark.parametrize(("value", "index"), [("cuda", 0), (0, 0), ("cuda:1", 1), (torch.device("cuda"), 0)])
def test_main_device_is_always_indexed(value, index):
    from lightning_bigmodel._accelerator import gpu
    from lightning_bigmodel.planning.devices import as_execution_device

    assert as_execution_device(value) == gpu(index) and as_execution_device(value).index == index
    assert as_execution_device("cpu") == torch.device("cpu")
    assert as_execution_device("meta") == torch.device("meta")  # the tests' stand-in for a GPU
    with pytest.raises(ValueError, match="`main_device`='disk' is not a device that computes"):
        as_execution_device("disk")


@shadows_cuda
def test_unindexed_main_device_moves_no_resident_buffer(tmp_path):
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.offload.placement import main_device_of
    from lightning_bigmodel.simulate import simulated_gpus
    from models import BufferNet, example_input, make_reference

    x = example_input(BufferNet)
    reference = make_reference(BufferNet)
    with torch.no_grad():
        reference(x)
        expected = reference(x)  # the second call: a forward updates buffers (the dispatched model writes them back)
    with simulated_gpus(1) as gpus, torch.no_grad():
        model = make_reference(BufferNet)
        dispatch_model(model, {"a": "cpu", "mid": 0, "b": 0}, main_device="cuda")  # `a` computes on GPU 0
        assert main_device_of(model) == torch.device("simgpu", 0)
        assert model.a.offset.device == torch.device("simgpu", 0)  # its buffers live where it computes
        model(x)  # learns the prefetch order
        gpus.clear_log()
        out = model(x)
        log = gpus.log
        remove_dispatch(model)
    torch.testing.assert_close(out, expected)
    # only the CPU weights of `a` come in; with an unindexed "cuda" its GPU-resident buffers were copied GPU to GPU
    # and written back on every forward
    assert not any(r.kind == "copy" and r.detail.startswith("d2d") for r in log)


# ------------------------------------------------------------------------------------ twins of CUDA-gated tests
# Each CUDA-gated correctness test has a twin here on simulated GPUs (real values on the CPU, the same device flow).
def _empty(cls):
    from lightning_bigmodel import init_empty_weights

    with init_empty_weights():
        return cls()


@pytest.mark.parametrize("cls_name", ["TiedLM", "UntiedMLP", "BufferNet"])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_simulated_gpu_with_cpu_and_disk_offload(tmp_path, cls_name, offload_buffers):
    """Twin of test_dispatch.py::test_gpu_with_cpu_and_disk_offload (same maps, 4 calls: the first learns the order,
    the next ones prefetch)."""
    import models
    from lightning_bigmodel import load_checkpoint_and_dispatch, remove_dispatch, save_sharded_checkpoint
    from lightning_bigmodel.simulate import simulated_gpus

    cls = getattr(models, cls_name)
    checkpoint = save_sharded_checkpoint(models.make_reference(cls), tmp_path / "ckpt")
    device_map = dict(models.MAPS[cls]["mixed"])
    first = next(iter(device_map))
    device_map[first] = 0
    reference = models.make_reference(cls)
    x = models.example_input(cls)
    with simulated_gpus(1), torch.no_grad():
        model = load_checkpoint_and_dispatch(
            _empty(cls), checkpoint, device_map=device_map, offload_buffers=offload_buffers
        )
        for _ in range(4):
            got = model(x)
            assert got.device.type == "cpu"  # returned to the input's device
            torch.testing.assert_close(got, reference(x))
        if cls is models.TiedLM:
            assert model.head.weight is model.wte.weight
        assert all(p.device.type == "cpu" for n, p in model.named_parameters() if not n.startswith(first))
        remove_dispatch(model)


def test_simulated_gpu_pinned_host_weights(tmp_path):
    """Twin of test_dispatch.py::test_gpu_pinned_host_weights."""
    from lightning_bigmodel import load_checkpoint_in_model, save_sharded_checkpoint
    from lightning_bigmodel.offload.placement import is_disk
    from lightning_bigmodel.simulate import simulated_gpus
    from models import UntiedMLP, make_reference

    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    with simulated_gpus(1) as gpus:
        model = _empty(UntiedMLP)
        load_checkpoint_in_model(model, checkpoint, device_map={"inp": 0, "blocks": "cpu", "out": "disk"})
        assert model.inp.weight.device == gpus.devices[0]
        assert model.blocks[0].fc.weight.is_pinned() and is_disk(model.out.weight)


class _Heavy(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width, width) / width**0.5, requires_grad=False)

    def forward(self, x):
        return x @ self.weight


def test_simulated_prefetch_keeps_at_most_two_offloaded_blocks_on_the_gpu():
    """Twin of test_gpu_correctness_integration.py::test_prefetch_keeps_at_most_two_offloaded_blocks_on_the_gpu."""
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.simulate import simulated_gpus

    blocks, width, rows = 16, 128, 64
    block_bytes, act_bytes = width * width * 4, rows * width * 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Heavy(width) for _ in range(blocks)])
    x = torch.randn(rows, width)
    with torch.no_grad():
        expected = model(x)
    with simulated_gpus(1) as gpus, torch.no_grad():
        dispatch_model(model, {"0": 0, **{str(i): "cpu" for i in range(1, blocks)}})
        x_gpu = x.to(gpus.devices[0])
        model(x_gpu)  # learns the order
        base = gpus.memory_allocated(0)
        gpus.reset_peak_memory_stats()
        got = model(x_gpu)
        extra = gpus.max_memory_allocated(0) - base
        remove_dispatch(model)
    torch.testing.assert_close(got.to("cpu"), expected)
    assert extra <= 3 * block_bytes + 4 * act_bytes, extra


def test_simulated_loading_narrows_on_the_host_before_the_gpu_copy(tmp_path):
    """Twin of test_gpu_correctness_integration.py::test_loading_narrows_on_the_host_before_the_gpu_copy."""
    from lightning_bigmodel import init_empty_weights, load_checkpoint_in_model, save_sharded_checkpoint
    from lightning_bigmodel.simulate import simulated_gpus

    width = 512
    source = torch.nn.Linear(width, width, bias=False)
    checkpoint = save_sharded_checkpoint(source, tmp_path / "ckpt")
    with init_empty_weights():
        model = torch.nn.Linear(width, width, bias=False)
    with simulated_gpus(1) as gpus:
        base = gpus.memory_allocated(0)
        gpus.reset_peak_memory_stats()
        load_checkpoint_in_model(model, checkpoint, device_map={"": 0}, dtype=torch.float16)
        peak = gpus.max_memory_allocated(0) - base
        assert model.weight.dtype == torch.float16 and model.weight.device == gpus.devices[0]
        torch.testing.assert_close(model.weight.to("cpu"), source.weight.detach().half())
    assert peak == width * width * 2  # the fp16 weight only: casting on the GPU would hold the fp32 copy too


# ------------------------------------------------------------------------------------- staging of disk weights
def test_disk_weights_are_staged_through_one_reused_page_locked_buffer(tmp_path, monkeypatch):
    """The prefetch thread reads a module's disk weights into one page-locked buffer that every later module and
    forward reuses: never torch's caching host allocator (a power-of-two block per tensor and per forward, kept after
    use: 2x a layer's bytes page-locked outside the CPU budget)."""
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.offload.stream import DIRECT
    from lightning_bigmodel.simulate import _runtime, simulated_gpus
    from models import UntiedMLP, example_input, make_reference

    pinned_by = []
    real_pin = _runtime.pin
    monkeypatch.setattr(_runtime, "pin", lambda t: pinned_by.append(threading.current_thread().name) or real_pin(t))
    x = example_input(UntiedMLP)
    with torch.no_grad():
        expected = make_reference(UntiedMLP)(x)
    device_map = {"inp": 0, "blocks.0": "disk", "blocks.1": "disk", "blocks.2": "disk", "out": "cpu"}
    counts = []
    with simulated_gpus(1), torch.no_grad():
        model = dispatch_model(make_reference(UntiedMLP), device_map, offload_folder=tmp_path / "off")
        for _ in range(4):  # the first learns the order, the next ones prefetch
            torch.testing.assert_close(model(x), expected)
            counts.append(sum(name.startswith("bigmodel-prefetch") for name in pinned_by))
        assert counts[1] == counts[3] == 1, counts  # the one buffer, pinned once; nothing pinned per forward
        staging = model._bigmodel_dispatch.prefetcher._staging
        assert staging.stages >= 6 and staging.allocations == 1  # three disk blocks per forward, one buffer
        block = sum(p.numel() * p.element_size() for p in make_reference(UntiedMLP).blocks[0].parameters())
        # Read from the files (preadv or O_DIRECT), no faults; each run of adjacent tensors may take up to two 4 KiB
        # blocks more, where an O_DIRECT read of its aligned blocks lands (see offload/_reads.py).
        slack = {id(layout): 64 * 8 + 2 * DIRECT * len(layout.runs) for layout in staging._layouts.values()}
        layouts = [(layout.nbytes, slack[id(layout)]) for layout in staging._layouts.values()]
        assert len(layouts) == 3 and all(block <= nbytes < block + extra for nbytes, extra in layouts), layouts
        assert block <= staging.buffer.numel() < block + max(slack.values())  # one block's bytes, not a power of two
        remove_dispatch(model)


def test_staged_disk_pages_are_released_when_memory_is_short(tmp_path, monkeypatch):
    """Twin of test_residency.py::test_gpu_prefetch_releases_staged_disk_pages_when_memory_is_short: with the disk
    weights larger than the memory left, each staged module's file ranges are read with release, and the pages its
    views mapped themselves (the first forward fetches without prefetch) are released too (advice: whether the kernel
    drops them is not checked here)."""
    import lightning_bigmodel.offload.attach as attach
    import lightning_bigmodel.offload.staging as staging
    import lightning_bigmodel.offload.stream as stream
    from lightning_bigmodel import dispatch_model, remove_dispatch
    from lightning_bigmodel.simulate import simulated_gpus
    from models import UntiedMLP, example_input, make_reference

    released, reads = [], []
    monkeypatch.setattr(attach, "should_release", lambda disk_bytes: True)
    monkeypatch.setattr(staging, "release_pages", lambda tensor: released.append(tensor.data_ptr()) or True)
    real_read = stream.Layout.read_into
    monkeypatch.setattr(stream.Layout, "read_into", lambda self, b, r=False: reads.append(r) or real_read(self, b, r))
    x = example_input(UntiedMLP)
    with torch.no_grad():
        expected = make_reference(UntiedMLP)(x)
    with simulated_gpus(1), torch.no_grad():
        model = dispatch_model(make_reference(UntiedMLP), {"inp": 0, "blocks": "disk", "out": "cpu"},
                               offload_folder=tmp_path / "off")  # fmt: skip
        for _ in range(3):
            torch.testing.assert_close(model(x), expected)
        disk = {p.data_ptr() for p in model.blocks.parameters()}
        remove_dispatch(model)
    assert reads and all(reads)  # every staged read drops its file range from the page cache
    assert disk <= set(released) and set(released) <= disk
