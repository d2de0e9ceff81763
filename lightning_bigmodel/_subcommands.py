"""The ``lightning-bigmodel`` subcommands named and described, and the command's usage text: what both the light entry
point (:mod:`lightning_bigmodel._command`, which re-exports these names) and :mod:`lightning_bigmodel.pl.cli` print.
Imports nothing, so ``--help`` stays light and neither of those modules imports the other to print it.
"""

from __future__ import annotations

# name -> one-line description (the order of the help)
SUBCOMMANDS = {
    "predict": "run Trainer.predict from a LightningCLI config (strategy defaults to BigModelInferenceStrategy)",
    "plan": "print the device map and memory table for a model and a budget, reading no weight",
    "demo": "write the demo models the example configs use into runs/ (offline, once)",
    "verify": "run a predict config's first batch and compare every module's outputs with a CPU reference",
}


def usage() -> str:
    names = ",".join(SUBCOMMANDS)
    width = max(len(name) for name in SUBCOMMANDS) + 3
    lines = [f"usage: lightning-bigmodel {{{names}}} [-h] ...", "", "Big-model inference for PyTorch Lightning.", ""]
    lines += ["subcommands:", *(f"  {name:<{width}}{text}" for name, text in SUBCOMMANDS.items()), ""]
    lines += [
        "Run `lightning-bigmodel <subcommand> --help` for its options.",
        "A bad input is reported in one line (exit status 2); add --debug (or set LIGHTNING_BIGMODEL_DEBUG=1) for the"
        " traceback.",
    ]
    return "\n".join(lines) + "\n"
