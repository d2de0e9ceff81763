"""dispatch_model / remove_dispatch / load_checkpoint_and_dispatch, and the offload hooks (on CPU; CUDA-gated below)."""

from __future__ import annotations

import threading
from collections import namedtuple

import pytest
import torch
from gpu_expectations import gpu_tolerance
from models import MAPS, BufferNet, TiedLM, UntiedMLP, example_input, make_reference
from torch import nn

from lightning_bigmodel import (
    dispatch_model,
    infer_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    remove_dispatch,
    save_sharded_checkpoint,
)
from lightning_bigmodel.offload.attach import _callable_units
from lightning_bigmodel.offload.hooks import HostEntry, RootHook, WeightHook, move_to
from lightning_bigmodel.offload.placement import is_disk, main_device_of
from lightning_bigmodel.offload.prefetch import Prefetcher

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def empty_model(cls):
    with init_empty_weights():
        return cls().eval()


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def outputs(model, cls, calls=1):
    with torch.inference_mode():
        return [model(example_input(cls)) for _ in range(calls)]


@pytest.mark.parametrize("cls", [TiedLM, UntiedMLP, BufferNet])
def test_dispatch_plain_model_writes_disk_entries(tmp_path, cls):
    model = make_reference(cls)
    expected = outputs(make_reference(cls), cls, calls=2)
    dispatch_model(model, MAPS[cls]["mixed"], offload_folder=tmp_path / "off")
    assert model.hf_device_map == MAPS[cls]["mixed"]
    assert any(is_disk(p) for p in model.parameters())
    assert len(list((tmp_path / "off").glob("*.safetensors"))) > 0
    if cls is TiedLM:
        assert model.head.weight is model.wte.weight
    for got, want in zip(outputs(model, cls, calls=2), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_dispatch_needs_folder_for_in_memory_disk_weights():
    model = make_reference(UntiedMLP)
    with pytest.raises(ValueError, match="offload_folder="):
        dispatch_model(model, {"": "disk"})
    assert not any(is_disk(p) for p in model.parameters())


def test_cpu_only_dispatch_attaches_no_hooks(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map={"": "cpu"})
    # Weights loaded as file views get one root hook that copies them at the first forward, then removes itself.
    assert all_hooks(model) == 1
    torch.testing.assert_close(outputs(model, UntiedMLP)[0], outputs(make_reference(UntiedMLP), UntiedMLP)[0])
    assert all_hooks(model) == 0
    # disk weights on a CPU execution device are streamed: a guard on the root, and the stream's pre and post hooks
    # on each module holding disk weights (no weight moves)
    model = load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map=MAPS[UntiedMLP]["mixed"])
    streamed = [m for m in model.modules() if any(is_disk(p) for p in m._parameters.values() if p is not None)]
    torch.testing.assert_close(outputs(model, UntiedMLP)[0], outputs(make_reference(UntiedMLP), UntiedMLP)[0])
    assert streamed and all_hooks(model) == 2 + 2 * len(streamed) and len(model._forward_pre_hooks) == 1


def test_dispatched_model_refuses_moves_until_removed(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(TiedLM), tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(empty_model(TiedLM), checkpoint, device_map=MAPS[TiedLM]["mixed"])
    for move in (lambda m: m.to("cpu"), lambda m: m.cpu(), lambda m: m.half(), lambda m: m.to(torch.float64)):
        with pytest.raises(RuntimeError, match="remove_dispatch"):
            move(model)
    hooks = all_hooks(model)
    dispatch_model(model, MAPS[TiedLM]["mixed"])  # again: replaces, does not stack
    assert all_hooks(model) == hooks
    remove_dispatch(model)
    assert all_hooks(model) == 0 and not hasattr(model, "hf_device_map")
    assert "_apply" not in model.__dict__ and "forward" not in model.__dict__
    model.to(torch.float32)  # allowed again
    torch.testing.assert_close(outputs(model, TiedLM)[0], outputs(make_reference(TiedLM), TiedLM)[0])


def test_training_through_offloaded_weights_is_refused(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map=MAPS[UntiedMLP]["mixed"])
    model(example_input(UntiedMLP))  # grad mode, but nothing requires grad: fine
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="offloaded weight"):
        model(example_input(UntiedMLP))
    with torch.no_grad():
        model(example_input(UntiedMLP))


def test_dispatch_refuses_meta_parameters(tmp_path):
    state = make_reference(UntiedMLP).state_dict()
    state.pop("out.weight")
    checkpoint = save_sharded_checkpoint(state, tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    with pytest.raises(RuntimeError, match="out.weight"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})


def test_unknown_gpu_or_policy_is_refused(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    missing_gpu = torch.cuda.device_count()
    with pytest.raises(ValueError, match="GPU"):
        dispatch_model(make_reference(UntiedMLP), {"": missing_gpu})
    with pytest.raises(ValueError, match="policy"):
        load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map="fastest")


def test_policy_plans_and_loads(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(
        empty_model(UntiedMLP), checkpoint, device_map="sequential", max_memory={"cpu": 6000, "disk": "1GB"},
        no_split_module_classes=["Block"], offload_folder=tmp_path / "off",
    )  # fmt: skip
    assert "disk" in model.hf_device_map.values()
    torch.testing.assert_close(outputs(model, UntiedMLP)[0], outputs(make_reference(UntiedMLP), UntiedMLP)[0])


def test_loading_into_a_dispatched_model_is_refused(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    model = load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map=MAPS[UntiedMLP]["mixed"])
    with pytest.raises(RuntimeError, match="remove_dispatch"):
        load_checkpoint_in_model(model, checkpoint, device_map=MAPS[UntiedMLP]["mixed"])
    remove_dispatch(model)
    other = save_sharded_checkpoint(make_reference(UntiedMLP, seed=3), tmp_path / "other")  # other weights: a reload
    load_checkpoint_in_model(
        model, other, device_map=MAPS[UntiedMLP]["mixed"]
    )  # that did nothing would keep the first ones
    reference = make_reference(UntiedMLP, seed=3)
    torch.testing.assert_close(outputs(model, UntiedMLP)[0], outputs(reference, UntiedMLP)[0], rtol=0, atol=0)


def test_hooks_of_containers_go_to_their_children():
    model = UntiedMLP()
    assert list(_callable_units(model, "blocks")) == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(_callable_units(model, "blocks.1.fc.weight")) == ["blocks.1.fc"]
    assert list(_callable_units(model, "")) == [""]


@pytest.mark.parametrize("cls", [TiedLM, UntiedMLP, BufferNet])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_hook_wiring_with_a_non_cpu_execution_device(tmp_path, cls, offload_buffers):
    """The accelerator path without an accelerator: execute on "meta" while weights stay on the host. Every module
    must see all its tensors on the execution device during its forward, and the host tensors afterwards."""
    model = make_reference(cls)
    device_map = MAPS[cls]["mixed"]
    if cls is UntiedMLP:
        device_map = {"inp": "disk", "blocks": "cpu", "out": "cpu"}  # a container key: hooks go to its children
    dispatch_model(
        model, device_map, main_device="meta", offload_folder=tmp_path / "off", offload_buffers=offload_buffers
    )
    params = {name: p for name, p in model.named_parameters()}
    seen = []

    def check(module, args):
        tensors = [*module._parameters.values(), *module._buffers.values()]
        assert all(t.is_meta for t in tensors if t is not None), type(module).__name__
        assert all(a.is_meta for a in args if isinstance(a, torch.Tensor))
        seen.append(module)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(check) for m in leaves]
    with torch.inference_mode():
        out = model(example_input(cls).to("meta"))
    assert out.is_meta and len(seen) == len(leaves)
    assert {name: p for name, p in model.named_parameters()} == params  # the same host objects are back
    assert all(p.device.type == "cpu" for p in params.values())
    assert all(b.is_meta != offload_buffers for b in model.buffers())
    for handle in handles:
        handle.remove()


def test_move_to_nested():
    Pair = namedtuple("Pair", "a b")
    obj = {"x": [torch.ones(1), (2, Pair(torch.zeros(1), "s"))], "y": None}
    moved = move_to(obj, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][1].a.is_meta and isinstance(moved["x"][1][1], Pair)
    assert moved["x"][1][0] == 2 and moved["x"][1][1].b == "s" and moved["y"] is None


def test_weight_hook_swaps_copies_in_and_writes_buffers_back():
    """The GPU offload mechanism, run with CPU as the 'execution device' (copies are real copies)."""
    reference, model = make_reference(BufferNet), make_reference(BufferNet)
    layer = model.a
    host = {"weight": layer.fc.weight, "bias": layer.fc.bias, "steps": layer.steps, "offset": layer.offset}
    entries = [
        HostEntry(layer.fc.weight, [(layer.fc, "weight")], True, False),
        HostEntry(layer.fc.bias, [(layer.fc, "bias")], True, False),
        HostEntry(layer.steps, [(layer, "steps")], False, True),
        HostEntry(layer.offset, [(layer, "offset")], False, True),
    ]
    hook = WeightHook("a", torch.device("cpu"), entries, move_inputs=True)
    seen = {}

    def spy(module, args):
        seen["weight"] = module.weight
        seen["steps"] = layer.steps

    layer.register_forward_pre_hook(hook.pre, with_kwargs=True)
    layer.register_forward_hook(hook.post, with_kwargs=True, always_call=True)
    layer.fc.register_forward_pre_hook(spy)
    with torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(model(example_input(BufferNet)), reference(example_input(BufferNet)))
    assert seen["weight"] is not host["weight"] and torch.equal(seen["weight"], host["weight"])
    assert seen["steps"] is not host["steps"]
    assert layer.fc.weight is host["weight"] and layer.steps is host["steps"]
    assert int(host["steps"]) == 3 == int(reference.a.steps)  # written back after each forward


# ---------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("cls", [TiedLM, UntiedMLP, BufferNet])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_gpu_with_cpu_and_disk_offload(tmp_path, cls, offload_buffers):
    checkpoint = save_sharded_checkpoint(make_reference(cls), tmp_path / "ckpt")
    device_map = dict(MAPS[cls]["mixed"])
    first = next(iter(device_map))
    device_map[first] = 0
    model = load_checkpoint_and_dispatch(
        empty_model(cls), checkpoint, device_map=device_map, offload_buffers=offload_buffers
    )
    reference = make_reference(cls)
    with torch.inference_mode():
        for _ in range(4):  # first call learns the order, the next ones prefetch
            got = model(example_input(cls))
            assert got.device.type == "cpu"  # returned to the input's device
            torch.testing.assert_close(got, reference(example_input(cls)), **gpu_tolerance(got.dtype))  # GPU vs CPU
    if cls is TiedLM:
        assert model.head.weight is model.wte.weight
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if not n.startswith(first))
    remove_dispatch(model)


@needs_cuda
def test_gpu_pinned_host_weights(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(UntiedMLP), tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    load_checkpoint_in_model(model, checkpoint, device_map={"inp": 0, "blocks": "cpu", "out": "disk"})
    assert model.inp.weight.is_cuda and model.blocks[0].fc.weight.is_pinned() and is_disk(model.out.weight)


# ---------------------------------------------------------------------------------------------- threads
def _in_thread(fn):
    """Run ``fn`` in a new thread and return its result (re-raising its exception)."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_prefetcher_learns_the_order_in_the_first_thread_only():
    """A pipelined first forward runs micro-batches in threads: only the first thread's calls form the order."""
    prefetcher = Prefetcher()
    a, b, c = "a", "b", "c"  # stand-ins for weight hooks: recording only stores and compares them
    prefetcher.started(a)
    _in_thread(lambda: (prefetcher.started(c), prefetcher.started(a)))  # another micro-batch, interleaved
    prefetcher.started(b)
    _in_thread(prefetcher.end_forward)  # another thread's forward ends: the order is not fixed by it
    assert prefetcher.recording
    prefetcher.started(c)
    prefetcher.end_forward()
    assert not prefetcher.recording
    assert prefetcher._next == {a: b, b: c, c: a}


def test_prefetcher_order_can_be_fixed_from_any_thread():
    prefetcher = Prefetcher()
    prefetcher.finish_recording()  # nothing recorded yet: keeps recording
    assert prefetcher.recording
    _in_thread(lambda: (prefetcher.started("x"), prefetcher.started("y")))
    prefetcher.finish_recording()  # e.g. the strategy after a step, on the main thread
    assert not prefetcher.recording and prefetcher._next == {"x": "y", "y": "x"}
    prefetcher.close()


def test_root_hook_returns_each_threads_outputs_to_its_own_input_device():
    """Two threads inside the same root at once, with inputs on different devices: each gets its own back."""
    inside = threading.Barrier(2)

    class Net(nn.Module):
        def forward(self, x):
            inside.wait(timeout=5)  # both threads have passed the pre-hook before either returns
            return torch.ones(2)  # on CPU, whatever the input

    net, hook = Net(), RootHook({}, restore_outputs=True)
    net.register_forward_pre_hook(hook.pre, with_kwargs=True)
    net.register_forward_hook(hook.post, with_kwargs=True, always_call=True)
    results = {}
    threads = [
        threading.Thread(target=lambda d=d: results.__setitem__(d, net(torch.zeros(1, device=d))))
        for d in ("meta", "cpu")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["meta"].is_meta and results["cpu"].device.type == "cpu"
    assert torch.equal(results["cpu"], torch.ones(2))


def test_main_device_is_kept_on_the_dispatched_model(tmp_path):
    model = make_reference(UntiedMLP)
    assert main_device_of(model) is None
    dispatch_model(model, MAPS[UntiedMLP]["mixed"], main_device="meta", offload_folder=tmp_path / "off")
    assert main_device_of(model) == torch.device("meta")
    assert model._bigmodel_dispatch.main_device == torch.device("meta")
    wrapper = nn.Sequential(model)  # a dispatched child is found too
    assert main_device_of(wrapper) == torch.device("meta")
    remove_dispatch(model)
    assert main_device_of(model) is None


# ---------------------------------------------------------------------- migration from accelerate, inference mode


class DropoutNet(nn.Module):
    """A linear layer behind dropout: in training mode its outputs are random."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"drop": "cpu", "fc": "disk"}, None])
def test_dispatched_model_is_in_eval_mode(tmp_path, device_map):
    torch.manual_seed(0)
    reference = DropoutNet().eval()
    checkpoint = save_sharded_checkpoint(reference, tmp_path / "ckpt")
    with init_empty_weights():
        model = DropoutNet()  # training mode, as a freshly built module is
    assert model.training
    model = load_checkpoint_and_dispatch(model, checkpoint, device_map=device_map, offload_folder=tmp_path / "off")
    assert not any(m.training for m in model.modules())
    x = torch.randn(4, 16)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_dispatch_model_returns_eval_mode():
    model = make_reference(UntiedMLP).train()
    assert dispatch_model(model, {"": "cpu"}) is model and not model.training


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m, ckpt, tmp: dispatch_model(m, {"": "cpu"}, None, None, tmp),  # accelerate: ..., state_dict, offload_dir
            r"dispatch_model\(\) takes `main_device`, `offload_folder` as keywords: dispatch_model\(model, device_map, "
            r"main_device=\.\.\., offload_folder=\.\.\.\).*accelerate's `state_dict` has no equivalent",
        ),
        (
            lambda m, ckpt, tmp: load_checkpoint_in_model(m, ckpt, {"": "cpu"}, tmp),
            r"load_checkpoint_in_model\(\) takes `device_map`, `offload_folder` as keywords: "
            r"load_checkpoint_in_model\(model, checkpoint, device_map=\.\.\., offload_folder=\.\.\.\)",
        ),
        (
            lambda m, ckpt, tmp: load_checkpoint_and_dispatch(m, ckpt, "auto", {"cpu": 10**9}),
            r"load_checkpoint_and_dispatch\(\) takes `device_map`, `max_memory` as keywords",
        ),
        (
            lambda m, ckpt, tmp: infer_device_map(m, {"cpu": 10**9}, ["Block"]),
            r"infer_device_map\(\) takes `no_split_module_classes` as a keyword",
        ),
        (
            lambda m, ckpt, tmp: save_sharded_checkpoint(m, tmp, "1GB"),
            r"save_sharded_checkpoint\(\) takes `max_shard_size` as a keyword",
        ),
    ],
)
def test_positional_calls_in_accelerates_order_are_refused_naming_our_keyword(tmp_path, call, message):
    reference = make_reference(UntiedMLP)
    checkpoint = save_sharded_checkpoint(reference, tmp_path / "ckpt")
    model = empty_model(UntiedMLP) if "load_checkpoint" in message else make_reference(UntiedMLP)
    with pytest.raises(TypeError, match=message):
        call(model, checkpoint, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # refused before anything was done
    assert not hasattr(model, "hf_device_map")


def test_no_split_classes_that_match_no_module_say_so():
    model = empty_model(UntiedMLP)
    with pytest.warns(UserWarning, match=r"`no_split_module_classes` \['Blok'\] match\(es\) no module of UntiedMLP.*'Block'"):
        infer_device_map(model, {"cpu": 10**9}, no_split_module_classes=["Blok", "Block"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infer_device_map(model, {"cpu": 10**9}, no_split_module_classes=["Block"])  # all match: silent


# ---------------------------------------------------------------------- copies, pickling and requires_grad


def test_copying_or_saving_a_dispatched_model_is_refused_naming_remove_dispatch(tmp_path):
    import copy
    import io

    reference = make_reference(UntiedMLP)
    checkpoint = save_sharded_checkpoint(reference, tmp_path / "ckpt")
    model = empty_model(UntiedMLP)
    model.inp.bias.requires_grad_(False)  # the user's choice, kept through loading, dispatch and removal
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    load_checkpoint_and_dispatch(model, checkpoint, device_map=MAPS[UntiedMLP]["mixed"], offload_folder=tmp_path / "o")
    assert not any(p.requires_grad for p in model.parameters())  # inference only while dispatched
    for attempt in (
        lambda: copy.deepcopy(model),
        lambda: copy.deepcopy(model.blocks[1]),  # a module of it, with its hooks
        lambda: copy.copy(model),
        lambda: torch.save(model, io.BytesIO()),
    ):
        with pytest.raises(TypeError, match=r"Cannot copy or pickle a dispatched model.*remove_dispatch\(model\)"):
            attempt()
    remove_dispatch(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    copied = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    assert copied.inp.weight is not model.inp.weight
    for got, want in zip(outputs(copied, UntiedMLP), outputs(reference, UntiedMLP), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the rest of the process")
def test_copying_a_model_dispatched_on_simulated_gpus_with_prefetch_is_refused(tmp_path):
    import copy

    from lightning_bigmodel.simulate import simulated_gpus

    reference = make_reference(UntiedMLP)
    checkpoint = save_sharded_checkpoint(reference, tmp_path / "ckpt")
    device_map = {"inp": 0, "blocks.0": "cpu", "blocks.1": "cpu", "blocks.2": 1, "out": 1}
    with simulated_gpus(2):
        model = load_checkpoint_and_dispatch(empty_model(UntiedMLP), checkpoint, device_map=device_map)
        outputs(model, UntiedMLP)  # the prefetcher learns the order (its lock and thread now exist)
        with pytest.raises(TypeError, match="remove_dispatch"):
            copy.deepcopy(model)
        remove_dispatch(model)
        assert all(p.requires_grad for p in model.parameters())


def test_remove_dispatch_restores_requires_grad_after_forwards_under_inference_mode(tmp_path):
    checkpoint = save_sharded_checkpoint(make_reference(TiedLM), tmp_path / "ckpt")
    model = empty_model(TiedLM)
    load_checkpoint_and_dispatch(model, checkpoint, device_map=MAPS[TiedLM]["mixed"], offload_folder=tmp_path / "o")
    expected = outputs(model, TiedLM, calls=2)  # under inference_mode: tensors made now cannot require grad
    remove_dispatch(model)
    assert all(p.requires_grad for p in model.parameters())
    assert model.head.weight is model.wte.weight  # still tied
    loss = model(example_input(TiedLM)).sum()
    loss.backward()  # trainable again
    assert model.wte.weight.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(model(example_input(TiedLM)), expected[0], rtol=0, atol=0)
