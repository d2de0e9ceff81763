"""Micro-batch pipelining: outputs equal the unsplit batch, devices are used exclusively and overlap.

On CPU there is one real device, so most tests fake a multi-GPU dispatch by setting
``model.hf_device_map`` themselves: the pipeline schedules by the map's device identities.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, remove_dispatch, save_sharded_checkpoint
from lightning_bigmodel.pipeline import MicroBatchPipeline, pipelined_forward
from gpu_expectations import gpu_tolerance

GPT_MAP = {
    "transformer.wte": 0,
    "transformer.wpe": 0,
    "transformer.h.0": 0,
    "transformer.h.1": 1,
    "transformer.h.2": 1,
    "transformer.h.3": 2,
    "transformer.ln_f": 2,
    "lm_head": 2,
}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def call_with_timeout(fn: Callable, *args: Any, timeout: float = 10.0, **kwargs: Any) -> Any:
    """Call ``fn`` in a thread so that a scheduling deadlock fails the test instead of hanging it."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "pipelined call did not finish: deadlock?"
    if "error" in box:
        raise box["error"]
    return box["value"]


class Probe:
    """Records, per lock domain, how many micro-batches are inside and in which order they enter."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.inside: dict = {}
        self.max_inside: dict = {}
        self.order: dict = {}
        self.threads: set = set()

    def attach(self, module: nn.Module, domain: Any, name: str) -> None:
        # Attached after the pipeline's hooks, like dispatch hooks attached before them: the pre-hook
        # runs after the device lock is taken and the post-hook before a nested key gives it back.
        module.register_forward_pre_hook(lambda m, a: self.enter(domain, name))
        module.register_forward_hook(lambda m, a, o: self.exit(domain), prepend=True)

    def enter(self, domain: Any, name: str) -> None:
        thread = threading.current_thread().name
        with self.lock:
            self.threads.add(thread)
            self.inside[domain] = self.inside.get(domain, 0) + 1
            self.max_inside[domain] = max(self.max_inside.get(domain, 0), self.inside[domain])
            self.order.setdefault(name, []).append(thread)
        time.sleep(self.delay)  # widen the window in which a race would show

    def exit(self, domain: Any) -> None:
        with self.lock:
            self.inside[domain] -= 1


class Stage(nn.Module):
    def __init__(self, width: int = 4, delay: float = 0.0, fail_on: Optional[float] = None) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.delay = delay
        self.fail_on = fail_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_on is not None and (x[:, 0] == self.fail_on).any():
            raise RuntimeError(f"bad sample {self.fail_on}")
        time.sleep(self.delay)  # releases the GIL, like waiting on a GPU
        return self.linear(x)


class Chain(nn.Module):
    def __init__(self, n: int = 2, width: int = 4, delay: float = 0.0) -> None:
        super().__init__()
        self.stages = nn.ModuleList(Stage(width, delay) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


@dataclasses.dataclass
class Output(OrderedDict):
    """Shaped like a transformers ``ModelOutput``: a dataclass that is also an ordered dict."""

    logits: Optional[torch.Tensor] = None
    hidden: Optional[tuple] = None
    extra: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class KwargsModel(nn.Module):
    """Keyword inputs (a mask, a non-batch bias, a float) and structured outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = Stage(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids, mask=None, bias=None, scale=1.0, as_dict=False):
        h = self.embed(ids) * mask.unsqueeze(-1) if mask is not None else self.embed(ids)
        h = self.body(h.flatten(0, 1)).view_as(h) + (0 if bias is None else bias)
        logits = self.head(h) * scale
        if as_dict:
            return {"logits": logits, "pair": (h, logits.sum(-1)), "n_layers": 2, "none": None}
        return Output(logits=logits, hidden=(h,))


def gpt_ids(batch: int, t: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("micro_batches", [1, 3, 4, 9])
def test_gpt_fake_multi_gpu_equals_unsplit(tiny_gpt: GPT, micro_batches: int) -> None:
    ids = gpt_ids(6)
    with torch.no_grad():
        expected = tiny_gpt(ids)
    tiny_gpt.hf_device_map = dict(GPT_MAP)
    before = hook_count(tiny_gpt)
    with torch.no_grad():
        actual = call_with_timeout(pipelined_forward, tiny_gpt, ids, micro_batches=micro_batches)
    torch.testing.assert_close(actual, expected)
    assert hook_count(tiny_gpt) == before


def test_gpt_devices_used_one_micro_batch_at_a_time_and_in_order(tiny_gpt: GPT) -> None:
    ids = gpt_ids(8)
    with torch.no_grad():
        expected = tiny_gpt(ids)
    tiny_gpt.hf_device_map = dict(GPT_MAP)
    with MicroBatchPipeline(tiny_gpt, micro_batches=4) as pipe:
        assert pipe.pipelined
        probe = Probe(delay=0.002)
        for name, device in GPT_MAP.items():
            probe.attach(tiny_gpt.get_submodule(name), device, name)
        with torch.no_grad():
            actual = call_with_timeout(pipe, ids)
    torch.testing.assert_close(actual, expected)
    assert probe.max_inside == {0: 1, 1: 1, 2: 1}
    in_order = [f"micro-batch-{i}" for i in range(4)]
    assert all(order == in_order for order in probe.order.values()), probe.order
    assert probe.threads == set(in_order)


def test_pipelined_generate_equals_unsplit(tiny_gpt: GPT) -> None:
    ids = gpt_ids(5, t=4)
    expected = tiny_gpt.generate(ids, max_new_tokens=6)
    tiny_gpt.hf_device_map = dict(GPT_MAP)
    with MicroBatchPipeline(tiny_gpt, micro_batches=3) as pipe:
        actual = call_with_timeout(pipe.generate, ids, max_new_tokens=6)
    assert torch.equal(actual, expected)


class Rendezvous(nn.Module):
    """A stage whose ``meet_on``-th call waits at ``barrier``: it passes only while the other stage is inside its
    own forward at the same time, so overlap is proven by meeting, not by timing."""

    def __init__(self, barrier: threading.Barrier, meet_on: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.barrier, self.meet_on, self.calls = barrier, meet_on, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.meet_on:
            self.barrier.wait()  # BrokenBarrierError after the timeout when the stages never run at once
        return self.linear(x)


def test_overlap_is_real_with_two_devices() -> None:
    """Stage 0 on micro-batch 1 and stage 1 on micro-batch 0 must run at the same time on two devices. (How much
    faster that makes a run is the benchmark's business: `benchmarks/pipeline_bench.py`.)"""
    barrier = threading.Barrier(2, timeout=10)
    model = nn.Sequential(Rendezvous(barrier, meet_on=2), Rendezvous(barrier, meet_on=1))
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = model[1].linear(model[0].linear(x))
        model.hf_device_map = {"0": 0, "1": 1}
        with MicroBatchPipeline(model, micro_batches=4) as pipe:
            pipelined = call_with_timeout(pipe, x, timeout=30)
    torch.testing.assert_close(pipelined, expected)
    assert not barrier.broken and (model[0].calls, model[1].calls) == (4, 4)


def test_without_a_device_map_micro_batches_run_one_after_the_other() -> None:
    """The same rendezvous cannot happen without two devices: the stages never overlap (the barrier breaks)."""
    barrier = threading.Barrier(2, timeout=0.5)
    model = nn.Sequential(Rendezvous(barrier, meet_on=2), Rendezvous(barrier, meet_on=1))
    with torch.no_grad(), pytest.raises(threading.BrokenBarrierError):
        MicroBatchPipeline(model, micro_batches=4)(torch.randn(8, 4))


def test_cpu_and_disk_entries_share_the_main_device_lock() -> None:
    model = Chain(n=4)
    device_map = {"stages.0": 0, "stages.1": "cpu", "stages.2": "disk", "stages.3": 1}
    model.hf_device_map = device_map
    x = torch.randn(10, 4)
    with torch.no_grad():
        expected = model(x)
        with MicroBatchPipeline(model, micro_batches=5) as pipe:
            assert set(pipe.domains.values()) == {0, 1}
            probe = Probe(delay=0.003)
            for i, device in enumerate(device_map.values()):
                probe.attach(model.stages[i], 1 if device == 1 else 0, f"stages.{i}")
            actual = call_with_timeout(pipe, x)
    torch.testing.assert_close(actual, expected)
    assert probe.max_inside == {0: 1, 1: 1}


def test_only_cpu_and_disk_runs_sequentially_in_the_caller_thread() -> None:
    model = Chain(n=3)
    model.hf_device_map = {"stages.0": "cpu", "stages.1": "disk", "stages.2": "cpu"}
    x = torch.randn(7, 4)
    probe = Probe()
    for i in range(3):
        probe.attach(model.stages[i], 0, f"stages.{i}")
    with torch.no_grad():
        expected = model(x)
        pipe = MicroBatchPipeline(model, micro_batches=3)
        assert not pipe.pipelined and hook_count(model) == 6  # the probe's hooks only
        actual = pipe(x)
    torch.testing.assert_close(actual, expected)
    assert probe.threads == {threading.current_thread().name}
    assert len(probe.order["stages.0"]) == 1 + 3


def test_nested_map_keys_return_to_the_parent_device() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.after = Stage(), Stage()

        def forward(self, x):
            return self.after(self.inner(x))

    model = nn.Sequential(Stage(), Outer())
    model.hf_device_map = {"0": 1, "1": 0, "1.inner": 1}
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected = model(x)
        with MicroBatchPipeline(model, micro_batches=3) as pipe:
            probe = Probe(delay=0.003)
            probe.attach(model[0], 1, "0")
            probe.attach(model[1].inner, 1, "1.inner")
            probe.attach(model[1].after, 0, "1.after")  # not a map key: runs under its parent's device
            actual = call_with_timeout(pipe, x)
    torch.testing.assert_close(actual, expected)
    assert probe.max_inside == {0: 1, 1: 1}


def test_kwargs_and_structured_outputs() -> None:
    torch.manual_seed(0)
    model = KwargsModel().eval()
    ids = torch.randint(0, 11, (5, 3))
    mask = (torch.rand(5, 3) > 0.3).float()
    bias = torch.randn(6)  # no batch dimension: passed whole to every micro-batch
    with torch.no_grad():
        expected = model(ids, mask=mask, bias=bias, scale=0.5)
        expected_dict = model(ids, mask=mask, bias=bias, as_dict=True)
    model.hf_device_map = {"embed": 0, "body": 1, "head": 0}
    with torch.no_grad(), MicroBatchPipeline(model, micro_batches=2) as pipe:
        actual = call_with_timeout(pipe, ids, mask=mask, bias=bias, scale=0.5)
        actual_dict = call_with_timeout(pipe, ids, mask=mask, bias=bias, as_dict=True)
    assert type(actual) is Output and list(actual.keys()) == ["logits", "hidden"]
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual["hidden"], expected["hidden"])
    assert isinstance(actual.hidden, tuple) and actual.extra is None
    assert actual_dict.keys() == expected_dict.keys() and actual_dict["n_layers"] == 2
    assert actual_dict["none"] is None
    torch.testing.assert_close(actual_dict["pair"], expected_dict["pair"])
    torch.testing.assert_close(actual_dict["logits"], expected_dict["logits"])


def test_transformers_model_output_is_rebuilt() -> None:
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")

    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = Stage(), Stage()

        def forward(self, x):
            h = self.a(x)
            return modeling_outputs.CausalLMOutput(logits=self.b(h), hidden_states=(x, h))

    model = HFLike()
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x)
        model.hf_device_map = {"a": 0, "b": 1}
        actual = call_with_timeout(pipelined_forward, model, x, micro_batches=4)
    assert type(actual) is modeling_outputs.CausalLMOutput and actual.loss is None
    assert list(actual.keys()) == ["logits", "hidden_states"]
    torch.testing.assert_close(actual.logits, expected.logits)
    torch.testing.assert_close(actual.hidden_states, expected.hidden_states)


def test_grad_inference_and_autocast_modes_reach_the_workers() -> None:
    torch.manual_seed(0)
    model = Chain(n=2)
    x = torch.randn(6, 4)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.hf_device_map = {"stages.0": 0, "stages.1": 1}
    with MicroBatchPipeline(model, micro_batches=3) as pipe:
        actual = call_with_timeout(pipe, x)  # grad enabled: the graph spans the workers
        actual.square().sum().backward()
        torch.testing.assert_close(actual, expected)
        for param, grad in zip(model.parameters(), expected_grads):
            torch.testing.assert_close(param.grad, grad)

        seen = []
        model.stages[1].register_forward_pre_hook(
            lambda m, a: seen.append((torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")))
        )
        with torch.inference_mode():
            out = pipe(x)
        assert out.is_inference() and seen == [(True, False)] * 3
        seen.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference = model(x)
            out = pipe(x)
        assert out.dtype == torch.bfloat16 and not out.requires_grad
        torch.testing.assert_close(out, reference)
        assert seen == [(False, True)] * 4  # the reference call included


@pytest.mark.parametrize("failing_sample", [0.0, 5.0])
def test_worker_exception_reaches_the_caller_and_releases_the_devices(failing_sample: float) -> None:
    model = Chain(n=3, delay=0.002)
    model.hf_device_map = {"stages.0": 0, "stages.1": 1, "stages.2": 2}
    x = torch.arange(6.0).repeat(4, 1).T.contiguous()  # sample i is all i
    with torch.no_grad():
        for stage in model.stages:  # identity stages, so stage 1 sees sample i as i
            stage.linear.weight.copy_(torch.eye(4))
            stage.linear.bias.zero_()
    with torch.no_grad(), MicroBatchPipeline(model, micro_batches=6) as pipe:
        expected = model(x)
        model.stages[1].fail_on = failing_sample
        with pytest.raises(RuntimeError, match=f"bad sample {failing_sample}"):
            call_with_timeout(pipe, x)
        model.stages[1].fail_on = None
        torch.testing.assert_close(call_with_timeout(pipe, x), expected)  # the pipeline still works
    assert hook_count(model) == 0


def test_not_dispatched_model_splits_and_runs_sequentially(tiny_gpt: GPT) -> None:
    ids = gpt_ids(7)
    with torch.no_grad():
        expected = tiny_gpt(ids)
        pipe = MicroBatchPipeline(tiny_gpt, micro_batches=3)
        assert not pipe.pipelined and hook_count(tiny_gpt) == 0
        torch.testing.assert_close(pipe(ids), expected)


def test_direct_calls_are_untouched_while_hooks_are_attached(tiny_gpt: GPT) -> None:
    ids = gpt_ids(4)
    with torch.no_grad():
        expected = tiny_gpt(ids)
        tiny_gpt.hf_device_map = dict(GPT_MAP)
        with MicroBatchPipeline(tiny_gpt) as pipe:
            assert hook_count(tiny_gpt) == 2 * len(GPT_MAP)
            torch.testing.assert_close(tiny_gpt(ids), expected)
        assert hook_count(tiny_gpt) == 0


def test_device_map_of_a_wrapped_submodule_is_found(tiny_gpt: GPT) -> None:
    class Wrapper(nn.Module):  # like a LightningModule holding the dispatched network as `self.model`
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids).softmax(-1)

    ids = gpt_ids(4)
    tiny_gpt.hf_device_map = dict(GPT_MAP)
    wrapper = Wrapper(tiny_gpt)
    with torch.no_grad():
        expected = wrapper(ids)
        with MicroBatchPipeline(wrapper, micro_batches=2) as pipe:
            assert pipe.pipelined and hook_count(wrapper) == 2 * len(GPT_MAP)
            torch.testing.assert_close(call_with_timeout(pipe, ids), expected)


def test_real_dispatch_with_cpu_and_disk_offload(tmp_path, tiny_gpt: GPT) -> None:
    ids = gpt_ids(6)
    with torch.inference_mode():
        expected = tiny_gpt(ids)
    checkpoint = save_sharded_checkpoint(tiny_gpt, tmp_path / "ckpt", max_shard_size="1GB")
    with init_empty_weights():
        model = GPT(GPTConfig.preset("tiny")).eval()
    device_map = {name: "cpu" for name in GPT_MAP} | {"transformer.h.1": "disk", "transformer.h.2": "disk"}
    load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=tmp_path / "offload")
    with torch.inference_mode():
        model(ids)  # the first forward reads the CPU weights loaded in place and removes that one-shot hook
    dispatched_hooks = hook_count(model)
    with torch.inference_mode():
        with MicroBatchPipeline(model, micro_batches=4) as pipe:
            assert not pipe.pipelined  # cpu and disk both execute on the CPU: one device, one after the other
            torch.testing.assert_close(pipe(ids), expected)
        # Pretend the disk entries run on a second device: the real dispatch hooks and memory-mapped
        # disk weights are then used by two micro-batches at once.
        model.hf_device_map = {name: 1 if device == "disk" else 0 for name, device in device_map.items()}
        with MicroBatchPipeline(model, micro_batches=4) as pipe:
            assert pipe.pipelined
            torch.testing.assert_close(call_with_timeout(pipe, ids), expected)
            torch.testing.assert_close(call_with_timeout(pipe.generate, ids, max_new_tokens=3), tiny_gpt.generate(ids, 3))
    assert hook_count(model) == dispatched_hooks
    remove_dispatch(model)
    assert hook_count(model) == 0


def test_map_key_naming_a_tensor_locks_its_module(tiny_gpt: GPT) -> None:
    ids = gpt_ids(4)
    with torch.no_grad():
        expected = tiny_gpt(ids)
    tiny_gpt.hf_device_map = {k: v for k, v in GPT_MAP.items() if k != "lm_head"} | {"lm_head.weight": 2}
    with torch.no_grad(), MicroBatchPipeline(tiny_gpt, micro_batches=2) as pipe:
        assert len(tiny_gpt.lm_head._forward_pre_hooks) == 1
        torch.testing.assert_close(call_with_timeout(pipe, ids), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_one_gpu_fake_two_devices() -> None:
    torch.manual_seed(0)
    model = Chain(n=2, width=256).cuda()
    x = torch.randn(64, 256, device="cuda")
    with torch.inference_mode():
        expected = model(x)
        model.hf_device_map = {"stages.0": 0, "stages.1": 1}  # "1" is a lock domain, not a GPU here
        for _ in range(3):  # reuse of stream memory across calls
            got = call_with_timeout(pipelined_forward, model, x, micro_batches=4)
            torch.testing.assert_close(got, expected, **gpu_tolerance(got.dtype))  # smaller batches, other kernels


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_real_dispatch_over_two_gpus(tiny_gpt: GPT) -> None:
    from lightning_bigmodel import dispatch_model

    ids = gpt_ids(8)
    with torch.inference_mode():
        expected = tiny_gpt(ids)
    tiny_gpt.lm_head.weight = nn.Parameter(tiny_gpt.lm_head.weight.detach().clone())  # untie across GPUs
    dispatch_model(tiny_gpt, {k: min(v, 1) for k, v in GPT_MAP.items()})
    with torch.inference_mode(), MicroBatchPipeline(tiny_gpt, micro_batches=4) as pipe:
        actual = call_with_timeout(pipe, ids.cuda())
    assert actual.device == torch.device("cuda", 0)
    torch.testing.assert_close(actual.cpu(), expected, **gpu_tolerance(actual.dtype))  # GPU vs CPU kernels


def test_bad_arguments_are_explained(tiny_gpt: GPT) -> None:
    with pytest.raises(ValueError, match="`micro_batches` must be a positive integer, got 0"):
        MicroBatchPipeline(tiny_gpt, micro_batches=0)
    with pytest.raises(ValueError, match="No input tensor has a batch dimension `dim=2`"):
        pipelined_forward(tiny_gpt, gpt_ids(2), dim=2)
    tiny_gpt.hf_device_map = {"transformer.h.0": 0, "transformer.h.9": 1}
    with pytest.raises(ValueError, match="'transformer.h.9' names no module"):
        MicroBatchPipeline(tiny_gpt)
    scalar_model = Chain(n=2)
    scalar_model.hf_device_map = {"stages.0": 0, "stages.1": 1}
    with pytest.raises(ValueError, match="0-d tensor has no batch dimension"):
        with torch.no_grad():
            pipelined_forward(nn.Sequential(scalar_model, Mean()), torch.randn(4, 4))


class Mean(nn.Module):
    def forward(self, x):
        return x.mean()


def test_simulated_streams_one_gpu_fake_two_devices() -> None:
    """Twin of test_cuda_streams_one_gpu_fake_two_devices on one simulated GPU: each micro-batch on a stream of its
    own, every output handed to the caller's stream."""
    from lightning_bigmodel.simulate import simulated_gpus

    torch.manual_seed(0)
    model = Chain(n=2, width=256)
    x = torch.randn(64, 256)
    with torch.inference_mode():
        expected = model(x)
    with simulated_gpus(1) as gpus, torch.no_grad():
        model.to(gpus.devices[0])
        model.hf_device_map = {"stages.0": 0, "stages.1": 1}  # "1" is a lock domain, not a GPU here
        streams = []
        for _ in range(3):
            gpus.clear_log()
            got = call_with_timeout(pipelined_forward, model, x.to(gpus.devices[0]), micro_batches=4)
            torch.testing.assert_close(got.to("cpu"), expected)
            log = gpus.log
            streams.append({(r.thread, r.stream) for r in log if r.thread.startswith("micro-batch-")})
            handed = [r for r in log if r.kind == "record_stream"]
            assert [(r.stream, r.nbytes) for r in handed] == [(0, 16 * 256 * 4)] * 4  # the caller's default stream
            assert not [r for r in handed if r.thread.startswith("micro-batch-")]  # by the caller, once per output
    for used in streams:  # each micro-batch on a stream of its own, none the default one
        assert len({thread for thread, _ in used}) == len(used) == 4 and all(stream != 0 for _, stream in used)


def test_simulated_real_dispatch_over_two_gpus(tiny_gpt: GPT) -> None:
    """Twin of test_cuda_real_dispatch_over_two_gpus on two simulated GPUs."""
    from lightning_bigmodel import dispatch_model
    from lightning_bigmodel.simulate import simulated_gpus

    ids = gpt_ids(8)
    with torch.inference_mode():
        expected = tiny_gpt(ids)
    tiny_gpt.lm_head.weight = nn.Parameter(tiny_gpt.lm_head.weight.detach().clone())  # untie across GPUs
    with simulated_gpus(2) as gpus, torch.no_grad():
        dispatch_model(tiny_gpt, {k: min(v, 1) for k, v in GPT_MAP.items()})
        with MicroBatchPipeline(tiny_gpt, micro_batches=4) as pipe:
            actual = call_with_timeout(pipe, ids.to(gpus.devices[0]))
        assert actual.device == gpus.devices[0]
        remove_dispatch(tiny_gpt)
    torch.testing.assert_close(actual.to("cpu"), expected, rtol=1e-5, atol=1e-5)  # attention: the math kernel
