"""Memory simulation on fake tensors: peaks per device checked against sizes computed by hand, KV cache, staging of
offloaded layers, the model left untouched, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import LinearLM
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.simulate import parse_input_shape, simulate_memory

B, T, D, V = 2, 8, 16, 1000  # batch, sequence, width, vocabulary
F32 = 4


class LM(LinearLM):
    """Embedding, four linear blocks, an LM head: every activation is a (B, T, D) or (B, T, V) float32 tensor."""

    def __init__(self, width: int = D, vocab: int = V) -> None:
        super().__init__(width, vocab, 4)


def _meta_lm(**kwargs) -> LM:
    with init_empty_weights():
        return LM(**kwargs)


def _ids(batch: int = B, seq: int = T) -> torch.Tensor:
    return torch.zeros(batch, seq, dtype=torch.long)


def test_peaks_match_hand_computed_activations_on_two_gpus():
    model = _meta_lm()
    result = simulate_memory(model, {"emb": 0, "blocks": 0, "head": 1}, _ids())
    head_weights = V * D * F32
    gpu0_weights = V * D * F32 + 4 * (D * D + D) * F32
    logits, hidden, ids = B * T * V * F32, B * T * D * F32, B * T * 8
    assert result[1] == {"weights": head_weights, "peak": head_weights + hidden + logits}  # input copied in, logits
    # GPU 0 peaks when the logits come back to the input's device (the batch is still there, the rest is freed).
    assert result[0] == {"weights": gpu0_weights, "peak": gpu0_weights + ids + logits}
    assert list(result) == [0, 1]


def test_offloaded_layers_are_staged_on_the_execution_gpu_with_the_next_one_prefetched():
    model = _meta_lm(width=64, vocab=8)
    block = (64 * 64 + 64) * F32
    device_map = {"emb": 0, "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": 0, "head": 0}
    result = simulate_memory(model, device_map, _ids())
    gpu0_weights = 8 * 64 * F32 + block + 64 * 8 * F32  # embedding, blocks.3, head
    hidden, ids = B * T * 64 * F32, B * T * 8
    assert result[0]["weights"] == gpu0_weights
    # While a block computes: its own copy, the next offloaded block's copy in flight, its input and its output.
    assert result[0]["peak"] == gpu0_weights + ids + 2 * block + 2 * hidden
    assert result["cpu"]["weights"] == 2 * block
    assert result["cpu"]["peak"] == 3 * block  # the disk block is read into (pinned) RAM on its way to the GPU
    assert result["disk"] == {"weights": block, "peak": block}


def test_disk_layers_on_a_cpu_execution_device_count_the_pages_read_and_read_ahead():
    model = _meta_lm(width=64, vocab=8)
    block = (64 * 64 + 64) * F32
    device_map = {"emb": "cpu", "blocks.0": "disk", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": "cpu", "head": "cpu"}
    result = simulate_memory(model, device_map, _ids())
    cpu_weights = 8 * 64 * F32 + 2 * block + 64 * 8 * F32
    hidden, ids = B * T * 64 * F32, B * T * 8
    assert result["disk"] == {"weights": 2 * block, "peak": 2 * block}
    # A disk block computing has its pages in RAM and the next one's read ahead (the last reads the first).
    assert result["cpu"] == {"weights": cpu_weights, "peak": cpu_weights + ids + 2 * block + 2 * hidden}


def test_cpu_only_map_counts_the_largest_activations():
    model = _meta_lm()
    result = simulate_memory(model, {"": "cpu"}, _ids())
    weights = 2 * V * D * F32 + 4 * (D * D + D) * F32
    # At the head: the batch, its input and the logits (the block outputs before it are freed).
    assert result == {"cpu": {"weights": weights, "peak": weights + B * T * 8 + B * T * D * F32 + B * T * V * F32}}


def test_dtype_counts_weights_in_that_dtype_and_the_model_is_left_untouched():
    model = _meta_lm()
    before = {name: (p, p.device, p.dtype) for name, p in model.named_parameters()}
    result = simulate_memory(model, {"": 0}, _ids(), dtype=torch.bfloat16)
    assert result[0]["weights"] == (2 * V * D + 4 * (D * D + D)) * 2
    assert {name: (p, p.device, p.dtype) for name, p in model.named_parameters()} == before
    assert not model._forward_pre_hooks and not model.blocks[0]._forward_pre_hooks


def test_decode_without_cache_reruns_the_grown_sequence():
    model = _meta_lm()
    grown = simulate_memory(model, {"": 0}, _ids(), max_new_tokens=5)
    weights = grown[0]["weights"]
    # The last step: the prompt (still held by the caller), the grown ids, the head's input and the logits.
    assert grown[0]["peak"] == weights + B * T * 8 + B * (T + 5) * (8 + D * F32 + V * F32)


def _tiny_llama(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=50, max_position_embeddings=512,
    )  # fmt: skip
    with init_empty_weights():
        return transformers.LlamaForCausalLM(config)


def test_kv_cache_of_generate_is_counted_on_the_device_of_each_layer():
    model = _tiny_llama()
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1,
                  "model.layers.3": 1, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}  # fmt: skip
    prompt, new = 1, 300  # a short prompt and a long decode: the cache dominates the peak
    result = simulate_memory(model, device_map, _ids(B, prompt), max_new_tokens=new)
    head_dim, kv_heads = 32 // 4, 2
    kv_per_layer = 2 * B * kv_heads * (prompt + new - 1) * head_dim * F32  # keys and values before the last step
    grown_k = B * kv_heads * (prompt + new) * head_dim * F32  # the last step's cat: old and new keys both live
    token_ids = B * prompt * 8 + B * (prompt + new) * 8  # the prompt and generate's grown ids, on the input's GPU
    for gpu, held in ((0, token_ids), (1, 0)):
        extra = result[gpu]["peak"] - result[gpu]["weights"] - held
        assert 2 * kv_per_layer <= extra <= 2 * kv_per_layer + grown_k + 2048, (gpu, extra)  # + one token's activations


def test_transformers_forward_without_decode_runs_on_fake_gpus():
    model = _tiny_llama(layers=2)
    result = simulate_memory(model, {"": 0}, _ids(4, 16))
    logits = 4 * 16 * 50 * F32
    assert result[0]["peak"] - result[0]["weights"] >= logits


class ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else x


class MixesDevices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) @ self.b.weight  # reaches into another module's weight: no hook moves it


def test_forward_mixing_devices_raises_like_cuda():
    with init_empty_weights():
        model = MixesDevices()
    with pytest.raises(RuntimeError, match="same device"):
        simulate_memory(model, {"a": 0, "b": 1}, torch.zeros(2, 4))
    assert model.a.weight.is_meta


def test_mixed_devices_are_reported_in_cudas_words_on_every_torch(monkeypatch):
    """torch 2.11's fake tensors word it "Unhandled FakeTensor Device Propagation ... found two different devices"."""
    import lightning_bigmodel.simulate._fake_ops as fake_ops
    from torch._subclasses.fake_tensor import FakeTensor

    real = FakeTensor._find_common_device

    def worded_as_in_torch_2_11(func, flat_args):
        try:
            return real(func, flat_args)
        except RuntimeError as err:
            if "same device" not in str(err):
                raise
            devices = ", ".join(sorted({str(a.device) for a in flat_args if isinstance(a, torch.Tensor)}))
            raise RuntimeError(
                f"Unhandled FakeTensor Device Propagation for {func}, found two different devices {devices}"
            ) from None

    monkeypatch.setattr(FakeTensor, "_find_common_device", staticmethod(worded_as_in_torch_2_11))
    with init_empty_weights():
        model = MixesDevices()
    with pytest.raises(RuntimeError, match=r"^Expected all tensors to be on the same device, but found at least two "
                       r"devices, cuda:0 and cuda:1! \(aten.mm.default\)$"):  # fmt: skip
        simulate_memory(model, {"a": 0, "b": 1}, torch.zeros(2, 4))
    assert fake_ops._mixed_devices_error(RuntimeError("other")).args == ("other",)


def test_guarded_bindings_never_see_a_fake_gpu_tensor(monkeypatch):
    """On a CUDA build, indexing (and ``~``, ``contiguous``, ``copy_``...) of a fake ``cuda:k`` tensor would take a
    real device guard: ``cudaSetDevice(k)``, a context on GPU k or "invalid device ordinal". Here (a CPU build) such a
    call raises instead; with no error recognised as "no device", any such call fails the simulation."""
    import lightning_bigmodel.simulate._fake_ops as fake_ops
    from examples.gpt import GPT, GPTConfig

    monkeypatch.setattr(fake_ops, "_NO_DEVICE", ())
    config = GPTConfig.preset("tiny")
    with init_empty_weights():
        model = GPT(config)
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
                  "transformer.h.2": 5, "transformer.h.3": 5, "transformer.ln_f": 5, "lm_head": 0}  # fmt: skip
    result = simulate_memory(model, device_map, _ids(B, T), max_new_tokens=2)
    assert set(result) == {0, 5, "cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_simulation_creates_no_cuda_context(tmp_path):
    """Planning has no side effects: a simulation over GPUs this machine has, and beyond, leaves every GPU without a
    context (asked from the driver, in a fresh process)."""
    from cuda_contexts import run_and_list_contexts

    body = """
    import torch
    from examples.gpt import GPT, GPTConfig
    from lightning_bigmodel.init import init_empty_weights
    from lightning_bigmodel.simulate import simulate_memory

    far = torch.cuda.device_count() + 2
    with init_empty_weights():
        model = GPT(GPTConfig.preset("tiny"))
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
                  "transformer.h.2": far, "transformer.h.3": far, "transformer.ln_f": far, "lm_head": 0}
    result = sorted(map(str, simulate_memory(model, device_map, torch.zeros(2, 8, dtype=torch.long), max_new_tokens=2)))
    """
    out = run_and_list_contexts(body, tmp_path)
    assert out["contexts"] == [] and len(out["result"]) == 3, out


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": -1}, r"`max_new_tokens=-1`"),
        ({"example_inputs": "4x8"}, r"`example_inputs` holds no tensor"),
        ({"device_map": {"emb": 0}}, r"unassigned"),
        ({"device_map": {"": 0, "nope": 1}}, r"name no module"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = {"model": _meta_lm(), "device_map": {"": 0}, "example_inputs": _ids(), **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_memory(**args)


def test_value_reading_forward_and_dispatched_model_are_refused():
    with init_empty_weights():
        model = ReadsValues()
    with pytest.raises(RuntimeError, match="reads tensor values"):
        simulate_memory(model, {"": 0}, torch.zeros(2, 4))
    from lightning_bigmodel import dispatch_model

    real = ReadsValues()
    dispatch_model(real, {"": "cpu"})
    with pytest.raises(ValueError, match="dispatched"):
        simulate_memory(real, {"": 0}, torch.zeros(2, 4))


@pytest.mark.parametrize(("text", "shape"), [("4x2048", (4, 2048)), ("1X4096", (1, 4096)), (" 8 x 2 ", (8, 2)), ("3", (3,))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["4y2048", "", "x", "4x0", "-4x2", "4.5x2", "4x"])
def test_input_shape_that_does_not_parse_is_named(text):
    with pytest.raises(ValueError, match=rf"`input_shape={text!r}` does not parse.*e.g. '4x2048'"):
        parse_input_shape(text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_cuda_machine_gpus_beyond_the_visible_ones_are_simulated_without_touching_them():
    """Planning is pure: a map over more GPUs than this machine has is simulated all the same (fake tensors)."""
    model = _meta_lm()
    far = torch.cuda.device_count() + 3
    allocated = torch.cuda.memory_allocated(0)
    result = simulate_memory(model, {"emb": 0, "blocks": 0, "head": far}, _ids())
    assert result[far]["peak"] == V * D * F32 + B * T * D * F32 + B * T * V * F32
    assert torch.cuda.memory_allocated(0) == allocated


def test_gpt_example_with_a_sliced_mask_buffer_runs_over_two_gpus_and_cpu():
    """Indexing, ``~`` and friends on fake GPU tensors (their Python bindings need a device guard a CPU build lacks)."""
    from examples.gpt import GPT, GPTConfig

    config = GPTConfig.preset("tiny")
    with init_empty_weights():
        model = GPT(config)
    device_map = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
                  "transformer.h.2": 1, "transformer.h.3": 1, "transformer.ln_f": 1, "lm_head": 0}  # fmt: skip
    result = simulate_memory(model, device_map, _ids(B, T), max_new_tokens=3)
    logits = B * (T + 3) * config.vocab_size * F32  # the last decode step's logits, on the head's GPU
    assert result[0]["peak"] >= result[0]["weights"] + logits
    assert set(result) == {0, 1, "cpu"}


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the simulation registers a PrivateUse1 backend, which shadows CUDA for the rest of the process"
)
def test_same_peaks_inside_simulated_gpus():
    from lightning_bigmodel.simulate import simulated_gpus

    model = _meta_lm()
    device_map = {"emb": 0, "blocks": 0, "head": 1}
    outside = simulate_memory(model, device_map, _ids())
    with simulated_gpus(2):
        inside = simulate_memory(model, device_map, _ids())
    assert inside == outside and outside[1]["peak"] == V * D * F32 + B * T * D * F32 + B * T * V * F32
