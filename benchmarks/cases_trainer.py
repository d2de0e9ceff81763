"""The ``Trainer.predict`` case: a small LightningModule around GPT, run with ``BigModelInferenceStrategy``.

One ``predict`` call sees, in order: one decode batch (time to first output), the decode warm-up and timed
batches, then the prefill ones. A callback takes the times: load = Trainer construction to the first
``on_predict_batch_start`` (the model is built, loaded and dispatched by then), forwards = per batch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.cases import GPU_MAPS, NO_SPLIT, compare, make_inputs, map_arguments, map_summary
from benchmarks.measure import MemorySampler, folder_bytes, read_status
from examples.gpt import GPT, GPTConfig


def _module_class():
    import lightning as L

    class GPTPredictor(L.LightningModule):
        """Builds the network in ``configure_model`` (meta under the strategy); ``predict_step`` returns logits."""

        def __init__(self, size: str) -> None:
            super().__init__()
            self.size = size
            self.model = None

        def configure_model(self) -> None:
            if self.model is None:
                self.model = GPT(GPTConfig.preset(self.size))

        def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.model(batch)

    return GPTPredictor


def _probe_class():
    from lightning.pytorch.callbacks import Callback

    class Probe(Callback):
        """Records load end, first output, per-batch forward times and the outputs worth comparing."""

        def __init__(self, start: float, sampler: MemorySampler, result: dict, labels: list, sync) -> None:
            self.start, self.sampler, self.result, self.labels, self.sync = start, sampler, result, labels, sync
            self.times: dict[str, list[float]] = {}
            self.outputs: dict[str, torch.Tensor] = {}
            self._t = 0.0

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            if batch_idx == 0:
                # the strategy may load in its own on_predict_start, which runs after the callbacks' one:
                # the load is everything up to the first batch.
                self.result["load_s"] = time.perf_counter() - self.start
                self.result.update(self.sampler.stop())
                self.result["map_bytes"] = map_summary(pl_module.model) or map_summary(pl_module)
                self.result["stage"] = "first output"
            self._t = time.perf_counter()

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.sync()
            now = time.perf_counter()
            label = self.labels[batch_idx]
            if batch_idx == 0:
                self.result["first_output_s"] = now - self.start
                rss = read_status().get("VmRSS", 0)
                self.result["rss_after_first_output_growth"] = rss - self.sampler.baseline.get("VmRSS", 0)
                self.result["stage"] = "forward"
            if label.endswith(":keep"):
                self.outputs[label.split(":")[0]] = outputs.float().cpu()
            if label.endswith(":timed"):
                self.times.setdefault(label.split(":")[0], []).append(now - self._t)

    return Probe


def _batches(inputs: dict[str, torch.Tensor], plan: dict[str, list[int]]) -> tuple[list[torch.Tensor], list[str]]:
    batches, labels = [inputs["decode"]], ["decode:keep"]
    for shape, (warmup, iters) in plan.items():
        warmup = max(1, warmup)  # the first prefill output is the one compared
        labels += [f"{shape}:keep" if i == 0 and shape != "decode" else f"{shape}:warm" for i in range(warmup)]
        labels += [f"{shape}:timed"] * iters
        batches += [inputs[shape]] * (warmup + iters)
    return batches, labels


def run_trainer_case(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """``Trainer(strategy=BigModelInferenceStrategy(checkpoint=...)).predict`` over decode then prefill batches."""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_bigmodel import BigModelInferenceStrategy

    gpu = spec["map"] in GPU_MAPS
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    inputs = make_inputs(GPTConfig.preset(spec["size"]))
    batches, labels = _batches(inputs, spec.get("fwd") or {})
    module = _module_class()(spec["size"])
    result["stage"] = "load"
    sampler = MemorySampler().start()
    start = time.perf_counter()
    probe = _probe_class()(start, sampler, result, labels, sync)
    args = map_arguments(spec["map"], spec["model_bytes"])
    strategy = BigModelInferenceStrategy(
        device_map=args["device_map"],
        max_memory=args["max_memory"],
        no_split_module_classes=NO_SPLIT,
        offload_folder=spec["offload_dir"],
        checkpoint=spec["ckpt"],
    )
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        strategy=strategy,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(Path(spec["offload_dir"]).parent),  # device_map.json goes beside the case, not the cwd
    )
    trainer.predict(module, DataLoader(batches, batch_size=None), return_predictions=False)
    result["offload_folder"] = folder_bytes(spec.get("offload_dir"))
    for shape, times in probe.times.items():
        result[f"{shape}_s"] = statistics.median(times)
        result[f"{shape}_times_s"] = times
    result["stage"] = "compare"
    result["max_abs_diff"] = compare(probe.outputs, spec.get("ref_path", ""))
    result["stage"] = "done"
