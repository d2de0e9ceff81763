"""ResumablePredictionWriter and read_predictions: chunk files, atomic writes, resume, exactly-once reading."""

import json
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_bigmodel.pl import _chunks
from lightning_bigmodel.pl.writers import (
    PredictionFolderError,
    ResumablePredictionWriter,
    ResumableSampler,
    read_predictions,
)

N, FEATURES = 10, 5


class Indexed(Dataset):
    """Returns ``(index, x)`` so a model can record which samples it was given."""

    def __init__(self, n: int = N) -> None:
        self.x = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return i, self.x[i]


class Job(pl.LightningModule):
    def __init__(self, output: str = "tensor", fail_at_batch: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(FEATURES, 3)
        self.output, self._fail_at_batch, self.seen = output, fail_at_batch, []  # the crash is no job argument

    def predict_step(self, batch, batch_idx):
        if batch_idx == self._fail_at_batch:
            raise RuntimeError("simulated crash")
        idx, x = batch
        self.seen += idx.tolist()
        y = self.net(x)
        if self.output == "dict":
            return {"y": y, "arg": y.argmax(-1)}
        if self.output == "list":
            return [f"label-{int(i)}" for i in y.argmax(-1)]
        if self.output == "bad":
            return y[:1]
        return y


def expected(dataset: Indexed) -> torch.Tensor:
    with torch.no_grad():
        return Job().net(dataset.x)


def predict(writer, dataset, job=None, use_sampler=True, batch_size=4):
    sampler = writer.sampler(dataset) if use_sampler else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )
    job = job or Job()
    trainer.predict(job, loader, return_predictions=False)
    return job


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_chunk_names_and_round_trip(tmp_path):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset)
    assert names(tmp_path) == [
        "chunk-000000000-000000003-r0.safetensors",
        "chunk-000000004-000000007-r0.safetensors",
        "chunk-000000008-000000009-r0.safetensors",
        "manifest.json",
    ]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    head = {k: manifest[k] for k in ("format", "job_id", "num_samples")}
    assert head == {"format": 2, "job_id": "j", "num_samples": N}
    assert manifest["fingerprint"]["module"] == {"class": f"{__name__}.Job", "output": "tensor"}
    assert manifest["fingerprint"]["data"]["num_samples"] == N
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


def test_chunk_size_buffers_batches(tmp_path):
    dataset = Indexed(N * 2)
    predict(ResumablePredictionWriter(tmp_path, chunk_size=3), dataset)
    chunks = [n for n in names(tmp_path) if n.startswith("chunk-")]
    assert chunks == ["chunk-000000000-000000011-r0.safetensors", "chunk-000000012-000000019-r0.safetensors"]
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


@pytest.mark.parametrize("output", ["dict", "list"])
def test_dict_and_list_predictions(tmp_path, output):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path), dataset, Job(output))
    got, ref = read_predictions(tmp_path), expected(dataset)
    if output == "dict":
        torch.testing.assert_close(got["y"], ref)
        assert torch.equal(got["arg"], ref.argmax(-1))
    else:
        assert any(n.endswith(".pt") for n in names(tmp_path))
        assert got == [f"label-{int(i)}" for i in ref.argmax(-1)]


def test_atomic_write_success_and_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    _chunks._atomic_write(target, b"abc")
    assert names(tmp_path) == ["f.bin"] and target.read_bytes() == b"abc"

    def broken_commit(tmp, final):
        raise OSError("disk full")

    monkeypatch.setattr(_chunks, "_commit", broken_commit)
    with pytest.raises(OSError, match="disk full"):
        _chunks._atomic_write(tmp_path / "g.bin", b"xyz")
    assert names(tmp_path) == ["f.bin"]  # no temp file, no half-written final file


def test_resume_skips_done_indices_and_removes_tmp(tmp_path):
    dataset = Indexed()
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset, Job(fail_at_batch=2))
    (tmp_path / ".chunk-000000008-000000009-r0.safetensors.123.tmp").write_bytes(b"torn")
    (tmp_path / "notes.txt").write_text("user file")  # not ours: left alone

    job = predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset)
    assert job.seen == [8, 9]  # done samples are not even loaded
    assert not any(n.endswith(".tmp") for n in names(tmp_path)) and "notes.txt" in names(tmp_path)
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))

    job = predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset)  # finished job: nothing to do
    assert job.seen == []
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


def test_resume_without_sampler_drops_done_samples(tmp_path):
    dataset = Indexed()
    with pytest.raises(RuntimeError):
        predict(ResumablePredictionWriter(tmp_path), dataset, Job(fail_at_batch=1))
    with pytest.warns(UserWarning, match="writer.sampler"):
        job = predict(ResumablePredictionWriter(tmp_path), dataset, use_sampler=False, batch_size=3)
    assert job.seen == list(range(N))  # recomputed, but written once
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


def test_sampler_pads_so_every_rank_gets_a_sample(tmp_path):
    writer = ResumablePredictionWriter(tmp_path)
    writer._done, writer._world_size = frozenset(range(8)), 4
    assert list(ResumableSampler(writer, range(N))) == [8, 9, 0, 1]


def test_other_job_is_refused_and_left_untouched(tmp_path):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path, job_id="a"), dataset)
    before = {n: (tmp_path / n).read_bytes() for n in names(tmp_path)}
    with pytest.raises(PredictionFolderError, match=r"belongs to job 'a'.*not 'b'.*`overwrite: true`") as err:
        predict(ResumablePredictionWriter(tmp_path, job_id="b"), dataset)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(PredictionFolderError, match=f"written for {N} samples, but the dataset has {N + 2}"):
        predict(ResumablePredictionWriter(tmp_path, job_id="a"), Indexed(N + 2))
    assert {n: (tmp_path / n).read_bytes() for n in names(tmp_path)} == before

    bigger = Indexed(N + 2)
    predict(ResumablePredictionWriter(tmp_path, job_id="b", overwrite=True), bigger)
    torch.testing.assert_close(read_predictions(tmp_path), expected(bigger))


def test_bad_prediction_shape_names_the_batch(tmp_path):
    with pytest.raises(ValueError, match=r"leading sizes \[1\] for batch 0 of 4 samples"):
        predict(ResumablePredictionWriter(tmp_path), Indexed(), Job("bad"))


def write_chunk(folder, name, indices, values):
    save_file({"indices": torch.tensor(indices), "prediction": torch.tensor(values, dtype=torch.float32)},
              folder / name, metadata={"kind": "tensor"})


def test_read_predictions_orders_by_index(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "job_id": "x", "num_samples": 6}))
    write_chunk(tmp_path, "chunk-000000001-000000005-r1.safetensors", [1, 3, 5], [10.0, 30.0, 50.0])
    write_chunk(tmp_path, "chunk-000000000-000000004-r0.safetensors", [4, 0, 2], [40.0, 0.0, 20.0])
    assert read_predictions(tmp_path).tolist() == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_read_predictions_detects_gaps_and_duplicates(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "job_id": "x", "num_samples": 6}))
    write_chunk(tmp_path, "chunk-000000000-000000002-r0.safetensors", [0, 1, 2], [0.0, 1.0, 2.0])
    with pytest.raises(PredictionFolderError, match=r"no prediction for indices \[3, 4, 5\]"):
        read_predictions(tmp_path)
    write_chunk(tmp_path, "chunk-000000002-000000005-r1.safetensors", [2, 3, 4, 5], [2.0, 3.0, 4.0, 5.0])
    with pytest.raises(PredictionFolderError, match=r"more than one prediction for indices \[2\].*r0.*r1"):
        read_predictions(tmp_path)
    with pytest.raises(PredictionFolderError, match=r"outside 0..3: \[4, 5\]"):
        read_predictions(tmp_path, num_samples=4)


def test_corrupt_chunk_is_named(tmp_path):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path), dataset)
    bad = tmp_path / "chunk-000000004-000000007-r0.safetensors"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(PredictionFolderError, match="chunk-000000004-000000007-r0.safetensors.*delete the file"):
        read_predictions(tmp_path)


def test_invalid_chunk_size():
    with pytest.raises(ValueError, match="`chunk_size`.*0"):
        ResumablePredictionWriter("unused", chunk_size=0)


def test_empty_folder_reads_clearly(tmp_path):
    with pytest.raises(PredictionFolderError, match="no prediction chunks"):
        read_predictions(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ResumablePredictionWriter(tmp_path / "new").done_indices() == frozenset()


def test_buffered_batches_are_flushed_on_exception(tmp_path):
    dataset = Indexed()
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict(ResumablePredictionWriter(tmp_path, chunk_size=2), dataset, Job(fail_at_batch=1))
    assert [n for n in names(tmp_path) if n.startswith("chunk-")] == ["chunk-000000000-000000003-r0.safetensors"]
    job = predict(ResumablePredictionWriter(tmp_path, chunk_size=2), dataset)
    assert job.seen == list(range(4, N))
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


# ---------------------------------------------------------------------------------------------- error paths
def _trainer(writer) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, callbacks=[writer], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip


class TwoLoaderJob(Job):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return super().predict_step(batch, batch_idx)


def test_several_dataloaders_are_refused_before_any_batch(tmp_path):
    job, dataset = TwoLoaderJob(), Indexed()
    loaders = [DataLoader(dataset, batch_size=4), DataLoader(dataset, batch_size=4)]
    with pytest.raises(ValueError, match=r"exactly one `torch.utils.data.DataLoader`.*\['DataLoader', 'DataLoader'\]"):
        _trainer(ResumablePredictionWriter(tmp_path)).predict(job, loaders, return_predictions=False)
    assert job.seen == [] and not list(tmp_path.glob("chunk-*"))


class Stream(IterableDataset):
    def __iter__(self):
        dataset = Indexed()
        return (dataset[i] for i in range(len(dataset)))


def test_data_without_indices_is_refused(tmp_path):
    job = Job()
    with pytest.raises(ValueError, match=r"needs a map-style dataset \(with `__len__`\), got Stream"):
        _trainer(ResumablePredictionWriter(tmp_path)).predict(job, DataLoader(Stream(), batch_size=4),
                                                              return_predictions=False)  # fmt: skip
    assert job.seen == [] and not list(tmp_path.glob("chunk-*"))
    writer = ResumablePredictionWriter(tmp_path)  # and a batch that comes without indices all the same
    with pytest.raises(ValueError, match="no sample indices for predict batch 3.*map-style dataset"):
        writer.write_on_batch_end(None, job, torch.zeros(4, 3), None, None, 3, 0)


def test_chunks_without_a_manifest_are_refused_and_kept(tmp_path):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path, job_id="a"), dataset)
    (tmp_path / "manifest.json").unlink()  # someone else's chunks, or a folder copied without it
    chunks = {n: (tmp_path / n).read_bytes() for n in names(tmp_path)}
    assert len(chunks) == 3  # 10 samples in batches of 4
    with pytest.raises(PredictionFolderError, match=r"holds 3 chunk files but no manifest\.json.*`overwrite: true`"):
        predict(ResumablePredictionWriter(tmp_path, job_id="a"), dataset)
    assert {n: (tmp_path / n).read_bytes() for n in names(tmp_path)} == chunks  # nothing deleted or added
    predict(ResumablePredictionWriter(tmp_path, job_id="a", overwrite=True), dataset)
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


# ---------------------------------------------------------------------- a job is what decides its outputs
class Scaled(Job):
    """A job with hyperparameters: ``scale`` changes the outputs, ``batch_size`` does not."""

    def __init__(self, scale: float = 1.0, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def predict_step(self, batch, batch_idx):
        return super().predict_step(batch, batch_idx) * self.hparams.scale


def rank_zero_lines(caplog):
    return [r.getMessage() for r in caplog.records if "ResumablePredictionWriter" in r.getMessage()]


def test_rerun_with_other_arguments_is_refused_naming_them(tmp_path):
    dataset = Indexed()
    predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset, Scaled(1.0))
    before = {n: (tmp_path / n).read_bytes() for n in names(tmp_path)}
    with pytest.raises(PredictionFolderError) as err:
        predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset, Scaled(2.0))
    message = str(err.value)
    assert "another job: the module's arguments (scale: 1.0 -> 2.0) changed" in message
    assert "`overwrite: true`" in message and "another `output_dir`" in message and "\n" not in message
    assert {n: (tmp_path / n).read_bytes() for n in names(tmp_path)} == before  # refused before any write

    predict(ResumablePredictionWriter(tmp_path, job_id="j"), dataset, Scaled(1.0, batch_size=3))  # same outputs
    predict(ResumablePredictionWriter(tmp_path, job_id="j", overwrite=True), dataset, Scaled(2.0))
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset) * 2)


def test_rerun_on_other_data_of_the_same_length_is_refused(tmp_path):
    dataset, other = Indexed(), Indexed()
    other.x = other.x.flip(0)
    with pytest.raises(RuntimeError, match="simulated crash"):  # half done, then the data changes
        predict(ResumablePredictionWriter(tmp_path), dataset, Job(fail_at_batch=1))
    with pytest.raises(PredictionFolderError, match=r"another job: the data \(samples: 'all samples, sha256 \w+' ->"):
        predict(ResumablePredictionWriter(tmp_path), other)
    with pytest.raises(PredictionFolderError, match=r"another job: the data"):  # without the sampler too
        predict(ResumablePredictionWriter(tmp_path), other, use_sampler=False)
    job = predict(ResumablePredictionWriter(tmp_path), dataset)
    assert job.seen == list(range(4, N))
    torch.testing.assert_close(read_predictions(tmp_path), expected(dataset))


def test_matching_rerun_says_what_is_done_and_what_is_left(tmp_path, caplog):
    dataset = Indexed()
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict(ResumablePredictionWriter(tmp_path), dataset, Job(fail_at_batch=2))
    caplog.clear()
    with caplog.at_level("INFO"):
        predict(ResumablePredictionWriter(tmp_path), dataset)
    assert rank_zero_lines(caplog) == [
        f"`ResumablePredictionWriter`: {str(tmp_path)!r}: 8 of {N} samples already done; predicting the remaining 2."
    ]
    caplog.clear()
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = predict(ResumablePredictionWriter(tmp_path), dataset)
    assert job.seen == []
    assert rank_zero_lines(caplog) == [
        f"`ResumablePredictionWriter`: {str(tmp_path)!r}: all {N} samples already done; nothing to predict."
    ]
    assert not [w for w in caught if "across ranks is zero" in str(w.message)]  # in place of Lightning's warning
    with warnings.catch_warnings(record=True) as caught:  # the filter is gone after the run
        warnings.simplefilter("default")
        warnings.warn("Total length of `DataLoader` across ranks is zero. Please make sure this was your intention.")
    assert len(caught) == 1


def test_checkpoint_identity_sees_a_replaced_file_of_the_same_size_and_time(tmp_path):
    from lightning_bigmodel.pl._fingerprint import checkpoint_part, describe_change

    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"w": torch.ones(4)}, folder / "model.safetensors")
    first = checkpoint_part(folder)
    stat = (folder / "model.safetensors").stat()
    save_file({"w": torch.zeros(4)}, tmp_path / "new.safetensors")  # same size; moved in with the old times
    (tmp_path / "new.safetensors").replace(folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = checkpoint_part(folder)
    assert first["path"] == second["path"] == str(folder.resolve())
    assert describe_change({"checkpoint": first}, {"checkpoint": second}) == (
        f"the checkpoint (same path {str(folder.resolve())!r}, but its files' sizes, inodes or times differ)"
    )
    assert checkpoint_part("org/not-local") == {"path": "org/not-local", "files": None}
