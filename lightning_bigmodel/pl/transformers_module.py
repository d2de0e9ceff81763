"""TransformersModule: a no-code LightningModule for batch jobs over a transformers model (local folder or Hub id).

::

    lightning-bigmodel predict --config configs/transformers_generate.yaml

The network is built on meta from its config in ``configure_model``; the checkpoint is streamed in by
:class:`~lightning_bigmodel.pl.strategy.BigModelInferenceStrategy` (whose ``checkpoint`` this module fills in);
results go to whatever prediction writer the Trainer has
(:class:`~lightning_bigmodel.pl.writers.ResumablePredictionWriter` makes a killed job resume). transformers is
imported only when the module is used.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from lightning_bigmodel._hub import can_be_repo_id, hub_snapshot, only_local_not_found
from lightning_bigmodel.pl import _transformers_tasks as tasks
from lightning_bigmodel.pl._tiny_random import DEMO_FOLDERS
from lightning_bigmodel.pl.callback import DeviceMapCallback
from lightning_bigmodel.pl.prompts import Prompt, read_prompts
from lightning_bigmodel.pl.strategy import BigModelInferenceStrategy
from lightning_bigmodel.pl.writers import ResumablePredictionWriter

Task = Literal["generate", "embed", "logits"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Pooling = Literal["mean", "cls", "last"]
_LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
# From a Hub repo: the config, tokenizer and index files, then the weights (safetensors, else pickles).
_HUB_SMALL_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken")
_HUB_WEIGHTS = (("*.safetensors",), ("*.bin", "*.pt", "*.pth"))


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"`{name}` {value!r} is not one of {', '.join(map(repr, choices))}.{hint}")


def is_local_path(name: str) -> bool:
    """Whether ``name`` can only be a local path (``./x``, ``../x``, ``/x``, ``~/x``), never a Hub id."""
    return name.startswith(_LOCAL_PREFIXES) or Path(name).expanduser().exists() or not can_be_repo_id(name)


class TransformersModule(LightningModule):
    """Generate, embed or score every prompt of a file with a transformers model, under ``strategy: bigmodel``.

    Args:
        model_name_or_path: a local folder in Hub layout (``config.json``, tokenizer files, weights) or a Hub id.
        prompts: a text file (one prompt per line), a JSONL file (``{"prompt": ...}`` per line) or a list of strings.
        task: ``"generate"`` (continue each prompt), ``"embed"`` (one vector per prompt) or ``"logits"``.
        batch_size: prompts per batch.
        dtype: dtype of the floating-point weights; ``"auto"`` keeps the checkpoint's (``config.json``'s ``dtype``).
        max_length: truncate prompts to this many tokens (default: no truncation).
        max_new_tokens, do_sample, temperature, top_k, top_p: decoding for ``generate`` (greedy by default; ``None``
            keeps the model's ``generation_config`` value).
        seed: with ``do_sample``, each batch draws from the RNG seeded with ``seed`` + its first prompt index.
        pooling: ``embed``: ``"mean"`` of the token states (padding excluded), the first (``"cls"``) or the last
            token's state.
        normalize: ``embed``: L2-normalise the vectors.
        logits_positions: ``logits``: at the ``"last"`` token (a ``[prompts, vocab]`` tensor) or ``"all"`` tokens.
        auto_class: the transformers Auto class to build, e.g. ``"AutoModelForSequenceClassification"``. Default:
            ``AutoModelForCausalLM`` (``AutoModelForSeq2SeqLM`` for encoder-decoders) for generate; for embed and
            logits the checkpoint's own class (``architectures`` in config.json; embed runs its base model), else
            ``AutoModel`` / ``AutoModelForCausalLM``.
        create_if_missing: removed (any value is refused): a missing model path is an error, never a new model.
            The demo models are made once by ``lightning-bigmodel demo``.

    ``model_name_or_path`` is looked up once: a local folder is used as it is; a missing local path is a one-line
    not-found error; a Hub id is fetched (or read from the cache when offline) into a local snapshot from which the
    config, the tokenizer and the weights are all read, and a failed lookup is one line naming the id, the local path
    tried and whether the Hub was reachable.

    Results per prompt (read them back with :func:`lightning_bigmodel.read_predictions`): ``generate``: a dict
    ``{"index", "prompt", "completion", "token_ids"}`` (``token_ids`` up to and including the first end-of-sequence
    token); ``embed``: a ``[hidden]`` float32 row; ``logits``: a ``[vocab]`` row or a ``[tokens, vocab]`` tensor.
    """

    def __init__(
        self,
        model_name_or_path: str,
        prompts: Union[str, list[str]],
        task: Task = "generate",
        batch_size: int = 8,
        dtype: DType = "auto",
        max_length: Optional[int] = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        pooling: Pooling = "mean",
        normalize: bool = False,
        logits_positions: Literal["last", "all"] = "last",
        auto_class: Optional[str] = None,
        create_if_missing: Optional[str] = None,
    ) -> None:
        super().__init__()
        if create_if_missing is not None:
            raise ValueError(
                f"`create_if_missing` ({create_if_missing!r}) was removed: a missing model path is an error, never a"
                " new model. Delete that line, and make the demo models once with `lightning-bigmodel demo`."
            )
        _check_choice("task", task, tasks.TASKS)
        _check_choice("dtype", dtype, ("auto", "float32", "float16", "bfloat16"))
        _check_choice("pooling", pooling, tasks.POOLINGS)
        _check_choice("logits_positions", logits_positions, ("last", "all"))
        if auto_class is not None and not auto_class.startswith("AutoModel"):
            raise ValueError(
                f"`auto_class` {auto_class!r} is not a transformers Auto class: pass e.g. 'AutoModelForMaskedLM'."
            )
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"`batch_size` ({batch_size}) and `max_new_tokens` ({max_new_tokens}) must be >= 1.")
        self.save_hyperparameters(ignore=["create_if_missing"])
        self.source = str(model_name_or_path)
        self._folder: Optional[str] = None
        self.prompts: list[Prompt] = read_prompts(prompts)
        if not Path(self.source).expanduser().exists() and is_local_path(self.source):
            self._checked_source()  # a missing local path: the one-line not-found error, when configured
        self.task = task
        self.sampling = tasks.Sampling(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        self.model: Optional[torch.nn.Module] = None
        self._tokenizer: Any = None
        # embed builds the bare network (`AutoModel`): tensors of a head in the checkpoint are not needed. A missing
        # weight still fails: the strategy refuses any parameter left on meta.
        self.strict_loading = task != "embed"

    # ------------------------------------------------------------------ the model and where its weights are
    def setup(self, stage: str) -> None:
        if not isinstance(self.trainer.strategy, BigModelInferenceStrategy):
            raise TypeError(
                f"`TransformersModule` streams its weights through `BigModelInferenceStrategy`, but the Trainer uses "
                f"{type(self.trainer.strategy).__name__}. Pass `Trainer(strategy='bigmodel')` (in YAML: "
                "`trainer.strategy: bigmodel`, the default of `lightning-bigmodel predict`)."
            )
        self.tokenizer  # noqa: B018 - a missing or broken tokenizer fails here, before any weight is read

    def configure_model(self) -> None:
        """Build the network on meta from its config (once) and tell the strategy where its weights are."""
        if self.model is not None:
            return
        import transformers

        config = transformers.AutoConfig.from_pretrained(self._checked_source())
        dtype = None if self.hparams.dtype == "auto" else getattr(torch, self.hparams.dtype)
        options = {} if dtype is None else {"dtype": dtype}
        auto = self._auto_class(transformers, config)
        if auto is not None:
            self.model = auto.from_config(config, **options).eval()
        else:  # the checkpoint's own class (`architectures` in config.json): its keys match the checkpoint's
            self.model = getattr(transformers, config.architectures[0])._from_config(config, **options).eval()
        if self._trainer is not None:
            self._tell_strategy()

    def _checked_source(self) -> str:
        """The local folder of the model (a Hub id's snapshot), looked up once."""
        if self._folder is None:
            folder = Path(self.source).expanduser()
            if not folder.exists() and is_local_path(self.source):
                error = only_local_not_found("`model_name_or_path`", self.source)
                if folder.name in DEMO_FOLDERS:
                    error.args = (f"{error.args[0][:-1]}; make the demo models with `lightning-bigmodel demo`.",)
                raise error
            if not folder.exists():
                folder = self._from_hub()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"`model_name_or_path` {self.source!r} has no config.json. Pass a folder in Hub layout (as written "
                    "by `save_pretrained`) or a Hub id."
                )
            self._folder = str(folder)
        return self._folder

    def _from_hub(self) -> Path:
        """The snapshot of the Hub repo ``model_name_or_path``: config and tokenizer files, then its weights (the
        safetensors, else the pickles). Every lookup goes through the one-line error path."""
        for patterns in _HUB_WEIGHTS:
            folder = hub_snapshot(self.source, (*_HUB_SMALL_FILES, *patterns), "`model_name_or_path`")
            if any(folder.glob(patterns[0])):
                break
        return folder

    def _auto_class(self, transformers: Any, config: Any) -> Any:
        """The Auto class to build with, or ``None`` for the checkpoint's own class (embed and logits)."""
        name = self.hparams.auto_class
        if name is None:
            own = (getattr(config, "architectures", None) or [None])[0]
            buildable = own is not None and hasattr(getattr(transformers, own, None), "_from_config")
            if self.task != "generate" and buildable:
                return None
            seq2seq = getattr(config, "is_encoder_decoder", False)
            head = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
            name = "AutoModel" if self.task == "embed" else head
        auto = getattr(transformers, name, None)
        if not name.startswith("Auto") or not hasattr(auto, "from_config"):
            raise ValueError(
                f"`auto_class` {name!r} is not a transformers Auto class. Pass one such as "
                "'AutoModelForCausalLM', 'AutoModel' or 'AutoModelForSequenceClassification'."
            )
        return auto

    def _tell_strategy(self) -> None:
        """Point the strategy at the weights unless it has a ``checkpoint`` (a ``ckpt_path`` given to ``predict`` wins
        anyway), and plan with the network's no-split classes (``_no_split_modules``, as transformers'
        ``device_map="auto"`` does) unless the strategy or a ``DeviceMapCallback`` was given some."""
        strategy = self.trainer.strategy
        if strategy.checkpoint is None:
            strategy.checkpoint = self._checked_source()
        no_split = sorted(getattr(self.model, "_no_split_modules", None) or [])
        planners = [strategy, *(cb for cb in self.trainer.callbacks if isinstance(cb, DeviceMapCallback))]
        if no_split and not any("no_split_module_classes" in planner.given_settings for planner in planners):
            strategy.given_settings["no_split_module_classes"] = no_split

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use); padding on the left for ``generate``, right otherwise."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self._checked_source())
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token  # GPT-2 and Llama define none; masked out anyway
            tokenizer.padding_side = "left" if self.task == "generate" else "right"
            self._tokenizer = tokenizer
        return self._tokenizer

    # ------------------------------------------------------------------ data and steps
    def collate(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Tokenize a batch of prompts (padded) and keep their indices."""
        limit = self.hparams.max_length
        encoded = self.tokenizer(
            [prompt.text for prompt in prompts],
            padding=True,
            truncation=limit is not None,
            max_length=limit,
            return_tensors="pt",
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "index": torch.tensor([prompt.index for prompt in prompts]),
        }

    def predict_dataloader(self) -> DataLoader:
        """The prompts in order; a :class:`ResumablePredictionWriter` among the callbacks skips the done ones."""
        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, ResumablePredictionWriter)]
        sampler = writers[0].sampler(self.prompts) if writers else None
        return DataLoader(self.prompts, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=self.collate)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        if self.model is None:
            raise RuntimeError("`TransformersModule` has no network yet: run it through `Trainer.predict`.")
        if self.task == "generate":
            texts = [self.prompts[int(i)].text for i in batch["index"]]
            return tasks.generate(self.model, self.tokenizer, batch, texts, self.sampling)
        if self.task == "embed":
            return tasks.embed(self.model.base_model, batch, self.hparams.pooling, self.hparams.normalize)
        return tasks.logits(self.model, batch, self.hparams.logits_positions)

    def on_predict_end(self) -> None:
        for writer in self.trainer.callbacks:
            if isinstance(writer, ResumablePredictionWriter):
                folder = str(writer.output_dir)
                rank_zero_info(
                    f"`TransformersModule`: {self.task} over {len(self.prompts)} prompts of {self.source!r}; results "
                    f"in {folder!r} (`lightning_bigmodel.read_predictions({folder!r})`)."
                )
