"""Bad checkpoints: each raises a clear error naming the culprit, before any weight is read; fuzzed inputs too."""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lightning_bigmodel.checkpoint.reader as reader_module
from lightning_bigmodel.checkpoint.errors import CheckpointError, CheckpointNotFoundError
from lightning_bigmodel.checkpoint.reader import CheckpointReader
from lightning_bigmodel.checkpoint.resolve import ResolvedCheckpoint, resolve_checkpoint
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from tests.conftest import make_state_dict
from tests.models import PicklePayload


def _open_all(checkpoint) -> None:
    with CheckpointReader(checkpoint) as reader:
        for key in reader.keys():
            reader.read(key)
            if reader.spec(key).is_safetensors:
                reader.mmap_view(key)


def _write_index(folder: Path, weight_map: dict, hf: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("model.safetensors.index.json" if hf else "index.json")
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map} if hf else weight_map))
    return path


@pytest.fixture
def shard(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(folder / "s1.safetensors"))
    return folder / "s1.safetensors"


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does-not-exist.safetensors"):
        resolve_checkpoint("does-not-exist.safetensors")


def test_unknown_extension(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*unknown extension"):
        resolve_checkpoint(tmp_path / "weights.npz")


def test_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)


def test_folder_with_several_unindexed_files(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({name: torch.ones(1)}, str(tmp_path / name))
    with pytest.raises(ValueError, match=r"\['a.safetensors', 'b.safetensors'\].*index") as info:
        resolve_checkpoint(tmp_path)
    assert isinstance(info.value, CheckpointError)


def test_index_missing_shard(shard):
    index = _write_index(shard.parent, {"a": "s1.safetensors", "c": "s2.safetensors"})
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json.*'c'.*s2\.safetensors") as info:
        resolve_checkpoint(index)
    assert isinstance(info.value, CheckpointNotFoundError)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_path_escaping_folder_is_refused(shard, entry, monkeypatch):
    outside = shard.parent.parent / "outside.safetensors"
    save_file({"secret": torch.ones(1)}, str(outside))
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = _write_index(shard.parent, {"a": "s1.safetensors", "secret": entry}, hf=False)
    opened = []
    monkeypatch.setattr(reader_module, "ShardHandle", lambda path, **kw: opened.append(path))  # where shards open
    with pytest.raises(ValueError, match=rf"'secret'.*{json.dumps(entry)[1:-1]}.*outside the checkpoint folder"):
        CheckpointReader(index)
    assert opened == []


def test_symlink_pointing_out_is_refused(shard):
    outside = shard.parent.parent / "outside.safetensors"
    save_file({"secret": torch.ones(1)}, str(outside))
    (shard.parent / "link.safetensors").symlink_to(outside)
    index = _write_index(shard.parent, {"a": "s1.safetensors", "secret": "link.safetensors"})
    with pytest.raises(ValueError, match=r"'secret'.*link\.safetensors.*outside the checkpoint folder"):
        resolve_checkpoint(index)


def test_symlink_inside_is_fine(shard):
    (shard.parent / "link.safetensors").symlink_to("s1.safetensors")
    index = _write_index(shard.parent, {"a": "link.safetensors", "b": "link.safetensors"})
    with CheckpointReader(index) as reader:
        assert torch.equal(reader.read("b"), torch.zeros(3))


def test_index_tensor_missing_from_its_shard(shard):
    index = _write_index(shard.parent, {"a": "s1.safetensors", "ghost": "s1.safetensors"})
    with pytest.raises(ValueError, match=r"'ghost'.*s1\.safetensors.*does not hold it"):
        CheckpointReader(index)


def test_duplicate_key_across_shards(shard):
    save_file({"a": torch.ones(2), "c": torch.ones(1)}, str(shard.parent / "s2.safetensors"))
    index = _write_index(shard.parent, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
    with pytest.raises(ValueError, match=r"'a'.*s1\.safetensors.*s2\.safetensors"):
        CheckpointReader(index)
    unindexed = ResolvedCheckpoint(root=shard.parent, files=(shard, shard.parent / "s2.safetensors"), weight_map=None)
    with pytest.raises(ValueError, match=r"'a'.*two shards"):
        CheckpointReader(unindexed)


@pytest.mark.parametrize("content", ["zero_bytes", "no_tensors_safetensors", "no_tensors_bin"])
def test_empty_shard(tmp_path, content):
    path = tmp_path / ("empty.bin" if content == "no_tensors_bin" else "empty.safetensors")
    if content == "zero_bytes":
        path.write_bytes(b"")
    elif content == "no_tensors_safetensors":
        save_file({}, str(path))
    else:
        torch.save({}, path)
    with pytest.raises(ValueError, match=rf"{path.name}.*(empty|no tensors)"):
        CheckpointReader(path)


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_safetensors(shard, cut):
    data = shard.read_bytes()
    shard.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"s1\.safetensors.*corrupt or truncated.*Re-download"):
        CheckpointReader(shard)


def test_header_length_beyond_file(shard):
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    with pytest.raises(ValueError, match=r"s1\.safetensors.*corrupt or truncated.*claims"):
        CheckpointReader(shard)


def test_corrupt_pickle(tmp_path):
    torch.save(make_state_dict(), tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"w\.bin.*weights_only=True"):
        CheckpointReader(tmp_path / "w.bin")




@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("suffix", [".bin", ".ckpt"])
def test_malicious_pickle_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"w": torch.ones(1), "evil": PicklePayload(marker)}, path)
    with pytest.raises(ValueError, match=rf"evil\{suffix}.*weights_only=True") as info:
        CheckpointReader(path)
    assert not marker.exists()
    assert isinstance(info.value, CheckpointError)
    legacy = tmp_path / f"legacy{suffix}"  # the pre-zip torch.save format goes through the unmapped path
    with open(legacy, "wb") as f:
        pickle.dump(PicklePayload(marker), f)
    with pytest.raises(ValueError, match=rf"legacy\{suffix}"):
        CheckpointReader(legacy)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt.*list, not a state dict"):
        CheckpointReader(tmp_path / "list.pt")


@pytest.mark.parametrize(
    "text, match",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected an object"), ('{"weight_map": 3}', "weight_map"),
     ("{}", "names no tensors"), ('{"a": 5}', "'a' maps to 5")],
)  # fmt: skip
def test_malformed_index(tmp_path, text, match):
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        resolve_checkpoint(tmp_path / "index.json")
    assert "index.json" in str(info.value)


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match=r"'some-org/missing-model' not found: no local path .*, and no Hugging "
                                                r"Face Hub repo 'some-org/missing-model' \(Hub not asked: HF_HUB_OFFLINE"):
        resolve_checkpoint("some-org/missing-model")


# --------------------------------------------------------------------------- fuzzing


def _mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        return struct.pack("<Q", rng.choice([2**64 - 1, len(data), length + 1, 0, 2])) + data[8:]
    if kind == 3:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            flipped[rng.randrange(8, 8 + length)] = rng.randrange(256)
        return bytes(flipped)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    if kind == 4:
        entry["data_offsets"] = [rng.randrange(-5, 2 * len(body)), rng.randrange(-5, 2 * len(body))]
    elif kind == 5:
        entry["dtype"] = rng.choice(["F33", "", 7, None, "BOOL", "I64", "F8_E4M3"])
    elif kind == 6:
        entry["shape"] = rng.choice([[-1], [1.5], "x", [2**70], [0], [True], [3, 0, 2]])
    else:
        header[name] = rng.choice([[], "junk", None, {"dtype": "F32"}, {**entry, "extra": 1}])
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_fuzz_safetensors_headers(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "fuzz.safetensors"
    save_file(make_state_dict(), str(path))
    valid = path.read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        path.write_bytes(_mutate_safetensors(rng, valid))
        try:
            _open_all(path)
            outcomes["ok"] += 1
        except CheckpointError as err:
            assert "fuzz.safetensors" in str(err)
            outcomes["error"] += 1
    assert outcomes["error"] > 200, outcomes


def _load_all(checkpoint) -> dict[str, torch.Tensor]:
    with CheckpointReader(checkpoint) as reader:
        return {key: reader.read(key) for key in reader.keys()}


def test_fuzz_pickle_bytes(tmp_path):
    """Every mutation loads the original values (a flipped byte that lands in tensor data may change at most one
    element per flip: a pickle has no checksum) or raises our error naming the file; both outcomes occur."""
    rng = random.Random(99)
    path = tmp_path / "fuzz.bin"
    original = make_state_dict()
    torch.save(original, path)
    valid = path.read_bytes()
    outcomes = {"same": 0, "data byte changed": 0, "error": 0}
    for _ in range(60):
        data = bytearray(valid[: rng.randrange(len(valid))] if rng.random() < 0.5 else valid)
        flips = rng.randrange(0, 4)
        for _ in range(flips):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            loaded = _load_all(path)
        except CheckpointError as err:
            assert "fuzz.bin" in str(err)
            outcomes["error"] += 1
            continue
        assert loaded.keys() == original.keys()
        changed = 0
        for key, tensor in original.items():
            assert (loaded[key].dtype, loaded[key].shape) == (tensor.dtype, tensor.shape), key
            changed += int((loaded[key] != tensor).sum()) if tensor.numel() else 0
        assert changed <= flips
        outcomes["same" if changed == 0 else "data byte changed"] += 1
    assert outcomes["error"] >= 30 and outcomes["same"] >= 10, outcomes  # measured: 42 errors, 17 same, 1 changed


def _fuzz_entry(rng: random.Random, outside: Path) -> object:
    return rng.choice([
        "s1.safetensors", "../outside.safetensors", str(outside), "missing.safetensors", "sub/../s1.safetensors",
        "/etc/passwd", "..", "", ".", 5, None, ["s1.safetensors"], {"f": 1}, "s1.safetensors\x00", "x" * 5000,
        "C:\\evil.safetensors", "nested/deeper.bin", "s1.SAFETENSORS", "link_out.safetensors",
    ])  # fmt: skip


def test_fuzz_index_files(tmp_path, monkeypatch):
    rng = random.Random(7)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    real = {"a": torch.ones(2), "b": torch.zeros(3)}
    save_file(real, str(folder / "s1.safetensors"))
    outside = tmp_path / "outside.safetensors"
    save_file({"secret": torch.ones(1)}, str(outside))
    (folder / "link_out.safetensors").symlink_to(outside)
    outcomes = {"loaded": 0, "error": 0}
    opened: list[Path] = []
    real_open = reader_module.ShardHandle  # every shard is opened there, once
    monkeypatch.setattr(reader_module, "ShardHandle", lambda p, **kw: opened.append(Path(p)) or real_open(p, **kw))
    index = folder / "index.json"
    for i in range(300):
        if i % 10 == 0:
            index.write_bytes(rng.randbytes(rng.randrange(0, 40)))
        else:
            entries = {rng.choice(["a", "b", "secret", "", "a" * 300]): _fuzz_entry(rng, outside) for _ in range(3)}
            if i % 3 == 0:  # a valid index with one entry changed: to an equivalent path (loads) or a fuzzed one
                entries = {"a": "s1.safetensors", "b": "s1.safetensors"}
                entries[rng.choice("ab")] = rng.choice(["s1.safetensors", "./s1.safetensors", _fuzz_entry(rng, outside)])
            wrapped = {"metadata": rng.choice([{}, None, 3]), "weight_map": entries} if rng.random() < 0.5 else entries
            index.write_text(json.dumps(wrapped))
        try:
            loaded = _load_all(index)
        except CheckpointError as err:
            assert "index.json" in str(err) or "s1.safetensors" in str(err)
            outcomes["error"] += 1
            continue
        assert loaded and set(loaded) <= set(real)  # never "secret", never a made-up tensor
        for key, tensor in loaded.items():
            assert torch.equal(tensor, real[key]), key
        outcomes["loaded"] += 1
    assert outcomes["loaded"] >= 30 and outcomes["error"] >= 200, outcomes  # measured: 54 loaded, 246 errors
    assert opened and all(p.resolve().is_relative_to(folder.resolve()) for p in opened)
