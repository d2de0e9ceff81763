"""Round trips through save_sharded_checkpoint / resolve_checkpoint / CheckpointReader, compared with plain loads."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_bigmodel.checkpoint.reader import CheckpointReader, TensorSpec
from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from tests.conftest import CHECKPOINT_KINDS, make_state_dict


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_round_trip_every_layout(kind, write_checkpoint, tiny_state_dict):
    path = write_checkpoint(kind)
    with CheckpointReader(path) as reader:
        assert_same(dict(reader.iter_tensors()), tiny_state_dict)
        assert_same({k: reader.read(k) for k in reader.keys()}, tiny_state_dict)
        for key, tensor in tiny_state_dict.items():
            spec = reader.spec(key)
            assert isinstance(spec, TensorSpec)
            assert (spec.shape, spec.dtype) == (tensor.shape, tensor.dtype)
            assert spec.file.is_file() and spec.file in reader.files
            assert spec.is_safetensors == spec.file.name.endswith(".safetensors")
            assert spec.nbytes == tensor.nbytes


@pytest.mark.parametrize("kind", ["sharded_safetensors_index", "sharded_bin", "plain_index"])
def test_index_resolves_to_every_shard_in_order(kind, write_checkpoint):
    index = write_checkpoint(kind)
    resolved = resolve_checkpoint(index)
    on_disk = sorted(p for p in index.parent.iterdir() if not p.name.endswith(".json"))
    assert list(resolved.files) == on_disk and len(on_disk) > 1
    assert resolved.index == index and resolved.root == index.parent
    data = json.loads(index.read_text())
    weight_map = data.get("weight_map", data)
    assert {k: p.name for k, p in resolved.weight_map.items()} == weight_map
    with CheckpointReader(resolved) as reader:  # keys grouped by file, files in shard order
        files = [reader.spec(k).file for k in reader.keys()]
        assert files == sorted(files, key=lambda p: p.name)


def test_hf_index_content_matches_transformers_layout(tmp_path, tiny_state_dict):
    index = save_sharded_checkpoint(tiny_state_dict, tmp_path, max_shard_size=200)
    data = json.loads(index.read_text())
    assert index.name == "model.safetensors.index.json"
    assert data["metadata"]["total_size"] == sum(t.nbytes for t in tiny_state_dict.values())
    n = len(set(data["weight_map"].values()))
    assert set(data["weight_map"].values()) == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    for name in set(data["weight_map"].values()):  # each shard is a valid safetensors file with "pt" metadata
        loaded = load_file(tmp_path / name)
        assert all(data["weight_map"][k] == name for k in loaded)


def test_single_shard_names_and_return_values(tmp_path, tiny_state_dict):
    path = save_sharded_checkpoint(tiny_state_dict, tmp_path / "a")
    assert path == tmp_path / "a" / "model.safetensors" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    path = save_sharded_checkpoint(tiny_state_dict, tmp_path / "b", safe_serialization=False)
    assert path.name == "pytorch_model.bin"
    assert_same(torch.load(path, weights_only=True), tiny_state_dict)
    path = save_sharded_checkpoint(tiny_state_dict, tmp_path / "c", index_format="plain")
    assert path.name == "index.json"
    assert set(json.loads(path.read_text()).values()) == {"model.safetensors"}


def test_resave_removes_stale_shards_and_index(tmp_path, tiny_state_dict):
    save_sharded_checkpoint(tiny_state_dict, tmp_path, max_shard_size=200)
    (tmp_path / "config.json").write_text("{}")
    path = save_sharded_checkpoint(tiny_state_dict, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert resolve_checkpoint(tmp_path).files == (path,)


def test_tied_weights_saved_once_under_first_name(tmp_path, tiny_gpt):
    assert tiny_gpt.lm_head.weight is tiny_gpt.transformer.wte.weight
    path = save_sharded_checkpoint(tiny_gpt, tmp_path, max_shard_size=10_000)
    expected = {k: v for k, v in tiny_gpt.state_dict().items() if k != "lm_head.weight"}
    with CheckpointReader(path) as reader:
        assert_same(dict(reader.iter_tensors()), expected)


def test_views_of_one_storage_are_saved_separately(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base[:4], "b": base[4:].view(2, 4), "t": base.view(3, 4).t()}
    for safe in (True, False):
        path = save_sharded_checkpoint(state, tmp_path / str(safe), safe_serialization=safe)
        with CheckpointReader(path) as reader:
            assert_same(dict(reader.iter_tensors()), state)
            if not safe:  # each tensor owns exactly its bytes, not the whole shared storage
                assert all(t.untyped_storage().nbytes() == t.nbytes for t in torch.load(path, weights_only=True).values())


def test_meta_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"meta.*'w'"):
        save_sharded_checkpoint({"w": torch.empty(2, device="meta"), "b": torch.ones(2)}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    import lightning_bigmodel.checkpoint.writer as writer

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        writer.save_sharded_checkpoint({"w": torch.ones(3)}, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mmap_view_is_zero_copy_and_equal(write_checkpoint, tiny_state_dict):
    path = write_checkpoint("sharded_safetensors")
    reader = CheckpointReader(path)
    views = {k: reader.mmap_view(k) for k in reader.keys()}
    assert_same(views, tiny_state_dict)
    for key, view in views.items():
        if view.numel() == 0:
            continue
        spec = reader.spec(key)
        mapping = reader._maps[spec.file]
        start = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
        assert start <= view.data_ptr() < start + len(mapping), key
    reader.close()
    # the views outlive the reader and its maps, and writes to them never reach the file
    views["linear.weight"].add_(1)
    assert torch.equal(views["linear.weight"], tiny_state_dict["linear.weight"] + 1)
    assert torch.equal(CheckpointReader(path).read("linear.weight"), tiny_state_dict["linear.weight"])


def test_view_keeps_mapping_alive_after_reader_is_gone(write_checkpoint, tiny_state_dict):
    import gc

    reader = CheckpointReader(write_checkpoint("safetensors"))
    view = reader.mmap_view("emb.weight")
    del reader
    gc.collect()
    assert torch.equal(view.clone(), tiny_state_dict["emb.weight"])


def test_read_returns_fresh_memory(write_checkpoint, tiny_state_dict):
    for kind in ("safetensors", "bin"):
        with CheckpointReader(write_checkpoint(kind)) as reader:
            tensor = reader.read("linear.weight")
            assert tensor.untyped_storage().nbytes() == tensor.nbytes
            tensor.zero_()
            assert torch.equal(reader.read("linear.weight"), tiny_state_dict["linear.weight"])


def test_mmap_view_on_pickle_shard_says_use_read(write_checkpoint):
    with CheckpointReader(write_checkpoint("bin")) as reader:
        with pytest.raises(ValueError, match=r"'linear.weight'.*pytorch_model.bin.*read\(\)"):
            reader.mmap_view("linear.weight")


def test_iter_tensors_subset_and_unknown_key(write_checkpoint, tiny_state_dict):
    with CheckpointReader(write_checkpoint("sharded_bin")) as reader:
        got = dict(reader.iter_tensors(["mask", "linear.bias"]))
        assert_same(got, {k: tiny_state_dict[k] for k in ("mask", "linear.bias")})
        with pytest.raises(KeyError, match="'nope'"):
            list(reader.iter_tensors(["linear.bias", "nope"]))


def test_pickle_reader_maps_one_shard_at_a_time(write_checkpoint):
    with CheckpointReader(write_checkpoint("sharded_bin")) as reader:
        seen = set()
        for key, _ in reader.iter_tensors():
            seen.add(reader._pickle[0])
            assert reader._pickle[0] == reader.spec(key).file
        assert len(seen) == len(reader.files) > 1


def test_metadata(write_checkpoint):
    with CheckpointReader(write_checkpoint("safetensors")) as reader:
        assert reader.metadata == {"format": "pt"}
    with CheckpointReader(write_checkpoint("sharded_safetensors_index")) as reader:
        assert reader.metadata["total_size"] == sum(t.nbytes for t in make_state_dict().values())


def test_folder_preferences(tmp_path, tiny_state_dict):
    save_file(tiny_state_dict, str(tmp_path / "model.safetensors"))
    torch.save({"other": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert resolve_checkpoint(tmp_path).files == (tmp_path / "model.safetensors",)
    only = tmp_path / "x"
    only.mkdir()
    torch.save(tiny_state_dict, only / "weights.pt")
    (only / "notes.txt").write_text("hi")
    assert resolve_checkpoint(only).files == (only / "weights.pt",)
    assert resolve_checkpoint(str(only)).weight_map is None


def test_lightning_trainer_checkpoint(tmp_path):
    """A real ``Trainer.save_checkpoint`` file loads with weights_only=True and yields its ``state_dict``."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, hidden: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, hidden)

    model = Tiny()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with CheckpointReader(tmp_path / "last.ckpt") as reader:
        assert_same(dict(reader.iter_tensors()), model.state_dict())


def _fake_hub(monkeypatch, repo: Path, snapshots: Path) -> list:
    """``snapshot_download`` over a local "repo" folder: like the real one, it fetches only the files matching
    ``allow_patterns`` into a fresh snapshot folder (so a pattern set that matches no weights yields none)."""
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, list(allow_patterns)))
        snapshot = snapshots / str(len(calls))
        snapshot.mkdir(parents=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    return calls


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hub_id_from_snapshot_download(tmp_path, monkeypatch, tiny_state_dict, kind):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "README.md").write_text("not a weight")
    if kind == "safetensors":
        save_file(tiny_state_dict, str(repo / "model.safetensors"))
    else:  # a repo with pickled shards only: the safetensors patterns fetch config.json alone, then the .bin ones
        save_sharded_checkpoint(tiny_state_dict, repo, max_shard_size=200, safe_serialization=False)
    calls = _fake_hub(monkeypatch, repo, tmp_path / "snapshots")
    with CheckpointReader("some-org/tiny-model") as reader:
        assert_same(dict(reader.iter_tensors()), tiny_state_dict)
        files = {path.name for path in reader.checkpoint.files}
    assert [repo_id for repo_id, _ in calls] == ["some-org/tiny-model"] * (1 if kind == "safetensors" else 2)
    assert "*.safetensors" in calls[0][1] and (kind == "safetensors" or "*.bin" in calls[1][1])
    assert files == ({"model.safetensors"} if kind == "safetensors" else {p.name for p in repo.glob("*.bin")})
    assert kind == "safetensors" or len(files) > 1


def test_hub_id_from_local_cache_offline(tmp_path, monkeypatch, tiny_state_dict):
    """A repo in the Hub cache layout (snapshot files are symlinks into blobs/) resolves offline."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    index = save_sharded_checkpoint(tiny_state_dict, tmp_path / "src", max_shard_size=200)
    for i, src in enumerate(sorted(index.parent.iterdir())):
        blob = repo / "blobs" / f"{i:040d}"
        src.rename(blob)
        (snapshot / src.name).symlink_to(Path("../..") / "blobs" / blob.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with CheckpointReader("org/tiny") as reader:
        assert_same(dict(reader.iter_tensors()), tiny_state_dict)
        assert reader.checkpoint.root == snapshot


def test_views_of_uncommon_dtypes(tmp_path):
    state = {"fp8": torch.randn(4, 4).to(torch.float8_e4m3fn), "b": torch.tensor([True, False, True])}
    save_file(state, str(tmp_path / "m.safetensors"))
    with CheckpointReader(tmp_path / "m.safetensors") as reader:
        for key, tensor in state.items():
            assert reader.mmap_view(key).dtype == tensor.dtype
            assert torch.equal(reader.mmap_view(key).view(torch.uint8), tensor.view(torch.uint8))



def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=31, n_positions=16)
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("safe", [True, False])
def test_reads_transformers_sharded_save(tmp_path, safe):
    transformers, model = _tiny_gpt2()
    model.save_pretrained(tmp_path, max_shard_size="10KB", safe_serialization=safe)
    with CheckpointReader(tmp_path) as reader:
        assert reader.checkpoint.index is not None and len(reader.files) > 1
        got = dict(reader.iter_tensors())
    expected = model.state_dict()
    assert got and all(torch.equal(got[k], expected[k]) for k in got)
    assert set(expected) - set(got) <= {"lm_head.weight"}  # tied: transformers saves it once


def test_transformers_loads_our_sharded_save(tmp_path):
    transformers, model = _tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    index = save_sharded_checkpoint(model, tmp_path, max_shard_size=10_000)
    assert index.name == "model.safetensors.index.json"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 31, (1, 7))
    assert torch.equal(loaded(idx).logits, model(idx).logits)



def test_unaligned_offsets_are_read_correctly(tmp_path):
    """The format allows a data section that is not itemsize-aligned (the safetensors library never writes one)."""
    values = torch.arange(6, dtype=torch.float32)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * ((-len(header)) % 8 + 1)  # 8 + len(header) is odd
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + values.numpy().tobytes())
    with CheckpointReader(path) as reader:
        assert torch.equal(reader.mmap_view("w"), values.view(2, 3))
        assert torch.equal(reader.read("w"), values.view(2, 3))
    from safetensors.torch import load_file as reference_load

    assert torch.equal(reference_load(path)["w"], values.view(2, 3))
