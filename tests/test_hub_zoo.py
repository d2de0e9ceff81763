"""Model zoo: tiny Hub-layout checkpoints of each transformers family load on meta and match transformers' own loading.

Every model is saved with ``save_pretrained`` in shards (the Hub layout: renamed keys, per-expert MoE weights), built
on meta with ``init_empty_weights``, loaded with ``load_checkpoint_and_dispatch`` on a cpu-only map and on a cpu+disk
map, and compared with ``from_pretrained`` of the same folder: forward outputs, and ``generate`` for causal and
seq2seq models. Bit-for-bit equality is expected (same weights, same CPU kernels).
"""

from __future__ import annotations

import pytest
import torch

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from tests.hub_zoo import GENERATE, MOE, ZOO, HubModel, outputs_of, save_hub_model

pytest.importorskip("transformers", minversion="5.0")

MAPS = ("cpu", "cpu+disk")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, HubModel]:
    """Each zoo model, saved once for the module (lazily: a ``-k`` selection builds only what it uses)."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[str, HubModel] = {}

    class Zoo(dict):
        def __missing__(self, name: str) -> HubModel:
            cache[name] = save_hub_model(name, root / name)
            self[name] = cache[name]
            return cache[name]

    return Zoo()


def disk_map(model: torch.nn.Module) -> dict[str, str]:
    """A cpu+disk map: the second half of the model's no-split blocks (decoder layers, experts included) on disk."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(f"{outer}.") for outer in blocks):
            blocks.append(name)
    return {"": "cpu", **{name: "disk" for name in blocks[len(blocks) // 2 :]}}


def load_on_meta(hub: HubModel, where: str, offload_folder) -> torch.nn.Module:
    """``hub``'s class built on meta and loaded by ``load_checkpoint_and_dispatch`` on the ``where`` map."""
    with init_empty_weights():
        model = hub.cls(hub.config)
    model.eval()
    device_map = {"": "cpu"} if where == "cpu" else disk_map(model)
    return load_checkpoint_and_dispatch(model, hub.folder, device_map=device_map, offload_folder=offload_folder)


@pytest.mark.parametrize("where", MAPS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_forward_and_generate_match_from_pretrained(saved, name, where, tmp_path):
    hub = saved[name]
    model = load_on_meta(hub, where, tmp_path / "offload")
    devices = set(model.hf_device_map.values())
    assert devices == ({"cpu"} if where == "cpu" else {"cpu", "disk"}), model.hf_device_map
    head = hub.reference.get_output_embeddings()
    if head is not None and head.weight is hub.reference.get_input_embeddings().weight:  # tied (GPT-2, Qwen2, T5...)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected, tokens = hub.expected()
    with torch.no_grad():
        actual = outputs_of(model(**hub.inputs()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    if tokens is not None:
        assert torch.equal(model.generate(**hub.prompt(), **GENERATE), tokens)


@pytest.mark.parametrize("name", MOE)
def test_moe_experts_planned_for_disk_are_written_once_and_reused(saved, name, tmp_path, monkeypatch):
    from lightning_bigmodel.offload.disk import MANIFEST, OffloadFolder

    hub = saved[name]
    folder = tmp_path / "offload"
    load_on_meta(hub, "cpu+disk", folder)
    manifest = (folder / MANIFEST).read_text()  # fused expert tensors have no bytes in the checkpoint
    assert "experts.gate_up_proj" in manifest and "experts.down_proj" in manifest, manifest
    # a second run reuses every converted file: nothing is written
    writes = []
    original = OffloadFolder.write
    monkeypatch.setattr(OffloadFolder, "write", lambda self, *a, **k: writes.append(a[0]) or original(self, *a, **k))
    model = load_on_meta(hub, "cpu+disk", folder)
    assert writes == []
    with torch.no_grad():
        torch.testing.assert_close(outputs_of(model(**hub.inputs())), hub.expected()[0], rtol=0, atol=0)


def test_mixtral_through_trainer_predict(saved, tmp_path):
    """End to end: a LightningModule holding Mixtral as ``self.model`` (built on meta by the strategy), the Hub
    checkpoint as ``ckpt_path`` (its keys carry no ``model.`` prefix and need the expert merges), cpu+disk map."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bigmodel import BigModelInferenceStrategy
    from tests.lightning_models import bigmodel_trainer

    hub = saved["mixtral"]

    class Generate(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = hub.cls(hub.config)

        def predict_step(self, batch, batch_idx):
            return self.model.generate(batch[0], **GENERATE)

    device_map = {"model": "cpu", "model.model.layers.1": "disk"}  # the LightningModule's names
    strategy = BigModelInferenceStrategy(device_map=device_map, offload_folder=tmp_path / "off")
    prompts = hub.inputs()["input_ids"]
    module = Generate()
    trainer = bigmodel_trainer(strategy, default_root_dir=tmp_path)
    batches = trainer.predict(module, DataLoader(TensorDataset(prompts), batch_size=1), ckpt_path=str(hub.folder))
    assert module.model.hf_device_map == {"": "cpu", "model.layers.1": "disk"}
    assert torch.equal(torch.cat(batches), hub.expected()[1])
