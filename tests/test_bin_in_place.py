"""A .bin/.pt checkpoint loaded to the CPU uses the tensors ``torch.load(mmap=True, weights_only=True)`` mapped, in
place (no anonymous copy), as safetensors views are used; outputs match the plain model and the file never changes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from models import BufferNet, TiedLM, example_input, make_reference
from lightning_bigmodel import dispatch_model, load_checkpoint_in_model, save_sharded_checkpoint
from lightning_bigmodel.init import init_empty_weights
from lightning_bigmodel.offload.pages import is_file_backed


def _digest(folder) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


@pytest.mark.parametrize("cls", [TiedLM, BufferNet])
def test_bin_shards_load_to_cpu_as_mapped_views_and_run_like_the_plain_model(cls, tmp_path):
    plain = make_reference(cls)
    save_sharded_checkpoint(plain, tmp_path / "ckpt", max_shard_size=2000, safe_serialization=False)
    assert any(p.suffix == ".bin" for p in (tmp_path / "ckpt").iterdir())
    before = _digest(tmp_path / "ckpt")
    with init_empty_weights():
        model = cls().eval()
    load_checkpoint_in_model(model, tmp_path / "ckpt", device_map={"": "cpu"})
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    mapped = {name for name, tensor in named if is_file_backed(tensor)}
    assert mapped == set(model.state_dict()), mapped  # the checkpoint's tensors, used where they were mapped
    dispatch_model(model, {"": "cpu"})
    x = example_input(cls)
    with torch.no_grad():
        for _ in range(2):  # BufferNet's forward writes its step counters: copy-on-write, never into the file
            torch.testing.assert_close(model(x), plain(x))
    assert _digest(tmp_path / "ckpt") == before


def test_a_legacy_pickle_loads_in_place_too(tmp_path):
    plain = make_reference(BufferNet)
    torch.save(plain.state_dict(), tmp_path / "model.pt", _use_new_zipfile_serialization=False)
    with init_empty_weights():
        model = BufferNet().eval()
    load_checkpoint_in_model(model, tmp_path / "model.pt", device_map={"": "cpu"})
    x = example_input(BufferNet)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))


def test_a_cast_still_copies(tmp_path):
    plain = make_reference(TiedLM)
    save_sharded_checkpoint(plain, tmp_path / "ckpt", safe_serialization=False)
    with init_empty_weights():
        model = TiedLM().eval()
    load_checkpoint_in_model(model, tmp_path / "ckpt", device_map={"": "cpu"}, dtype=torch.float16)
    assert all(p.dtype == torch.float16 and not is_file_backed(p) for p in model.parameters())
