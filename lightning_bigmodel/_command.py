"""Entry point of the ``lightning-bigmodel`` command (and ``python -m lightning_bigmodel``), kept light.

``lightning-bigmodel``, ``--help`` and an unknown subcommand are answered from here without importing Lightning,
jsonargparse or torch (a fraction of a second instead of several seconds); a subcommand imports
:mod:`lightning_bigmodel.pl.cli`, which runs it. To add a subcommand: one line in ``SUBCOMMANDS`` (in
:mod:`lightning_bigmodel._subcommands`) and its function in ``pl/cli.py``'s ``COMMANDS``.
"""

from __future__ import annotations

import sys
from typing import Optional

from lightning_bigmodel._subcommands import SUBCOMMANDS, usage  # noqa: F401 (re-exported: the names lived here)


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
