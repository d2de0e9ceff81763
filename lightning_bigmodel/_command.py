"""Entry point of the ``lightning-bigmodel`` command (and ``python -m lightning_bigmodel``), kept light.

``lightning-bigmodel``, ``--help`` and an unknown subcommand are answered from here without importing Lightning,
jsonargparse or torch (a fraction of a second instead of several seconds); a subcommand imports
:mod:`lightning_bigmodel.pl.cli`, which runs it. To add a subcommand: one line in :data:`SUBCOMMANDS` here and its
function in ``pl/cli.py``'s ``COMMANDS``.
"""

from __future__ import annotations

import sys
from typing import Optional

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


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [arg for arg in argv if arg != "--debug"]
    command = words[0] if words else None
    if command in ("-h", "--help"):
        print(usage(), end="")
        return
    if command not in SUBCOMMANDS:
        sys.stderr.write(usage())
        what = "no subcommand" if command is None else f"unknown subcommand {command!r}"
        choices = ", ".join(f"`{name}`" for name in SUBCOMMANDS)
        raise SystemExit(f"lightning-bigmodel: error: {what}; choose {choices}.")
    from lightning_bigmodel.pl.cli import main as run

    run(argv)
