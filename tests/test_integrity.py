"""Reused offload folders and checkpoints that cannot fool a model: faults injected for real, no file-system mocks.

Each case checks a clear error naming the file (or, where the fault is harmless by design, the planned weights), the
model left as before the call, and outputs equal to the plainly built model once the fault is removed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from models import UntiedMLP, example_input, make_reference
from safetensors.torch import save_file
from torch import nn

import lightning_bigmodel.offload.disk as disk
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, load_checkpoint_in_model
from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.checkpoint.shard import ShardHandle
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint
from lightning_bigmodel.offload.disk import MANIFEST, OffloadFolderError
from test_offload_folder import empty_model, output_of, reference_output, write_bin  # the same tiny model and .bin

ROOT = Path(__file__).resolve().parent.parent
HALF = {"inp": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "out": "disk"}


def load(checkpoint, folder=None, device_map=None, **kwargs) -> nn.Module:
    model = empty_model()
    load_checkpoint_in_model(model, checkpoint, device_map=device_map or {"": "disk"}, offload_folder=folder, **kwargs)
    return model


def assert_untouched(model: nn.Module) -> None:
    assert all(p.is_meta for p in model.parameters())


def in_other_process(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=120)


# --------------------------------------------------------------------------- reuse checks what it trusts


def change_bytes_in_other_process(path: Path) -> None:
    size = path.stat().st_size
    in_other_process(f"""
        with open({str(path)!r}, "r+b") as f:  # same size, one weight's bytes changed
            f.seek({size} - 64)
            f.write(bytes(range(64)))
    """)
    assert path.stat().st_size == size


@pytest.mark.parametrize("dispatched", [False, True])
def test_changed_bytes_in_a_reused_offload_file_are_refused_at_first_use_then_rewritten(tmp_path, dispatched):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    path = folder / "blocks.1.fc.weight.safetensors"
    change_bytes_in_other_process(path)
    model = empty_model()
    if dispatched:  # the disk weights stream through the read-ahead's buffers
        load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    else:  # the load returns at once; the check runs in the background
        load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    for _ in range(2):  # refused at the first forward, and at every later one: those bytes are never used
        with pytest.raises(OffloadFolderError, match=r"blocks\.1\.fc\.weight\.safetensors.*do not match the checksum"):
            output_of(model)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert "blocks.1.fc.weight" not in manifest["tensors"] and not path.exists()  # dropped: a rerun rewrites it
    assert "blocks.2.fc.weight" in manifest["tensors"]
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)
    assert "blocks.1.fc.weight" in json.loads((folder / MANIFEST).read_text())["tensors"]


def test_reuse_returns_before_the_checksums_and_each_module_waits_for_its_files(tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    gate, checksum = threading.Event(), ShardHandle.checksum
    monkeypatch.setattr(ShardHandle, "checksum", lambda self, stop=None: gate.wait() and checksum(self, stop))
    model = empty_model()
    loader = threading.Thread(target=load_checkpoint_in_model, args=(model, checkpoint),
                              kwargs={"device_map": {"": "disk"}, "offload_folder": folder})
    loader.start()
    loader.join(timeout=60)
    try:
        assert not loader.is_alive(), "the load waited for the checksums of the reused files"
        seen = []
        model.blocks[1].fc.register_forward_pre_hook(lambda *_: seen.append(gate.is_set()))
        outputs = []
        forward = threading.Thread(target=lambda: outputs.append(output_of(model)))
        forward.start()
        forward.join(timeout=2)  # a forward that does not wait finishes here, with the checks held back
    finally:
        gate.set()
    forward.join(timeout=60)
    assert seen == [True], "a module computed before the checksum of its file was known"
    torch.testing.assert_close(outputs[0], reference_output(), rtol=0, atol=0)


def test_model_loaded_from_a_reused_folder_can_be_deep_copied_before_its_first_forward(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    model = load(checkpoint, folder)  # its checks are pending: hooks wait for them
    torch.testing.assert_close(output_of(copy.deepcopy(model)), reference_output(), rtol=0, atol=0)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


@pytest.mark.parametrize("swap", [('"shape":[32,16]', '"shape":[16,32]'), ('"dtype":"F32"', '"dtype":"I32"')])
def test_reused_file_with_a_swapped_header_is_rewritten(tmp_path, swap):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    path = folder / "blocks.0.fc.weight.safetensors"
    data = path.read_bytes()
    assert swap[0].encode() in data
    path.write_bytes(data.replace(swap[0].encode(), swap[1].encode(), 1))  # same length: the size still matches
    model = load(checkpoint, folder)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)
    assert path.read_bytes() == data  # written again from the checkpoint


@pytest.mark.parametrize("bad", ["a string", {"shape": [16, 16]}, {"file": "../../escape.safetensors"}, 7])
def test_manifest_entries_of_the_wrong_shape_rebuild_the_folder(tmp_path, bad):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["tensors"]["inp.weight"] = bad
    (folder / MANIFEST).write_text(json.dumps(manifest))
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)
    rebuilt = json.loads((folder / MANIFEST).read_text())["tensors"]
    assert rebuilt["inp.weight"]["file"] == "inp.weight.safetensors" and len(rebuilt) == len(manifest["tensors"])
    assert not (tmp_path / "escape.safetensors").exists()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_checkpoint_copied_over_with_the_same_size_and_mtime_is_not_mixed(tmp_path, fmt):
    """``cp -p`` keeps size and mtime; inode or ctime (and the safetensors header) change: the folder is rebuilt."""
    if fmt == "bin":
        first, second = write_bin(tmp_path / "a", seed=0), write_bin(tmp_path / "b", seed=3)
        kwargs = {}
    else:
        first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        save_file(make_reference(UntiedMLP, 0).state_dict(), str(first))
        save_file(make_reference(UntiedMLP, 3).state_dict(), str(second))
        kwargs = {"dtype": torch.float16}  # a cast: disk weights go to the offload folder
    assert first.stat().st_size == second.stat().st_size
    folder = tmp_path / "off"
    load(first, folder, HALF, **kwargs)
    os.utime(second, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns))
    subprocess.run(["cp", "-p", str(second), str(first)], check=True)
    assert first.stat().st_mtime_ns == second.stat().st_mtime_ns and first.stat().st_size == second.stat().st_size
    model = load(first, folder, HALF, **kwargs)
    expected = make_reference(UntiedMLP, 3).to(kwargs.get("dtype", torch.float32))
    with torch.inference_mode():
        want = expected(example_input(UntiedMLP).to(kwargs.get("dtype", torch.float32)))
    torch.testing.assert_close(output_of_dtype(model, kwargs.get("dtype")), want, rtol=0, atol=0)


def output_of_dtype(model: nn.Module, dtype) -> torch.Tensor:
    with torch.inference_mode():
        return model(example_input(UntiedMLP).to(dtype or torch.float32))


# --------------------------------------------------------------------------- no symbolic link is followed


def test_listed_offload_file_replaced_by_a_link_outside_is_not_followed(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    load(write_bin(tmp_path / "other", seed=5), tmp_path / "other_off")  # same shapes, other values
    outside = tmp_path / "other_off" / "out.weight.safetensors"
    target = folder / "out.weight.safetensors"
    assert outside.stat().st_size == target.stat().st_size
    before = outside.read_bytes()
    target.unlink()
    target.symlink_to(outside)
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)
    assert not target.is_symlink() and outside.read_bytes() == before


def test_fifo_in_place_of_a_listed_offload_file_is_replaced_without_blocking(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    load(checkpoint, folder)
    target = folder / "out.weight.safetensors"
    target.unlink()
    os.mkfifo(target)  # opening it for reading would wait for a writer forever
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)
    assert target.is_file()


def test_lock_planted_as_a_link_is_refused_and_creates_nothing_outside(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    folder.mkdir()
    outside = tmp_path / "elsewhere" / "created-by-the-library"
    outside.parent.mkdir()
    (folder / ".lock").symlink_to(outside)
    model = empty_model()
    with pytest.raises(OffloadFolderError, match=r"\.lock' in the offload folder is a symbolic link"):
        load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert not outside.exists() and not outside.is_symlink()
    assert_untouched(model)
    (folder / ".lock").unlink()
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)


def test_temporary_file_planted_as_a_link_is_not_written_through(tmp_path):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), tmp_path / "off"
    folder.mkdir()
    outside = tmp_path / "elsewhere.bin"
    for name in ("inp.weight.safetensors", MANIFEST):  # the names this process's writes go through
        (folder / f".{name}.{os.getpid()}.tmp").symlink_to(outside)
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)
    assert not outside.exists() and not any(p.is_symlink() for p in folder.iterdir())


# --------------------------------------------------------------------------- shards that change during the load


def write_shards(folder: Path, seed: int = 0, safe: bool = True) -> Path:
    state = make_reference(UntiedMLP, seed).state_dict()
    return save_sharded_checkpoint(state, folder, max_shard_size=3000, safe_serialization=safe)


def shards_of(index: Path) -> list[Path]:
    return sorted({index.parent / f for f in json.loads(index.read_text())["weight_map"].values()})


def fault_during_load(index: Path, fault: str, victim: Path, replacement: Path):
    """A ``progress`` callback that, at the first placed tensor, has another process damage ``victim`` (not read
    yet): truncate it, rewrite it in place with ``replacement``'s bytes keeping size and mtime (``cp -p``), replace
    it atomically by ``replacement``, or delete it."""
    done = []

    def progress(key, nbytes):
        if done:
            return
        done.append(key)
        action = {
            "truncated": f"os.truncate({str(victim)!r}, os.path.getsize({str(victim)!r}) // 2)",
            "replaced": f"os.replace({str(replacement)!r}, {str(victim)!r})",
            "deleted": f"os.unlink({str(victim)!r})",
            "rewritten": (  # in place, same size, mtime set back: only the ctime tells
                f"import shutil; st = os.stat({str(victim)!r}); shutil.copyfile({str(replacement)!r}, {str(victim)!r}); "
                f"os.utime({str(victim)!r}, ns=(st.st_atime_ns, st.st_mtime_ns))"
            ),
        }[fault]
        in_other_process(f"import os; {action}")

    return progress


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("fault", ["truncated", "rewritten", "replaced", "deleted"])
def test_shard_changed_by_another_process_during_the_load(tmp_path, fault, safe):
    index = write_shards(tmp_path / "ckpt", safe=safe)
    shards = shards_of(index)
    assert len(shards) >= 3
    victim = shards[1]
    original = victim.read_bytes()
    other = write_shards(tmp_path / "other", seed=7, safe=safe)
    replacement = tmp_path / "ckpt" / "staged"
    replacement.write_bytes(shards_of(other)[1].read_bytes())  # same tensor names and shapes, other values
    model = empty_model()
    progress = fault_during_load(index, fault, victim, replacement)
    if fault in ("truncated", "rewritten"):
        with pytest.raises(CheckpointError, match=rf"{victim.name}.*(changed while in use|truncated)"):
            load_checkpoint_in_model(model, index, device_map={"": "cpu"}, progress=progress)
        assert_untouched(model)
        victim.write_bytes(original)  # the fault removed
        model = empty_model()
        load_checkpoint_in_model(model, index, device_map={"": "cpu"})
    else:  # the descriptor opened when the checkpoint was scanned still reads the planned file
        load_checkpoint_in_model(model, index, device_map={"": "cpu"}, progress=progress)
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


def test_disk_weights_of_a_shard_replaced_during_the_load_are_the_planned_ones(tmp_path):
    index = write_shards(tmp_path / "ckpt")
    victim = shards_of(index)[-1]
    replacement = tmp_path / "ckpt" / "staged"
    replacement.write_bytes(shards_of(write_shards(tmp_path / "other", seed=7))[-1].read_bytes())
    model = empty_model()
    progress = fault_during_load(index, "replaced", victim, replacement)
    load_checkpoint_in_model(model, index, device_map=HALF, progress=progress)  # disk weights are views in place
    torch.testing.assert_close(output_of(model), reference_output(), rtol=0, atol=0)


# --------------------------------------------------------------------------- a full disk before the manifest


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("2m")


def test_disk_full_just_before_the_manifest_leaves_the_model_as_it_was(small_tmpfs, tmp_path, monkeypatch):
    checkpoint, folder = write_bin(tmp_path / "ckpt"), small_tmpfs / "off"
    filler = small_tmpfs / "filler"
    tensors = len(UntiedMLP().state_dict())
    committed = []

    def fill_the_disk_after_the_last_tensor(stage, path):  # the library's fault seam: the disk itself fills for real
        if stage == "committed" and path.name != MANIFEST:
            committed.append(path)
            if len(committed) == tensors:
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass

    monkeypatch.setattr(disk, "_fault_point", fill_the_disk_after_the_last_tensor)
    model = empty_model()
    with pytest.raises(OffloadFolderError, match=rf"'{folder}' ran out of space while writing '{MANIFEST}'"):
        load_checkpoint_in_model(model, checkpoint, device_map={"": "disk"}, offload_folder=folder)
    assert len(committed) == tensors
    assert_untouched(model)  # no parameter points at the deleted files
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == []
    filler.unlink()
    monkeypatch.setattr(disk, "_fault_point", lambda stage, path: None)
    torch.testing.assert_close(output_of(load(checkpoint, folder)), reference_output(), rtol=0, atol=0)


# --------------------------------------------------------------------------- descriptors

_FD_JOB = """
import json, os, resource, sys
import torch
from torch import nn
from lightning_bigmodel import init_empty_weights, load_checkpoint_in_model
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint

class Many(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(N))
    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

N, MODE, FOLDER, SAFE = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "safetensors"
torch.manual_seed(0)
plain = Many().eval()
index = save_sharded_checkpoint(plain.state_dict(), FOLDER, max_shard_size=100, safe_serialization=SAFE)  # 1 per tensor
files = len(set(json.loads(open(index).read())["weight_map"].values()))
base = len(os.listdir("/proc/self/fd"))
soft, hard = base + 40, base + (40 if MODE == "too_few" else 4 * files + 200)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
with init_empty_weights():
    model = Many().eval()
try:
    load_checkpoint_in_model(model, index, device_map={"": "cpu"})
except OSError as err:
    print(json.dumps({"error": str(err), "meta": all(p.is_meta for p in model.parameters())}))
    sys.exit(0)
x = torch.randn(2, 4)
with torch.inference_mode():
    same = torch.equal(model(x), plain(x))
held = len(os.listdir("/proc/self/fd")) - base
print(json.dumps({"files": files, "held": held, "same": same, "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                  "start_soft": soft}))
"""


def run_fd_job(tmp_path, mode: str, fmt: str = "safetensors") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _FD_JOB, "80", mode, str(tmp_path / "ckpt"), fmt],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_descriptors_one_per_file_and_the_soft_limit_raised_when_the_hard_one_allows(tmp_path):
    result = run_fd_job(tmp_path, "raise_soft")
    assert result["same"], result  # loaded through more shards than the starting soft limit allowed
    assert result["files"] > result["start_soft"] - 40 and result["soft"] > result["start_soft"]
    assert result["held"] <= result["files"], result  # at most one descriptor per mapped file after the load


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_too_few_descriptors_is_a_clear_error_before_loading(tmp_path, fmt):
    result = run_fd_job(tmp_path, "too_few", fmt)
    assert "needs" in result["error"] and "file descriptors" in result["error"] and "limit is" in result["error"]
    assert "ulimit -n" in result["error"] and result["meta"], result


# --------------------------------------------------------------------------- .bin weights used in place on the CPU

_BIN_CHILD = r"""
import json, subprocess, sys, torch
sys.path.insert(0, "tests")
from models import UntiedMLP, example_input, make_reference
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
out = {}
for case, path in json.loads(sys.argv[1]).items():
    with init_empty_weights():
        model = UntiedMLP().eval()
    load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"})
    expected, x, result = make_reference(UntiedMLP, 0)(example_input(UntiedMLP)), example_input(UntiedMLP), {}
    try:
        with torch.inference_mode():
            if case == "after":
                result["first_equal"] = torch.equal(model(x), expected)
            size = len(open(path, "rb").read())
            subprocess.run(["truncate", "-s", str(size // 3), path], check=True)  # by another process
            result["equal"] = torch.equal(model(x), expected)
    except Exception as err:
        result["error"] = f"{type(err).__name__}: {err}"
    out[case] = result
print("RESULT " + json.dumps(out))
"""


def test_bin_shard_used_in_place_on_cpu_truncated_under_the_model_is_an_error_or_harmless(tmp_path):
    cases = {case: str(write_bin(tmp_path / case)) for case in ("before", "after")}  # the first forward's
    done = subprocess.run([sys.executable, "-c", _BIN_CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"child died with {done.returncode} (-7 is SIGBUS): {done.stderr[-2000:]}"
    found = json.loads([row for row in done.stdout.splitlines() if row.startswith("RESULT ")][-1][len("RESULT "):])
    error = found["before"].get("error", "")  # truncated before the first forward copied the weights: refused
    assert error.startswith("CheckpointError") and cases["before"] in error, found
    assert found["after"] == {"first_equal": True, "equal": True}  # the weights in use are copies by then


# --------------------------------------------------------------------------- the job fingerprint's checkpoint identity


def test_job_fingerprint_sees_a_checkpoint_copied_over_with_the_same_size_and_mtime(tmp_path):
    from lightning_bigmodel.pl._fingerprint import checkpoint_part

    folder, other = tmp_path / "ckpt", tmp_path / "other.safetensors"
    folder.mkdir()
    target = folder / "model.safetensors"
    save_file({"w": torch.ones(64)}, target)
    save_file({"w": torch.zeros(64)}, other)  # same size and header, other values
    stat = target.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # `cp -p` then gives the target its old mtime
    first = checkpoint_part(folder)
    probe = tmp_path / "probe"
    while True:  # until the file system's clock has moved past the target's ctime (coarse timestamps)
        probe.write_bytes(b"x")
        if probe.stat().st_ctime_ns != stat.st_ctime_ns:
            break
    subprocess.run(["cp", "-p", str(other), str(target)], check=True)  # rewritten in place: same inode
    after = target.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (stat.st_size, stat.st_ino, stat.st_mtime_ns)
    assert checkpoint_part(folder) != first
