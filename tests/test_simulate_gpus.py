"""The simulated-GPU harness itself: devices, real values, CUDA-like errors, stand-ins, restore on exit, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from lightning_bigmodel.simulate import simulated_gpus

# Under CUDA these tests run in a CUDA-free process of their own (see simulated_isolation.py).


def test_tensors_report_simulated_gpus_and_compute_real_values():
    x = torch.randn(4, 3)
    with simulated_gpus(2) as gpus:
        assert torch.accelerator.current_accelerator(check_available=True).type == "simgpu"
        assert torch.accelerator.device_count() == torch.cuda.device_count() == 2
        on_gpu = x.to("simgpu:1")
        assert on_gpu.device == gpus.devices[1]
        assert on_gpu[1:3].device == gpus.devices[1]
        product = on_gpu @ on_gpu.T
        linear = nn.Linear(3, 2).to("simgpu:1")
        assert linear.weight.device == gpus.devices[1]
        out = linear(on_gpu)
        assert torch.equal(product.cpu(), x @ x.T)
        torch.testing.assert_close(out.cpu(), nn.functional.linear(x, linear.weight.cpu(), linear.bias.cpu()))
        assert on_gpu.sum().item() == pytest.approx(x.sum().item())
        assert on_gpu.tolist() == x.tolist()


def test_mixing_devices_raises_like_cuda():
    with simulated_gpus(2):
        a = torch.ones(3, device="simgpu:0")
        with pytest.raises(RuntimeError, match="same device.*simgpu:0 and simgpu:1"):
            a + torch.ones(3, device="simgpu:1")
        with pytest.raises(RuntimeError, match="same device.*cpu and simgpu:0"):
            a + torch.ones(3)
        assert torch.equal((a * torch.tensor(2.0)).cpu(), torch.full((3,), 2.0))  # 0-dim CPU tensors are scalars
        assert torch.equal(a[torch.tensor([0, 2])].cpu(), torch.ones(2))  # CPU index tensors are allowed


def test_cuda_only_kernels_are_stood_in_for():
    with simulated_gpus(1):
        experts = torch.tensor([0, 1, 1, 3], dtype=torch.int32, device="simgpu:0")
        counts = torch.histc(experts, bins=4, min=0, max=3)  # integer histc: CUDA has it, the CPU kernel not
        assert counts.device == experts.device and counts.dtype == torch.int32
        assert counts.tolist() == [1, 2, 0, 1]


def test_literal_cuda_devices_map_onto_the_simulation():
    with simulated_gpus(2) as gpus:
        assert torch.zeros(2, device="cuda:1").device == gpus.devices[1]
        assert torch.arange(3, device="cuda").device == gpus.devices[0]
        assert torch.tensor([1, 2], device=torch.device("cuda", 1)).device == gpus.devices[1]
        assert torch.ones(2).cuda(1).device == gpus.devices[1]
        assert torch.ones(2).to("cuda:1").device == gpus.devices[1]
        assert torch.equal(torch.tensor([1, 2], device="cuda:1").cpu(), torch.tensor([1, 2]))
        with pytest.raises(RuntimeError, match="simgpu:3 does not exist.*2 GPU"):
            torch.zeros(1, device="cuda:3")


def test_memory_is_counted_per_gpu_and_runs_out_like_cuda():
    with simulated_gpus(2, memory_per_gpu="1MiB") as gpus:
        assert torch.cuda.mem_get_info(0) == (2**20, 2**20)
        kept = torch.empty(1000, dtype=torch.float32, device="simgpu:0")
        assert gpus.memory_allocated(0) == 4000 and gpus.memory_allocated(1) == 0
        assert torch.cuda.mem_get_info(0) == (2**20 - 4000, 2**20)
        del kept
        assert gpus.memory_allocated(0) == 0 and gpus.max_memory_allocated(0) == 4000
        with pytest.raises(torch.OutOfMemoryError, match="simgpu:1 out of memory"):
            torch.empty(2**20 + 1, dtype=torch.uint8, device="simgpu:1")


def test_pinning_streams_and_events_are_stood_in_for_and_logged():
    with simulated_gpus(2) as gpus:
        pinned = torch.empty(8, pin_memory=True)
        assert pinned.is_pinned() and not torch.empty(8).is_pinned()
        also = torch.ones(4).pin_memory()
        assert also.is_pinned() and gpus.pinned_bytes() == 8 * 4 + 4 * 4
        del also
        assert gpus.pinned_bytes() == 8 * 4
        side = torch.Stream(device="simgpu:1")
        gpus.clear_log()
        with side:
            copy = pinned.to("simgpu:1", non_blocking=True)
            event = torch.Event()
            event.record()
        compute = torch.accelerator.current_stream(1)
        compute.wait_event(event)
        copy.record_stream(compute)
        kinds = [(r.kind, r.device, r.stream, r.detail) for r in gpus.log]
        assert kinds == [
            ("set_device", 1, 0, ""),  # entering a stream makes its device current, as CUDA does
            ("copy", 1, side.stream_id, "h2d pinned non_blocking"),
            ("record_event", 1, side.stream_id, str(event.sim_id)),
            ("set_device", 0, 0, ""),  # leaving it restores the device that was current
            ("wait_event", 1, 0, str(event.sim_id)),
            ("record_stream", 1, 0, ""),
        ]
        assert side.stream_id != 0 and compute.stream_id == 0


def test_current_device_and_stream_are_per_thread():
    with simulated_gpus(2):
        torch.cuda.set_device(1)
        seen = {}
        thread = threading.Thread(target=lambda: seen.update(device=torch.cuda.current_device()))
        thread.start()
        thread.join()
        assert torch.cuda.current_device() == 1 and seen["device"] == 0


def test_everything_is_restored_on_exit_even_when_the_body_raises():
    originals = (torch.cuda.is_available, torch.cuda.device_count, torch.Stream, torch.Event,
                 torch.accelerator.current_stream, torch.accelerator.get_memory_info)  # fmt: skip
    with pytest.raises(KeyError):
        with simulated_gpus(2):
            assert torch.cuda.is_available()
            raise KeyError("boom")
    assert (torch.cuda.is_available, torch.cuda.device_count, torch.Stream, torch.Event,
            torch.accelerator.current_stream, torch.accelerator.get_memory_info) == originals  # fmt: skip
    assert not torch.cuda.is_available()
    assert torch.accelerator.current_accelerator(check_available=True) is None
    assert torch.overrides._get_current_function_mode_stack() == []
    with pytest.raises(RuntimeError, match="only inside"):
        torch.zeros(1, device="simgpu:0")
    with simulated_gpus(1):  # usable again
        assert torch.accelerator.device_count() == 1


@pytest.mark.parametrize("count", [0, -1, True, 1.5, "2"])
def test_bad_count_is_refused(count):
    with pytest.raises(ValueError, match=f"`count`={count!r}.*positive int"):
        with simulated_gpus(count):
            pass


def test_a_device_map_naming_a_gpu_beyond_the_simulated_count_is_refused():
    from lightning_bigmodel import dispatch_model

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with simulated_gpus(2):
        with pytest.raises(ValueError, match=r"\['1'\] on GPU 3 of 2 visible"):
            dispatch_model(model, {"0": 0, "1": 3})
        assert model[1].weight.device.type == "cpu"  # refused before anything moved


def test_bad_memory_and_nesting_are_refused():
    with pytest.raises(ValueError, match="`memory_per_gpu`='lots'"):
        with simulated_gpus(2, memory_per_gpu="lots"):
            pass
    with simulated_gpus(1):
        with pytest.raises(RuntimeError, match="already active"):
            with simulated_gpus(1):
                pass


_CUDA_MACHINE_CONFTEST = """
import os, sys
import torch
sys.path.insert(0, {tests!r})
if os.environ.get("CUDA_VISIBLE_DEVICES") != "":  # a machine with CUDA, as far as the isolation can tell
    torch.cuda.is_available = lambda: True
from simulated_isolation import (
    _simulated_gpus_in_a_cuda_free_process, pytest_runtest_logreport, pytest_sessionfinish,
)
"""

_SIMULATED_TESTS = """
import os
from lightning_bigmodel.simulate import _backend, simulated_gpus

def test_simulated_passes():
    with simulated_gpus(1):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""

def test_simulated_fails():
    with simulated_gpus(1):
        assert False, "planted failure"

def test_plain():
    assert _backend.STATE.active is False
"""


def test_under_cuda_simulated_tests_run_again_in_a_cuda_free_process(tmp_path):
    """Where CUDA is visible, entering the simulation skips the test (nothing registered in the CUDA process), and the
    session reruns those tests with CUDA hidden: their results decide the exit status."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "conftest.py").write_text(_CUDA_MACHINE_CONFTEST.format(tests=str(Path(__file__).parent)))
    (tmp_path / "test_sim.py").write_text(_SIMULATED_TESTS)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "PYTEST_XDIST_WORKER")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "test_sim.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = done.stdout
    assert "1 passed, 2 skipped" in out and "CUDA-free process" in out, out[-3000:]  # the CUDA process
    assert "2 simulated-GPU tests, rerun with CUDA hidden" in out, out[-3000:]
    assert "1 failed, 1 passed" in out and "planted failure" in out, out[-3000:]  # the rerun
    assert done.returncode == 1, out[-3000:]


def test_the_sanitizer_plugin_pushes_its_mode_in_every_new_thread(monkeypatch):
    """The mechanism of tests/csan_all_threads.py, with a recording dispatch mode standing in for CUDA's sanitizer:
    worker threads (a thread pool's too, as the prefetcher's) run under the mode; the thread that pushed it is left."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils._python_dispatch import TorchDispatchMode

    import csan_all_threads

    seen = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((threading.current_thread().name, func.__name__))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(threading.Thread, "run", threading.Thread.run)  # put back afterwards
    csan_all_threads.push_in_every_thread(Recording())
    worker = threading.Thread(target=lambda: torch.ones(2) + 1, name="worker")
    worker.start()
    worker.join()
    with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
        pool.submit(lambda: torch.ones(2) * 2).result()
    torch.ones(2) - 1  # this thread: not watched
    threads = {name for name, _ in seen}
    assert "worker" in threads and any(name.startswith("pool") for name in threads) and "MainThread" not in threads
