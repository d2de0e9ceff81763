"""Loading Hub-layout transformers checkpoints through transformers' conversion rules: costs, reporting, bad input.

The zoo (``test_hub_zoo.py``) checks outputs family by family; this file checks how: renamed tensors stay zero-copy
file views, a merge reads only its own sources and is not copied again, dtype casts, strict reporting, restore on
failure, the strategy's prefix detection, and the errors for checkpoints that do not fit or are inconsistent.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, load_checkpoint_in_model
from lightning_bigmodel.checkpoint.reader import CheckpointReader
from lightning_bigmodel.integrations import transformers as hub
from lightning_bigmodel.integrations.transformers import rules
from tests.hub_zoo import outputs_of, save_hub_model

pytest.importorskip("transformers", minversion="5.0")

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_hub_model("mixtral", tmp_path_factory.mktemp("hub") / "mixtral")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return save_hub_model("vit", tmp_path_factory.mktemp("hub") / "vit")


def meta_model(saved, cls=None, config=None):
    with init_empty_weights():
        model = (cls or saved.cls)(config or saved.config)
    return model.eval()


def all_meta(model) -> bool:
    return all(p.is_meta for p in model.parameters())


def single_file(saved, folder, edit) -> str:
    """``saved``'s checkpoint as one safetensors file in ``folder`` after ``edit(state_dict)``."""
    state = {}
    for file in sorted(saved.folder.glob("*.safetensors")):
        state.update(load_file(file))
    edit(state)
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return folder


def test_detection_does_not_import_transformers(mixtral):
    from torch import nn

    assert hub.is_transformers_model(mixtral.reference)
    assert not hub.is_transformers_model(nn.Linear(2, 2))
    wrapper = nn.Module()
    wrapper.net = mixtral.reference
    assert hub.hub_networks(wrapper) == [("net", mixtral.reference)]
    assert hub.network_at(wrapper, "net.") is mixtral.reference and hub.network_at(wrapper, "") is None


def test_renamed_tensors_stay_zero_copy_file_views(vit, monkeypatch):
    mapped = []
    original = CheckpointReader.mmap_view
    monkeypatch.setattr(CheckpointReader, "mmap_view", lambda self, key: mapped.append(key) or original(self, key))
    model = meta_model(vit)
    missing, unexpected = load_checkpoint_in_model(model, vit.folder)
    assert missing == [] and unexpected == []
    renamed = "encoder.layer.0.attention.attention.query.weight"  # the model calls it layers.0.attention.q_proj
    assert renamed in mapped and len(mapped) == len(list(model.state_dict()))  # every tensor mapped in place
    inputs = vit.inputs()
    torch.testing.assert_close(outputs_of(model(**inputs)), outputs_of(vit.reference(**inputs)), rtol=0, atol=0)


def test_merge_reads_only_its_sources_and_is_installed_without_a_copy(mixtral, monkeypatch):
    events, made = [], {}
    original_convert = rules.convert_unit

    def spy(network, unit, load, fast=True):
        sources = {key for _, key in unit.sources}

        def checked_load(key):
            events.append((unit.layer, key in sources))
            return load(key)

        out = original_convert(network, unit, checked_load, fast)
        if fast:
            made.update({name: tensor.data_ptr() for name, tensor in out.items()})
        return out

    monkeypatch.setattr("lightning_bigmodel.integrations.transformers.source.convert_unit", spy)
    model = meta_model(mixtral)
    load_checkpoint_in_model(model, mixtral.folder)
    assert events and all(own for _, own in events)
    assert model.get_parameter(GATE_UP).data_ptr() == made[GATE_UP]  # the converted tensor itself, not a copy


def test_fast_merge_equals_transformers_operations(mixtral):
    with CheckpointReader(mixtral.folder) as reader:
        model = meta_model(mixtral)
        plan = rules.plan_conversion(model, {key: reader.spec(key) for key in reader.keys()})
        assert len(plan.units) == 4  # gate_up and down for each of 2 layers
        for unit in plan.units:
            assert rules._is_merge(unit)
            fast = rules.convert_unit(model, unit, reader.read, fast=True)
            slow = rules.convert_unit(model, unit, reader.read, fast=False)
            assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)


@pytest.mark.parametrize("where", ["cpu", "cpu+disk"])
def test_dtype_cast_matches_from_pretrained(mixtral, where, tmp_path):
    reference = mixtral.cls.from_pretrained(mixtral.folder, dtype=torch.bfloat16).eval()
    model = meta_model(mixtral)
    device_map = {"": "cpu"} if where == "cpu" else {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                     "model.layers.1": "disk", "model.norm": "cpu",
                                                     "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    load_checkpoint_and_dispatch(model, mixtral.folder, device_map=device_map, dtype=torch.bfloat16,
                                 offload_folder=tmp_path)  # fmt: skip
    assert model.get_parameter(GATE_UP).dtype == torch.bfloat16
    inputs = mixtral.inputs()
    torch.testing.assert_close(outputs_of(model(**inputs)), outputs_of(reference(**inputs)), rtol=0, atol=0)


def test_converted_disk_tensors_need_an_offload_folder(mixtral):
    model = meta_model(mixtral)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    with pytest.raises(ValueError, match="conversion rules build them"):
        load_checkpoint_in_model(model, mixtral.folder, device_map=device_map)
    assert all_meta(model)


def test_unexpected_keys_keep_checkpoint_names_and_strict_raises(mixtral, tmp_path):
    extra = "model.layers.0.block_sparse_moe.experts.0.w9.weight"
    folder = single_file(mixtral, tmp_path / "extra", lambda state: state.update({extra: torch.ones(2)}))
    missing, unexpected = load_checkpoint_in_model(meta_model(mixtral), folder)
    assert missing == [] and unexpected == [extra]
    model = meta_model(mixtral)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_checkpoint_in_model(model, folder, strict=True)
    assert all_meta(model)


def test_missing_converted_tensor_is_reported(mixtral, tmp_path):
    def drop(state):
        for key in [k for k in state if ".layers.1.block_sparse_moe.experts." in k and k.endswith("w2.weight")]:
            del state[key]

    folder = single_file(mixtral, tmp_path / "drop", drop)
    model = meta_model(mixtral)
    missing, unexpected = load_checkpoint_in_model(model, folder)
    assert missing == ["model.layers.1.mlp.experts.down_proj"] and unexpected == []
    assert model.get_parameter("model.layers.1.mlp.experts.down_proj").is_meta


def test_checkpoint_of_another_class_fails_before_loading(mixtral):
    import transformers

    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=64)  # fmt: skip
    model = meta_model(mixtral, transformers.Qwen3MoeForCausalLM, config)
    with pytest.raises(ValueError) as info:
        load_checkpoint_and_dispatch(model, mixtral.folder, device_map={"": "cpu"})
    message = str(info.value)
    assert "Qwen3MoeForCausalLM" in message and "class or revision" in message
    assert "model.layers.0.mlp.experts.gate_up_proj" in message  # a missing model name
    assert "block_sparse_moe.experts.0.w1.weight" in message  # an unexpected checkpoint name
    assert all_meta(model)


@pytest.mark.parametrize("problem", ["shape", "dtype"])
def test_merge_sources_that_disagree_are_named(mixtral, tmp_path, problem):
    key = "model.layers.0.block_sparse_moe.experts.2.w3.weight"

    def edit(state):
        state[key] = state[key][:-1] if problem == "shape" else state[key].half()

    folder = single_file(mixtral, tmp_path / problem, edit)
    model = meta_model(mixtral)
    with pytest.raises(ValueError) as info:
        load_checkpoint_in_model(model, folder)
    message = str(info.value)
    assert f"`{GATE_UP}`" in message and key in message and problem in message
    assert all_meta(model)


def test_failure_during_conversion_restores_the_model(mixtral, monkeypatch):
    calls = []
    original = rules.convert_unit

    def failing(network, unit, load, fast=True):
        calls.append(unit.layer)
        if len(calls) == 3:
            raise OSError("disk read failed")
        return original(network, unit, load, fast)

    monkeypatch.setattr("lightning_bigmodel.integrations.transformers.source.convert_unit", failing)
    model = meta_model(mixtral)
    with pytest.raises(OSError, match="disk read failed"):
        load_checkpoint_and_dispatch(model, mixtral.folder, device_map={"": "cpu"})
    assert all_meta(model)


def test_without_transformers_rules_a_model_needing_them_names_the_extra(mixtral, tmp_path, monkeypatch):
    llama = save_hub_model("llama", tmp_path / "llama")
    for name in ("transformers.conversion_mapping", "transformers.core_model_loading"):
        monkeypatch.setitem(sys.modules, name, None)  # `from ... import` now raises ImportError
    model = meta_model(llama)
    assert load_checkpoint_in_model(model, llama.folder) == ([], [])  # its names fit as they are
    model = meta_model(mixtral)
    with pytest.raises(ImportError, match=r'pip install "lightning-bigmodel\[transformers\]"'):
        load_checkpoint_in_model(model, mixtral.folder)
    assert all_meta(model)


def test_converted_prefix_of_a_wrapped_network(mixtral, vit):
    from torch import nn

    wrapper = nn.Module()
    wrapper.net = meta_model(mixtral)
    with CheckpointReader(mixtral.folder) as reader:
        keys = reader.keys()
    assert hub.infer_converted_prefix(wrapper, keys) == "net."
    wrapper.other = meta_model(vit)
    assert hub.infer_converted_prefix(wrapper, keys) == "net."  # the ViT takes none of them
    assert hub.infer_converted_prefix(nn.Linear(2, 2), keys) is None


def test_quantization_applies_to_converted_checkpoints(mixtral, tmp_path):
    pytest.importorskip("torchao")
    model = meta_model(mixtral)
    load_checkpoint_and_dispatch(model, mixtral.folder, device_map={"": "cpu", "model.layers.1": "disk"},
                                 offload_folder=tmp_path, quantization="int8")  # fmt: skip
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"  # a renamed Linear weight
    assert model.get_parameter(GATE_UP).dtype == torch.float32  # fused experts are no nn.Linear: kept as they are
    inputs = mixtral.inputs()
    with torch.no_grad():
        expected, actual = outputs_of(mixtral.reference(**inputs)), outputs_of(model(**inputs))
    assert ((actual - expected).norm() / expected.norm()).item() < 0.02


@pytest.mark.parametrize("first", ["lightning_bigmodel.integrations.transformers",
                                   "lightning_bigmodel.integrations.transformers.source"])  # fmt: skip
def test_integration_imports_first_without_transformers(first):
    import subprocess

    code = (f"import sys, {first}, lightning_bigmodel.checkpoint.loading\n"
            "assert 'transformers' not in sys.modules, 'transformers imported'")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pickle_shards_are_converted_too(mixtral, tmp_path):
    from lightning_bigmodel import save_sharded_checkpoint

    state = {}
    for file in sorted(mixtral.folder.glob("*.safetensors")):
        state.update(load_file(file))
    save_sharded_checkpoint(state, tmp_path / "bin", max_shard_size=20_000, safe_serialization=False)
    model = meta_model(mixtral)
    load_checkpoint_and_dispatch(model, tmp_path / "bin", device_map={"": "cpu", "model.layers.1": "disk"},
                                 offload_folder=tmp_path / "off")  # fmt: skip
    inputs = mixtral.inputs()
    torch.testing.assert_close(outputs_of(model(**inputs)), outputs_of(mixtral.reference(**inputs)), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPUs shadow CUDA for the rest of the process")
def test_converted_tensors_on_simulated_gpus(mixtral, tmp_path):
    from lightning_bigmodel.simulate import simulated_gpus

    # transformers' default ("grouped_mm") experts call int `histc` on a GPU, which the CPU kernels behind the
    # simulation lack: both sides use the eager experts
    reference = mixtral.cls.from_pretrained(mixtral.folder, experts_implementation="eager").eval()
    inputs = mixtral.inputs()
    with torch.no_grad():
        expected = outputs_of(reference(**inputs))
    tokens = reference.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with simulated_gpus(2) as gpus:
        model = meta_model(mixtral, config=reference.config)
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                      "model.norm": 1, "lm_head": "disk"}  # fmt: skip
        load_checkpoint_and_dispatch(model, mixtral.folder, device_map=device_map, offload_folder=tmp_path)
        assert model.get_parameter(GATE_UP).device == gpus.devices[0]
        assert model.get_parameter("model.layers.1.mlp.experts.down_proj").device == gpus.devices[1]
        with torch.no_grad():
            actual = outputs_of(model(**inputs)).cpu()
        generated = model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0).cpu()
    torch.testing.assert_close(actual, expected)  # float32 rounding: attention picks other kernels for a GPU
    assert torch.equal(generated, tokens)


def test_planning_sizes_the_fused_experts_as_their_checkpoint_tensors(mixtral):
    from lightning_bigmodel.planning.sizes import compute_module_sizes

    sizes = compute_module_sizes(meta_model(mixtral))
    with CheckpointReader(mixtral.folder) as reader:
        for layer in (0, 1):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts."
            expert_bytes = sum(reader.spec(k).nbytes for k in reader.keys() if k.startswith(prefix))
            assert sizes[f"model.layers.{layer}.mlp.experts"] == expert_bytes > 0
