"""LightningModules and helpers for the Lightning-integration tests (tiny GPT, checkpoints in ``tmp_path``)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from examples.gpt import GPT, GPTConfig
from lightning_bigmodel import BigModelInferenceStrategy
from lightning_bigmodel.checkpoint.writer import save_sharded_checkpoint

PRESET = "tiny"


def plain_gpt(seed: int = 0) -> GPT:
    """The reference: a GPT built and initialised plainly (real weights, eval mode)."""
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset(PRESET)).eval()


def tokens(n: int = 6, t: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPTConfig.preset(PRESET).vocab_size, (n, t), generator=g)


def token_loader(data: Optional[torch.Tensor] = None, batch_size: int = 3) -> DataLoader:
    return DataLoader(TensorDataset(tokens() if data is None else data), batch_size=batch_size)


def write_bare_checkpoint(folder: Path, model: torch.nn.Module, safe: bool = True, shard: int = 20_000) -> Path:
    """Bare-network (HF/accelerate-style) sharded checkpoint of ``model``; returns the folder."""
    save_sharded_checkpoint(model, folder, max_shard_size=shard, safe_serialization=safe)
    return folder


class GPTModule(pl.LightningModule):
    """Holds the network as ``self.model``, built in ``configure_model`` (idempotent)."""

    def __init__(self, mode: str = "logits", max_new_tokens: int = 4) -> None:
        super().__init__()
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.model: Optional[GPT] = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = GPT(GPTConfig.preset(PRESET))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def predict_step(self, batch, batch_idx: int):
        (idx,) = batch
        if self.mode == "generate":
            return self.model.generate(idx, max_new_tokens=self.max_new_tokens)
        return self.model(idx)


class PlainGPTModule(GPTModule):
    """The same module with real weights built in ``__init__`` (for stock-Lightning references and ``.ckpt``)."""

    def __init__(self, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = plain_gpt(seed)


def bigmodel_trainer(strategy: Optional[BigModelInferenceStrategy] = None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    return pl.Trainer(strategy=strategy if strategy is not None else BigModelInferenceStrategy(), **kwargs)


def stock_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, **kwargs)  # fmt: skip


@torch.no_grad()
def reference_outputs(data: Optional[torch.Tensor] = None, batch_size: int = 3) -> list[torch.Tensor]:
    model = plain_gpt()
    data = tokens() if data is None else data
    return [model(chunk) for chunk in data.split(batch_size)]


def assert_same(outputs, expected, atol: float = 1e-5) -> None:
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@contextmanager
def predicted_on_simulated_gpus(tmp_path: Path, max_memory: dict, caplog, gpus: int = 2) -> Iterator[tuple]:
    """``Trainer.predict`` of the tiny GPT's checkpoint on ``gpus`` simulated GPUs, planned under ``max_memory`` with
    ``Block`` kept whole and a :class:`DeviceMapCallback` (the run's INFO lines captured by ``caplog``). Yields
    ``(callback, module, outputs, checkpoint)`` while the simulation is still on, so the dispatched model can be
    inspected."""
    from lightning_bigmodel import DeviceMapCallback
    from lightning_bigmodel.simulate import simulated_gpus

    checkpoint = write_bare_checkpoint(tmp_path / "ckpt", plain_gpt())
    with simulated_gpus(gpus):
        strategy = BigModelInferenceStrategy(max_memory=max_memory, no_split_module_classes=["Block"])
        callback = DeviceMapCallback()
        trainer = pl.Trainer(accelerator="gpu", devices=gpus, strategy=strategy, callbacks=[callback], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
        module = GPTModule()
        with caplog.at_level(logging.INFO):
            outputs = trainer.predict(module, token_loader(), ckpt_path=str(checkpoint))
        yield callback, module, outputs, checkpoint
