"""ResumablePredictionWriter on a really full disk (a small tmpfs mount): the error names the folder and says that a
rerun resumes; nothing half-written is left; after space is freed, the rerun finishes the job exactly."""

from __future__ import annotations

import os
import subprocess

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bigmodel.pl.writers import PredictionFolderError, ResumablePredictionWriter, read_predictions

N, WIDTH = 16, 4096  # 16 KiB of float32 per sample: a 4-sample chunk is 64 KiB


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, WIDTH)
        self.seen = 0

    def predict_step(self, batch, batch_idx):
        self.seen += batch[0].shape[0]
        return self.net(batch[0])


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("160k")


def run(output_dir, dataset, module):
    writer = ResumablePredictionWriter(output_dir, job_id="wide")
    loader = DataLoader(dataset, batch_size=4, sampler=writer.sampler(dataset))
    trainer = pl.Trainer(accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.predict(module, loader, return_predictions=False)


def test_full_disk_names_the_folder_and_the_rerun_resumes_exactly(small_tmpfs):
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(N, 8))
    module = Wide()
    out = small_tmpfs / "preds"
    with pytest.raises(PredictionFolderError) as err:
        run(out, dataset, module)
    message = str(err.value)
    assert f"`output_dir` {str(out)!r}" in message and "No space left on device" in message
    assert "run the same job again, it resumes where it stopped" in message and "\n" not in message
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == 28
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.endswith(".tmp")], left  # no temporary file left
    written = [name for name in left if name.startswith("chunk-")]
    assert 0 < len(written) < N // 4, left  # some chunks made it, the rest did not fit

    subprocess.run(["mount", "-o", "remount,size=2m", str(small_tmpfs)], check=True)  # space freed
    module.seen = 0
    run(out, dataset, module)
    assert module.seen == N - 4 * len(written)  # only what was not written is predicted again
    with torch.no_grad():
        torch.testing.assert_close(read_predictions(out), module.net(dataset.tensors[0]))
    assert os.path.ismount(small_tmpfs)
