"""Detected CPU budgets honour the process's memory cgroup (v1 and v2), read from fake files and from a real cgroup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.planning import budget, cgroup
from lightning_bigmodel.planning.budget import budget_sources, detect_cpu_memory, get_max_memory
from lightning_bigmodel.planning.cgroup import cgroup_memory
from lightning_bigmodel.planning.device_map import infer_device_map
from lightning_bigmodel.planning.table import render_table
from lightning_bigmodel.planning.sizes import compute_module_sizes
from safetensors.torch import save_file

from tests.models import meta_gpt

MiB, GiB = 2**20, 2**30
V2_MOUNT = "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
V1_MOUNT = "31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"


def fake_root(tmp_path: Path, version: int, levels: dict[str, dict[str, str]], available: int = 20 * GiB) -> Path:
    """A fake ``/`` with ``/proc/self/{cgroup,mountinfo}``, ``/proc/meminfo`` and cgroup files at each level."""
    root = tmp_path / "root"
    proc = root / "proc" / "self"
    proc.mkdir(parents=True)
    leaf = max(levels, key=len)
    if version == 2:
        (proc / "cgroup").write_text(f"0::{leaf}\n")
        (proc / "mountinfo").write_text(V2_MOUNT)
        base = root / "sys/fs/cgroup"
    else:
        (proc / "cgroup").write_text(f"5:cpu,cpuacct:/other\n4:memory:{leaf}\n0::/\n")
        (proc / "mountinfo").write_text(V2_MOUNT + V1_MOUNT)
        base = root / "sys/fs/cgroup/memory"
    (root / "proc/meminfo").write_text(f"MemTotal: 24000000 kB\nMemAvailable: {available // 1024} kB\n")
    base.mkdir(parents=True, exist_ok=True)
    for level, files in levels.items():
        directory = base / level.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
    return root


def v2_files(limit: str, current: int, active_file: int = 0, inactive_file: int = 0) -> dict[str, str]:
    stat = f"anon {current}\nactive_file {active_file}\ninactive_file {inactive_file}\n"
    return {"memory.max": limit, "memory.current": str(current), "memory.stat": stat}


def v1_files(limit: int, usage: int, cache: int = 0) -> dict[str, str]:
    stat = f"cache {cache}\ntotal_active_file {cache // 2}\ntotal_inactive_file {cache - cache // 2}\n"
    return {"memory.limit_in_bytes": str(limit), "memory.usage_in_bytes": str(usage), "memory.stat": stat}


@pytest.fixture
def use_root(monkeypatch):
    def use(root: Path) -> None:
        monkeypatch.setattr(cgroup, "SYSTEM_ROOT", root)

    return use


def test_v2_limit_binds_minus_page_cache_and_headroom(tmp_path, use_root):
    use_root(fake_root(tmp_path, 2, {"/job": v2_files("max", 0), "/job/step": v2_files(str(GiB), 300 * MiB, 60 * MiB, 40 * MiB)}))
    found = cgroup_memory()
    assert (found.version, found.limit, found.used, found.path.name) == (2, GiB, 200 * MiB, "step")
    cpu = detect_cpu_memory()
    assert cpu.source == "cgroup limit"
    assert cpu.free == GiB - 200 * MiB
    assert cpu.headroom == 256 * MiB  # the minimum: 5% of 824 MiB is less
    assert cpu.budget == GiB - 200 * MiB - 256 * MiB
    assert get_max_memory(None)["cpu"] == cpu.budget


def test_v1_limit_binds(tmp_path, use_root):
    use_root(fake_root(tmp_path, 1, {"/pod/job": v1_files(2 * GiB, 700 * MiB, cache=200 * MiB)}))
    cpu = detect_cpu_memory()
    assert (cpu.cgroup.version, cpu.cgroup.limit, cpu.cgroup.used) == (1, 2 * GiB, 500 * MiB)
    assert cpu.source == "cgroup limit" and cpu.budget == 2 * GiB - 500 * MiB - 256 * MiB


@pytest.mark.parametrize(
    "levels, binding, room",
    [
        # the ancestor with the smallest limit also has the least room
        ({"/a": (512 * MiB, 100 * MiB), "/a/b": (4 * GiB, 50 * MiB)}, "a", 412 * MiB),
        # a parent with a larger limit but almost full binds, not the child with the smaller limit (2038 MiB free)
        ({"/a": (4 * GiB, 3994 * MiB), "/a/b": (2 * GiB, 10 * MiB)}, "a", 102 * MiB),
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_tightest_ancestor_binds(tmp_path, use_root, levels, binding, room, version):
    files = v2_files if version == 2 else lambda limit, used: v1_files(limit, used)
    tree = {"/": v2_files("max", 0) if version == 2 else v1_files(2**63 - 4096, 0)}
    tree.update({path: files(str(limit) if version == 2 else limit, used) for path, (limit, used) in levels.items()})
    use_root(fake_root(tmp_path, version, tree))
    found = cgroup_memory()
    assert found.path.name == binding and found.room == room
    assert detect_cpu_memory().free == room


@pytest.mark.parametrize("version", [1, 2])
def test_no_limit_means_available_ram(tmp_path, use_root, version):
    files = v2_files("max", 100 * MiB) if version == 2 else v1_files(2**63 - 4096, 100 * MiB)
    use_root(fake_root(tmp_path, version, {"/x": files}, available=8 * GiB))
    assert cgroup_memory() is None
    cpu = detect_cpu_memory()
    assert cpu.source == "available RAM" and cpu.free == 8 * GiB
    assert cpu.budget == 8 * GiB - int(8 * GiB * 0.05)


def test_available_ram_below_the_limit_binds(tmp_path, use_root):
    use_root(fake_root(tmp_path, 2, {"/x": v2_files(str(16 * GiB), 0)}, available=3 * GiB))
    assert detect_cpu_memory().source == "available RAM"


def test_unreadable_files_mean_no_limit(tmp_path, use_root):
    root = tmp_path / "empty"
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text("MemAvailable: 1048576 kB\n")
    use_root(root)
    assert cgroup_memory() is None
    assert detect_cpu_memory().free == GiB


def test_explicit_cpu_budget_above_the_limit_warns_with_both_numbers(tmp_path, use_root):
    use_root(fake_root(tmp_path, 2, {"/x": v2_files(str(GiB), 0)}))
    with pytest.warns(UserWarning, match=r"`max_memory\['cpu'\]`=2\.0 GiB \(2147483648 bytes\).*cgroup limit.*1\.0 GiB \(1073741824 bytes\)"):
        assert get_max_memory({"cpu": "2GiB"}) == {"cpu": 2 * GiB}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_max_memory({"cpu": "500MiB"})  # below the limit: no warning


def test_table_says_where_the_budget_came_from(tmp_path, use_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    use_root(fake_root(tmp_path, 2, {"/x": v2_files(str(GiB), 0)}))
    model = meta_gpt("tiny")
    device_map = infer_device_map(model)
    table = render_table(device_map, compute_module_sizes(model), get_max_memory(None), budget_sources(None))
    assert "cgroup limit" in table.splitlines()[-2]
    use_root(fake_root(tmp_path / "other", 2, {"/x": v2_files("max", 0)}))
    assert budget_sources(None) == {"cpu": "available RAM"}
    assert budget_sources({"cpu": 10}) == {"cpu": "max_memory"}


def test_limit_smaller_than_largest_layer_fails_before_loading(tmp_path, use_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from examples.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64)
    block_bytes = compute_module_sizes(GPT(config))["transformer.h.0"]  # the largest layer (wte is smaller)
    use_root(fake_root(tmp_path, 2, {"/x": v2_files(str(block_bytes // 2 + 4096), 4096)}))
    save_file({k: v for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "m.safetensors"))
    with init_empty_weights():
        model = GPT(config)
    limit = block_bytes // 2 + 4096
    pattern = rf"cgroup limit .*\({limit} bytes.*less than the largest layer .*`transformer\.h\.\d` .*{block_bytes} bytes"
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint_and_dispatch(
            model, tmp_path / "m.safetensors", max_memory=None, no_split_module_classes=["Block"],
            offload_folder=tmp_path / "offload",
        )  # fmt: skip
    assert all(p.is_meta for p in model.parameters())
    assert not (tmp_path / "offload").exists()


# ---------------------------------------------------------------------------------------------- a real cgroup
def _memory_hierarchy() -> tuple[int, Path] | None:
    """A writable memory cgroup hierarchy of this machine: ``(version, mount point)``, else ``None``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fstype, options = line.split(" - ", 1)[1].split()[0], line.split(" - ", 1)[1].split()[-1]
        point = Path(line.split()[4])
        if fstype == "cgroup" and "memory" in options.split(","):
            return 1, point
        if fstype == "cgroup2" and "memory" in (point / "cgroup.subtree_control").read_text().split():
            return 2, point
    return None


@pytest.fixture
def memory_cgroup():
    """A fresh child memory cgroup (removed afterwards), or a skip saying why none can be made here."""
    found = _memory_hierarchy() if sys.platform.startswith("linux") else None
    if found is None:
        pytest.skip("no memory cgroup hierarchy is mounted with the memory controller enabled")
    version, point = found
    directory = point / f"lbm-test-{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create a memory cgroup under {point} ({err}); run as root to test a real limit")
    try:
        yield version, directory
    finally:  # the kernel frees a cgroup a moment after its last process exits: retry a few times
        for _ in range(50):
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_in_cgroup(directory: Path, code: str, *args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -c code args`` from the repository root inside the cgroup ``directory``: the shell joins the cgroup,
    then becomes the interpreter, so nothing of the child runs outside the limit."""
    command = f'echo $$ > "{directory / "cgroup.procs"}" && exec "$@"'
    return subprocess.run(
        ["sh", "-c", command, "sh", sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **env},
    )  # fmt: skip


_PROBE = (
    "import json; from lightning_bigmodel.planning.budget import detect_cpu_memory, get_max_memory; "
    "c = detect_cpu_memory(); print(json.dumps({'source': c.source, 'budget': c.budget, "
    "'limit': c.cgroup.limit if c.cgroup else None, 'cpu': get_max_memory(None)['cpu']}))"
)


def test_real_cgroup_limit_is_detected_in_a_subprocess(memory_cgroup):
    version, directory = memory_cgroup
    limit = 768 * MiB
    (directory / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(limit))
    # The child moves itself into the cgroup before Python starts, so nothing runs outside the limit.
    command = f'echo $$ > "{directory / "cgroup.procs"}" && exec "{sys.executable}" -c "{_PROBE}"'
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["source"] == "cgroup limit"
    assert abs(probe["limit"] - limit) < 2**16  # the kernel rounds to pages
    # Two readings of the cgroup's live usage, moments apart: the child allocates between them (imports), so the
    # budgets agree to within that, not to the byte.
    assert 0 < probe["budget"] < limit - 256 * MiB and abs(probe["cpu"] - probe["budget"]) < 16 * MiB


_PRESSURE = r'''
import json, mmap, os, sys, torch
from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from lightning_bigmodel.offload import pages
checkpoint, control_path = sys.argv[1:3]
with init_empty_weights():
    model = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=4, n_head=4, n_embd=512))
load_checkpoint_and_dispatch(model, checkpoint, device_map={"": "cpu"})
with open(control_path, "rb") as f:  # an unlocked view of another file: what pressure evicts
    control = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
with torch.inference_mode():
    model(torch.zeros(1, 8, dtype=torch.long))  # warm-up: the weights fault in (and are locked)
control.sum()
before = pages.resident_fraction(control)
from lightning_bigmodel.planning.cgroup import cgroup_memory
room = cgroup_memory().room  # what anonymous memory may still take: file pages must make way for it
pressure = bytearray(room - 8 * 2**20)  # zero-filled: every page touched
weights = {id(p): p for p in model.parameters()}.values()
print(json.dumps({"control_before": before, "control_after": pages.resident_fraction(control),
                  "weights": min(pages.resident_fraction(p) for p in weights)}))
'''


def test_cpu_weights_survive_memory_pressure_in_a_real_cgroup(memory_cgroup, tmp_path):
    from examples.gpt import GPT, GPTConfig

    version, directory = memory_cgroup
    torch.manual_seed(0)
    state = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=4, n_head=4, n_embd=512)).state_dict()
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, str(tmp_path / "model.safetensors"))
    (tmp_path / "control").write_bytes(os.urandom(32 * MiB))
    for name in ("model.safetensors", "control"):  # dropped from the cache: the child's reads are charged to its cgroup
        fd = os.open(tmp_path / name, os.O_RDONLY)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    # 768 MiB: the CUDA build of torch imports with ~266 MiB of anonymous memory (the CPU build with far less), and
    # 640 MiB got the child OOM-killed there; the pressure below fills whatever room the limit leaves.
    (directory / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(768 * MiB))
    args = [str(tmp_path / name) for name in ("model.safetensors", "control")]
    done = run_in_cgroup(directory, _PRESSURE, *args, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["control_before"] == 1.0 and probe["control_after"] < 0.5, probe  # the pressure was real
    assert probe["weights"] == 1.0, probe  # locked weights were not evicted
