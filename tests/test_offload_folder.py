"""The offload folder: atomic writes, a manifest naming the source checkpoint, reuse, stale and partial folders,
concurrent processes, a process killed part way, and folders that cannot be written or fill up."""

from __future__ import annotations

import errno
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import UntiedMLP, example_input, make_reference
from safetensors import safe_open
from torch import nn

import lightning_bigmodel.offload.disk as disk
from lightning_bigmodel import (
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
)
from lightning_bigmodel.offload.disk import MANIFEST, OffloadFolder, OffloadFolderError, source_identity
from lightning_bigmodel.offload.placement import is_disk

JOB = Path(__file__).with_name("offload_job.py")
ROOT = JOB.parent.parent
N_TENSORS = len(UntiedMLP().state_dict())


# --------------------------------------------------------------------------- helpers


def write_bin(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pytorch_model.bin"
    torch.save(make_reference(UntiedMLP, seed).state_dict(), path)
    return path


def empty_model() -> nn.Module:
    with init_empty_weights():
        return UntiedMLP().eval()


def reference_output(seed: int = 0) -> torch.Tensor:
    with torch.inference_mode():
        return make_reference(UntiedMLP, seed)(example_input(UntiedMLP))


def output_of(model: nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(example_input(UntiedMLP))


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}


def assert_consistent(folder: Path, checkpoint: Path, seed: int = 0, complete: bool = True) -> dict:
    """No temporary file; every manifest entry is a complete file holding the checkpoint's tensor; the manifest names
    the checkpoint. Returns the manifest's tensors."""
    assert tmp_files(folder) == []
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"] == source_identity([checkpoint])
    reference = make_reference(UntiedMLP, seed).state_dict()
    for name, entry in manifest["tensors"].items():
        path = folder / entry["file"]
        assert path.stat().st_size == entry["size"], name
        with safe_open(path, "pt") as f:
            torch.testing.assert_close(f.get_tensor("tensor"), reference[name], rtol=0, atol=0)
    if complete:
        assert set(manifest["tensors"]) == set(reference)
    return manifest["tensors"]


def launch(checkpoint: Path, folder: Path, output: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, str(JOB), str(checkpoint), str(folder), str(output), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- reuse, stale, partial


def test_rerun_reuses_a_complete_folder_without_rewriting(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load_checkpoint_in_model(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert_consistent(folder, checkpoint)
    before = {**stamps(folder), MANIFEST: (folder / MANIFEST).stat().st_mtime_ns}
    model = empty_model()
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert {**stamps(folder), MANIFEST: (folder / MANIFEST).stat().st_mtime_ns} == before  # nothing rewritten
    assert all(is_disk(p) for p in model.parameters())
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


def test_folder_of_another_checkpoint_is_rebuilt(tmp_path):
    first, second = write_bin(tmp_path / "a", seed=0), write_bin(tmp_path / "b", seed=3)
    folder = tmp_path / "off"
    load_checkpoint_in_model(empty_model(), first, device_map={"": "disk"}, offload_folder=folder)
    model = empty_model()
    load_checkpoint_in_model(model, second, device_map={"": "disk"}, offload_folder=folder)
    assert_consistent(folder, second, seed=3)  # every file now holds the second checkpoint's tensor
    torch.testing.assert_close(output_of(model), reference_output(seed=3), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncated_file", "corrupt_manifest", "manifest_wrong_shape"])
def test_damaged_folder_is_repaired(tmp_path, damage):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load_checkpoint_in_model(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    if damage == "truncated_file":
        data = (folder / "out.weight.safetensors").read_bytes()
        (folder / "out.weight.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_manifest":
        (folder / MANIFEST).write_text('{"version": 1, "sou')
    else:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["tensors"]["out.weight"]["shape"] = [1, 2]
        (folder / MANIFEST).write_text(json.dumps(manifest))
    model = empty_model()
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert_consistent(folder, checkpoint)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load_checkpoint_in_model(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    (folder / ".out.weight.safetensors.999999.tmp").write_bytes(b"half a tensor")
    (folder / "notes.txt").write_text("the user's own file")  # not ours: kept
    model = empty_model()
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert tmp_files(folder) == [] and (folder / "notes.txt").exists()
    assert_consistent(folder, checkpoint)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


# --------------------------------------------------------------------------- processes


@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_killed_mid_write_then_rerun_repairs_the_folder(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    proc = launch(checkpoint, folder, tmp_path / "out.pt", "--kill-at", "5")
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == -signal.SIGKILL, log
    assert len(stamps(folder)) == 4  # four files committed...
    assert len(tmp_files(folder)) == 1  # ...the fifth complete as a temporary file, never renamed...
    assert not (folder / MANIFEST).exists()  # ...and no manifest claims anything

    model = empty_model()  # the rerun, in this process
    load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert_consistent(folder, checkpoint)
    assert len(stamps(folder)) == N_TENSORS
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


@pytest.mark.skipif(os.name != "posix", reason="needs fcntl.flock")
def test_two_processes_sharing_a_folder(tmp_path):
    checkpoint, folder, barrier = write_bin(tmp_path / "ckpt"), tmp_path / "off", tmp_path / "barrier"
    barrier.mkdir()
    outputs = [tmp_path / "out0.pt", tmp_path / "out1.pt"]
    procs = [launch(checkpoint, folder, out, "--slow", "0.02", "--barrier", str(barrier)) for out in outputs]
    deadline = time.monotonic() + 120
    while len(list(barrier.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    (barrier / "go").touch()  # both start loading at once
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [torch.load(out, weights_only=True) for out in outputs]
    assert sorted(r["written"] for r in results) == [0, N_TENSORS]  # one wrote everything, the other reused it
    # Each output comes from another process, running concurrently on shared cores: CPU kernels may sum in another
    # order there, so equal up to float32 rounding (torch.testing's default tolerance), not bitwise.
    for result in results:
        torch.testing.assert_close(result["output"], reference_output())
    assert_consistent(folder, checkpoint)


# --------------------------------------------------------------------------- unwritable and full folders


def _failing_open(folder: Path, error: OSError):
    real_open = open

    def fake_open(file, *args, **kwargs):
        if Path(file).parent == folder and ("w" in str(args[:1]) or "a" in str(args[:1])):
            raise error
        return real_open(file, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize("entry", [load_checkpoint_in_model, load_checkpoint_and_dispatch])
@pytest.mark.parametrize("how", ["under_a_file", "permission_error", "chmod"])
def test_unwritable_folder_fails_before_placing(tmp_path, monkeypatch, how, entry):
    checkpoint = write_bin(tmp_path / "ckpt")
    folder = tmp_path / "off"
    if how == "under_a_file":
        (tmp_path / "plain_file").write_text("x")
        folder = tmp_path / "plain_file" / "off"
    elif how == "permission_error":
        folder.mkdir()
        monkeypatch.setattr(disk, "open", _failing_open(folder, PermissionError(errno.EACCES, "Permission denied")),
                            raising=False)  # fmt: skip
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions (the permission_error case simulates it)")
        folder.mkdir()
        folder.chmod(0o500)
    model = empty_model()
    try:
        with pytest.raises(OffloadFolderError, match=r"`offload_folder` '.*off' is not writable") as info:
            entry(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    finally:
        if how == "chmod":
            folder.chmod(0o700)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert str(folder) in str(info.value) and "Pass a writable `offload_folder`" in str(info.value)
    assert all(p.is_meta for p in model.parameters()) and not hasattr(model, "hf_device_map")
    if folder.is_dir():
        assert sorted(p.name for p in folder.iterdir() if p.name != ".lock") == []


def test_complete_folder_that_became_read_only_is_still_reused(tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load_checkpoint_in_model(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if Path(file).parent == folder and "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(disk, "open", read_only_open, raising=False)
    model = load_checkpoint_and_dispatch(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)
    (folder / "out.weight.safetensors").unlink()  # now one file must be written: the folder's error, model untouched
    before = {**stamps(folder), MANIFEST: (folder / MANIFEST).stat().st_mtime_ns}
    model = empty_model()
    with pytest.raises(OffloadFolderError, match=r"'.*off' is not writable while creating the test file"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert all(p.is_meta for p in model.parameters())
    assert {**stamps(folder), MANIFEST: (folder / MANIFEST).stat().st_mtime_ns} == before and tmp_files(folder) == []


def test_disk_full_mid_write_leaves_a_consistent_folder_and_an_untouched_model(tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    real_save, calls = disk._save_aligned, []

    def save_until_full(tensor, path):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"\0" * 100)  # part of the file made it before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensor, path)  # its checksum

    monkeypatch.setattr(disk, "_save_aligned", save_until_full)
    model = empty_model()
    with pytest.raises(OffloadFolderError, match=r"'.*off' ran out of space while writing '.*safetensors'") as info:
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert info.value.errno == errno.ENOSPC and "Free space there" in str(info.value)
    assert all(p.is_meta for p in model.parameters()) and not hasattr(model, "hf_device_map")
    kept = assert_consistent(folder, checkpoint, complete=False)
    assert len(kept) == 2 and len(stamps(folder)) == 2  # the two complete files, listed; nothing half-written
    before = stamps(folder)

    monkeypatch.setattr(disk, "_save_aligned", real_save)  # space freed: the rerun completes and reuses the two
    model = empty_model()
    load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert_consistent(folder, checkpoint)
    assert {name: stamps(folder)[name] for name in before} == before
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


def test_disk_full_while_saving_the_manifest_leaves_no_unlisted_file(tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    real_write = disk._write_atomic

    def write(path, fn):
        if path.name == MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, fn)

    monkeypatch.setattr(disk, "_write_atomic", write)
    with pytest.raises(OffloadFolderError, match=rf"ran out of space while writing '{MANIFEST}'"):
        load_checkpoint_in_model(empty_model(), checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # this session's files removed with it


def test_in_memory_dispatch_checks_room_before_moving_anything(tmp_path, monkeypatch):
    model = make_reference(UntiedMLP)
    weights = {name: p for name, p in model.named_parameters()}
    usage = type("Usage", (), {"free": 1000})
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OffloadFolderError, match=r"'.*off' ran out of space while checking room for 22") as info:
        dispatch_model(model, {"": "disk"}, offload_folder=tmp_path / "off")
    assert info.value.errno == errno.ENOSPC
    assert all(p is weights[name] for name, p in model.named_parameters())  # the very same, unmoved
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [".lock"]


def test_in_memory_dispatch_failing_mid_write_restores_the_model(tmp_path, monkeypatch):
    model = make_reference(UntiedMLP)
    weights = {name: p for name, p in model.named_parameters()}
    real_save = disk._save_aligned
    calls = []

    def save(tensor, path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensor, path)  # its checksum

    monkeypatch.setattr(disk, "_save_aligned", save)
    with pytest.raises(OffloadFolderError, match="ran out of space"):
        dispatch_model(model, {"": "disk"}, offload_folder=tmp_path / "off")
    assert all(p is weights[name] for name, p in model.named_parameters()) and not hasattr(model, "hf_device_map")
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)
    assert tmp_files(tmp_path / "off") == []


def test_offload_folder_refuses_writes_outside_its_context(tmp_path):
    store = OffloadFolder(tmp_path, None)
    with pytest.raises(RuntimeError, match="with OffloadFolder"):
        store.write("t", torch.ones(2))


def test_disk_full_mid_write_through_the_loader_leaves_the_model_untouched(tmp_path, monkeypatch):
    """`load_checkpoint_in_model` itself (the Lightning strategy's path) also puts every slot back on failure."""
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    real_save, calls = disk._save_aligned, []

    def save_until_full(tensor, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensor, path)  # its checksum

    monkeypatch.setattr(disk, "_save_aligned", save_until_full)
    model = empty_model()
    with pytest.raises(OffloadFolderError, match="ran out of space"):
        load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert all(p.is_meta for p in model.parameters())
    assert_consistent(folder, checkpoint, complete=False)


def test_too_little_room_fails_before_the_first_write(tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    writes = []
    monkeypatch.setattr(disk, "_save_aligned", lambda tensor, path: writes.append(path))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 10, 10))
    model = empty_model()
    with pytest.raises(OffloadFolderError, match="ran out of space while checking room"):
        load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert writes == [] and all(p.is_meta for p in model.parameters())
