"""The GPU-correctness fixes on real GPUs (skipped without CUDA; the CPU simulations are in test_gpu_correctness.py
and test_pinned.py). Context checks run in fresh processes and ask the driver which GPUs hold a context."""

from __future__ import annotations

import gc
import os
import socket

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

import lightning_bigmodel.offload.pinned as pinned
from cuda_contexts import run_and_list_contexts
from gpu_expectations import gpu_tolerance
from lightning_models import GPTModule, assert_same, plain_gpt, reference_outputs, token_loader, write_bare_checkpoint
from lightning_bigmodel import BigModelInferenceStrategy
from lightning_bigmodel.pl.replicas import ReplicatedBigModelStrategy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(autouse=True)
def _restore_env_and_ranks():
    env, ranks = dict(os.environ), (rank_zero_only.rank, utils_rank_zero_only.rank)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)
    rank_zero_only.rank, utils_rank_zero_only.rank = ranks


# ---------------------------------------------------------------------------------------------- finding 1
@needs_cuda
def test_pinned_slab_is_page_locked_feeds_the_gpu_and_is_given_back():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    before = pinned.pinned_bytes()
    source = torch.randn(3, 2**20 + 7)  # 12.6 MB: the caching allocator would page-lock 16 MiB
    host = pinned.pinned_copy(source, device)
    assert host.is_pinned() and torch.equal(host, source)
    assert pinned.pinned_bytes() - before == pinned.pinned_footprint(source.numel() * 4) < 13 * 2**20
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        on_gpu = host.to(device, non_blocking=True)
    stream.synchronize()
    assert torch.equal(on_gpu.cpu(), source)
    del host
    gc.collect()
    assert pinned.pinned_bytes() == before  # unregistered and unmapped, not cached


# ---------------------------------------------------------------------------------------------- finding 3
@needs_cuda
def test_gpu_trainer_whose_plan_uses_no_gpu_fails_before_loading(tmp_path):
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = BigModelInferenceStrategy(max_memory={"cpu": "1GiB"}, no_split_module_classes=["Block"])
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)  # fmt: skip
    module = GPTModule()
    with pytest.raises(MisconfigurationException, match=r"puts no module on the Trainer's GPU\(s\) \[0\]"):
        trainer.predict(module, token_loader(), ckpt_path=str(ckpt))
    assert all(p.is_meta for p in module.parameters())


# ---------------------------------------------------------------------------------------------- finding 5
@needs_two_gpus
def test_budget_detection_creates_a_context_only_on_the_gpus_asked(tmp_path):
    out = run_and_list_contexts(
        """
        from lightning_bigmodel.planning.budget import get_max_memory
        result = sorted(key for key in get_max_memory(None, gpus=[1]) if isinstance(key, int))
        """,
        tmp_path,
    )
    assert out == {"result": [1], "contexts": [1]}


# ---------------------------------------------------------------------------------------------- finding 8
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@needs_two_gpus
@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="needs NCCL")
def test_replica_collectives_stay_on_the_bound_gpu_when_the_plan_moves_the_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in {"WORLD_SIZE": 1, "RANK": 0, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "GROUP_RANK": 0,
                       "TORCHELASTIC_RUN_ID": "collectives", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": _free_port()}.items():  # fmt: skip
        monkeypatch.setenv(key, str(value))
    ckpt = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    strategy = ReplicatedBigModelStrategy(devices_per_replica=2, device_map={"model": 1}, gather="none")
    trainer = pl.Trainer(accelerator="gpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)
    outputs = trainer.predict(GPTModule(), token_loader(), ckpt_path=str(ckpt))
    assert dist.get_backend() == "nccl"
    assert strategy.root_device == torch.device("cuda", 1) and strategy._collective_device == torch.device("cuda", 0)
    strategy.barrier()
    assert strategy.broadcast({"a": 1}) == {"a": 1}
    reduced = strategy.reduce(torch.ones(2, device="cuda:1"), reduce_op="sum")
    assert reduced.device == torch.device("cuda", 1) and reduced.tolist() == [1.0, 1.0]
    assert_same(outputs, reference_outputs(), atol=gpu_tolerance(torch.float32)["atol"])  # GPU vs CPU kernels


# ---------------------------------------------------------------------------------------------- finding 1 (dispatch)
@needs_cuda
def test_dispatching_a_model_in_ram_does_not_double_it_and_release_gives_it_back(tmp_path):
    out = run_and_list_contexts(
        """
        import gc, resource, torch
        from torch import nn
        from lightning_bigmodel import dispatch_model
        from lightning_bigmodel.offload import pinned
        from lightning_bigmodel.pl.loader import release

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096

        model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(8)]).requires_grad_(False)  # 512 MiB
        size = 8 * 4096 * 4096 * 4
        torch.cuda.init()
        before, peak_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dispatch_model(model, {"0": 0, **{str(i): "cpu" for i in range(1, 8)}})
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(peak_before, before)
        with torch.inference_mode():
            model(torch.randn(4, 4096, device="cuda"))
        locked = pinned.pinned_bytes()
        release(model)
        gc.collect()
        result = {"size": size, "grown": grown, "locked": locked, "after": pinned.pinned_bytes(),
                  "dropped": before - rss()}
        """,
        tmp_path,
    )
    r = out["result"]
    assert r["locked"] >= 7 * r["size"] // 8  # the seven CPU layers, page-locked at their size
    assert r["grown"] < r["size"] // 4  # with the originals kept during dispatch: about the model's size again
    assert r["after"] == 0 and r["dropped"] > r["size"] // 2  # unregistered and unmapped, not cached


# ---------------------------------------------------------------------------------------------- finding 4
@needs_two_gpus
def test_prefetch_creates_no_context_on_gpu_0(tmp_path):
    out = run_and_list_contexts(
        """
        import torch
        from torch import nn
        from lightning_bigmodel import dispatch_model
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]).requires_grad_(False)
        reference = [model(torch.ones(2, 256))]
        dispatch_model(model, {"0": 1, "1": "cpu", "2": "cpu", "3": 1})  # computes on GPU 1 only
        with torch.inference_mode():
            outs = [model(torch.ones(2, 256, device="cuda:1")) for _ in range(3)]
        torch.cuda.synchronize(1)
        result = max(float((o.cpu() - reference[0]).abs().max()) for o in outs)
        """,
        tmp_path,
    )
    assert out["result"] < 1e-4 and out["contexts"] == [1]


# ---------------------------------------------------------------------------------------------- finding 6
class _Heavy(torch.nn.Module):
    """A slow block on the GPU (the CPU runs far ahead of it): eight matmuls with one 64 MiB weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4096, 4096) / 64, requires_grad=False)

    def forward(self, x):
        for _ in range(8):
            x = torch.tanh(x @ self.weight)
        return x


@needs_cuda
def test_prefetch_keeps_at_most_two_offloaded_blocks_on_the_gpu():
    from lightning_bigmodel import dispatch_model, remove_dispatch

    blocks, block_bytes, act_bytes = 16, 4096 * 4096 * 4, 2048 * 4096 * 4
    model = torch.nn.Sequential(*[_Heavy() for _ in range(blocks)])
    dispatch_model(model, {"0": 0, **{str(i): "cpu" for i in range(1, blocks)}})
    x = torch.randn(2048, 4096, device="cuda")
    with torch.inference_mode():
        model(x)  # learns the order
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(x)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    remove_dispatch(model)
    # the block computing, the next one copied in (and the one before while its last kernels drain), activations;
    # without the bound the side stream copied every block the CPU ran ahead to: up to 15 x 64 MiB
    assert extra <= 3 * block_bytes + 4 * act_bytes, extra


# ---------------------------------------------------------------------------------------------- findings 7, 10
class _LazyCache(torch.nn.Module):
    """Builds a cache on its device at the first call and updates a buffer in place on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(512, 512)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = torch.cumsum(torch.ones(512, 512, device=x.device), 0) / 512
        self.calls += 1
        return self.linear(x) @ self.cache


@needs_two_gpus
def test_pipeline_hands_gpus_over_in_order_with_reused_streams():
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.pipeline import MicroBatchPipeline

    torch.manual_seed(0)
    model = torch.nn.Sequential(_LazyCache(), _LazyCache(), _LazyCache(), _LazyCache()).requires_grad_(False)
    x = torch.randn(64, 512)
    with torch.inference_mode():
        expected = torch.nn.Sequential(*[m for m in model]).forward(x)
    for m in model:
        m.cache, m.calls = None, torch.zeros((), dtype=torch.int64)
    dispatch_model(model, {"0": 0, "1": 0, "2": 1, "3": 1})
    with torch.inference_mode(), MicroBatchPipeline(model, micro_batches=4) as pipe:
        first = pipe(x.cuda())
        streams = dict(pipe._streams)
        second = pipe(x.cuda())
        assert pipe._streams == streams and len(streams) == 4 * 2  # one per micro-batch and GPU, kept
    torch.testing.assert_close(first.cpu(), expected, **gpu_tolerance(torch.float32))
    torch.testing.assert_close(second.cpu(), expected, **gpu_tolerance(torch.float32))
    assert [int(m.calls) for m in model] == [8, 8, 8, 8]  # every in-place update counted, none lost


@needs_two_gpus
def test_tied_weight_on_another_gpu_is_not_staged_through_pinned_ram():
    from lightning_bigmodel import dispatch_model
    from models import TiedLM, example_input, make_reference

    x = example_input(TiedLM)
    with torch.inference_mode():
        expected = make_reference(TiedLM)(x)
    model = dispatch_model(make_reference(TiedLM), {"wte": 0, "blocks": 0, "ln_f": "cpu", "head": 1})
    with torch.inference_mode():
        model(x.cuda())  # learns the order
        torch.cuda.synchronize()
        blocks = torch.cuda.host_memory_stats().get("allocations.allocated", 0)
        outs = [model(x.cuda()) for _ in range(3)]
        torch.cuda.synchronize()
    assert torch.cuda.host_memory_stats().get("allocations.allocated", 0) == blocks  # no pinned staging block
    for out in outs:
        torch.testing.assert_close(out.cpu(), expected, **gpu_tolerance(torch.float32))


@needs_cuda
def test_loading_narrows_on_the_host_before_the_gpu_copy(tmp_path):
    from lightning_bigmodel import init_empty_weights, load_checkpoint_in_model, save_sharded_checkpoint

    checkpoint = save_sharded_checkpoint(torch.nn.Linear(8192, 8192, bias=False), tmp_path / "ckpt")  # 256 MiB fp32
    with init_empty_weights():
        model = torch.nn.Linear(8192, 8192, bias=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    load_checkpoint_in_model(model, checkpoint, device_map={"": 0}, dtype=torch.float16)
    peak = torch.cuda.max_memory_allocated() - base
    assert model.weight.dtype == torch.float16 and model.weight.is_cuda
    assert peak <= 8192 * 8192 * 2 + 2**24  # the fp16 weight only; casting on the GPU held the fp32 copy too


# ---------------------------------------------------------------------------------------------- finding 9
@needs_cuda
def test_unindexed_main_device_leaves_gpu_buffers_in_place():
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.offload.hooks import WeightHook
    from lightning_bigmodel.offload.placement import main_device_of
    from models import BufferNet, example_input, make_reference

    x = example_input(BufferNet)
    reference = make_reference(BufferNet)
    with torch.no_grad():
        expected = [reference(x) for _ in range(2)]
    model = dispatch_model(make_reference(BufferNet), {"a": "cpu", "mid": 0, "b": 0}, main_device="cuda")
    assert main_device_of(model) == torch.device("cuda", 0) and model.a.offset.device == torch.device("cuda", 0)
    bound = [getattr(hook, "__self__", None) for hook in model.a._forward_pre_hooks.values()]
    hooks = [hook for hook in bound if isinstance(hook, WeightHook)]
    assert hooks and all(entry.is_param for hook in hooks for entry in hook.entries)  # buffers are not copied in
    with torch.no_grad():
        got = [model(x.cuda()) for _ in range(2)]
    for out, want in zip(got, expected):
        torch.testing.assert_close(out.cpu(), want, **gpu_tolerance(torch.float32))


# ---------------------------------------------------------------------------------------------- review 2, slow paths
@needs_cuda
def test_release_gives_the_cached_gpu_memory_back_before_the_next_plan():
    """Twin: test_pinned.py::test_release_returns_the_gpu_memory_the_allocator_cached_for_the_freed_weights."""
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.pl.loader import release

    # cuBLAS keeps its workspace for the stream in the caching allocator: make it exist before measuring
    torch.nn.functional.linear(torch.randn(8, 2048, device="cuda"), torch.randn(2048, 2048, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)])  # 16 MiB each
    dispatch_model(model, {"0": 0, "1": "cpu", "2": 0, "3": "cpu"})
    with torch.inference_mode():
        for _ in range(3):
            model(torch.randn(8, 2048, device="cuda"))
    assert torch.cuda.memory_reserved(0) >= before + 2 * 2048 * 2048 * 4
    release(model)
    assert torch.cuda.memory_reserved(0) <= before  # what mem_get_info (the next plan) sees as free again


@needs_cuda
def test_disk_weights_are_staged_in_one_reused_page_locked_buffer(tmp_path):
    """Twin: test_gpu_correctness.py::test_disk_weights_are_staged_through_one_reused_page_locked_buffer."""
    from lightning_bigmodel import dispatch_model, remove_dispatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(5)])
    x = torch.randn(4, 1024)
    with torch.inference_mode():
        expected = model(x)
    dispatch_model(model, {"0": 0, "1": "disk", "2": "disk", "3": "disk", "4": 0}, offload_folder=tmp_path / "off")
    pinned_before = pinned.pinned_bytes()
    with torch.inference_mode():
        for _ in range(4):
            got = model(x.cuda())
            torch.testing.assert_close(got.cpu(), expected, **gpu_tolerance(got.dtype))
    staging = model.__dict__["_bigmodel_dispatch"].prefetcher._staging
    layer = 1024 * 1024 * 4 + 1024 * 4
    assert staging.allocations == 1 and layer <= staging.buffer.numel() < layer + 4096
    assert pinned.pinned_bytes() - pinned_before == pinned.pinned_footprint(staging.buffer.numel())
    remove_dispatch(model)
    gc.collect()


# ---------------------------------------------------------------------------------------------- review 2, fault 6
@needs_cuda
@pytest.mark.skipif(
    os.environ.get("BIGMODEL_CSAN_ALL_THREADS") != "1",
    reason="needs CUDA and the CUDA sanitizer in every thread (gpu_check.sh's sanitizer pass, csan_all_threads.py)",
)
def test_the_sanitizer_catches_a_prefetched_copy_read_without_a_wait(monkeypatch):
    """The canary of the sanitizer pass: with the waits removed, the compute stream reads weights the prefetch thread
    copies on its side stream; the sanitizer must report it, else the pass proves nothing."""
    from torch.cuda._sanitizer import CUDASanitizerErrors

    from csan_all_threads import active
    from lightning_bigmodel import dispatch_model, remove_dispatch

    assert active()
    monkeypatch.setattr(torch.cuda.Stream, "wait_event", lambda self, event: None)  # the planted race
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    dispatch_model(model, {"0": 0, "1": "cpu", "2": "cpu", "3": "cpu"})
    x = torch.randn(8, 1024, device="cuda")
    try:
        with torch.inference_mode(), pytest.raises(CUDASanitizerErrors):
            for _ in range(3):  # the first learns the order, the next ones prefetch
                model(x)
    finally:
        remove_dispatch(model)
        torch.cuda.synchronize()  # the sanitizer forgets the pending accesses
