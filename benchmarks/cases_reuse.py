"""What verifying a reused offload folder costs: a ``.bin`` GPT loaded with every weight on disk, the folder written
once, then reloaded with the checksums verified (ours, as shipped) and without (``verify_checksums = False``, the time
the check adds is the difference). The load returns before the checks end (each module waits for its files' checks at
its first forward), so the time to the first output, load plus one forward, is recorded too. Runs inside a fresh worker process (see ``benchmarks.worker``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.cases import make_inputs
from benchmarks.measure import folder_bytes
from examples.gpt import GPT, GPTConfig


def _load(spec: dict[str, Any]) -> tuple[torch.nn.Module, float]:
    from lightning_bigmodel import init_empty_weights, load_checkpoint_in_model

    with init_empty_weights():
        model = GPT(GPTConfig.preset(spec["size"])).eval()
    start = time.perf_counter()
    load_checkpoint_in_model(model, spec["ckpt"], device_map={"": "disk"}, offload_folder=spec["offload_dir"])
    return model, time.perf_counter() - start


def run_reuse(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import lightning_bigmodel.checkpoint  # noqa: F401 (before the offload folder: the package imports it in order)
    from lightning_bigmodel.offload.disk import OffloadFolder

    result["stage"] = "write"
    model, result["write_s"] = _load(spec)
    result["offload_bytes"] = folder_bytes(spec["offload_dir"])
    inputs = make_inputs(GPTConfig.preset(spec["size"]))["decode"]
    with torch.inference_mode():
        expected = model(inputs)
    del model
    result["stage"] = "reuse"
    times = {True: [], False: []}
    ready = {True: [], False: []}  # the load plus the first forward (it waits for the checks the load left running)
    for _ in range(spec.get("rounds", 3)):  # alternated, so drift on a shared machine hits both alike
        for verify in (False, True):
            OffloadFolder.verify_checksums = verify
            start = time.perf_counter()
            model, seconds = _load(spec)
            times[verify].append(seconds)
            with torch.inference_mode():
                outputs = model(inputs)
            ready[verify].append(time.perf_counter() - start)
            if not torch.equal(outputs, expected):
                raise AssertionError(f"reused folder gave other outputs (verify={verify})")
            del model
    OffloadFolder.verify_checksums = True
    result["reuse_s"], result["reuse_unverified_s"] = min(times[True]), min(times[False])
    result["verify_cost_s"] = result["reuse_s"] - result["reuse_unverified_s"]
    result["reuse_ready_s"], result["reuse_unverified_ready_s"] = min(ready[True]), min(ready[False])
