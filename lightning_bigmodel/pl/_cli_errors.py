"""Parser errors of ``lightning-bigmodel`` as a user needs them: the culprit first, a close match, then a few lines.

jsonargparse prints the whole usage (about 50 lines for ``predict``) before the one line that matters. The parsers
of the command use :class:`CompactErrors` instead: line one names the key or class and, when one is close, says
"did you mean `offload_folder`?"; then at most :data:`DETAIL_LINES` lines of jsonargparse's own explanation (the
given value, the accepted choices); then where the full list of options is. Exit status 2, as before.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn, Optional

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

DETAIL_LINES = 8
FULL_ERRORS = [False]  # set by `lightning-bigmodel --debug`: jsonargparse's own report
_OPTION = re.compile(r"(?:Option|Key) ['\"]([\w.]+)['\"] is not (?:accepted|expected)")
_CLASS = re.compile(r"Problem with given class_path '([\w.]+)'")
_SUBCOMMAND_OPTION = re.compile(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def _init_arguments(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - a hint only
        return []


def _parser_keys(parser: Any) -> list[str]:
    """Every option of ``parser`` and of its subcommands' parsers (``trainer.accelerator``, ...)."""
    keys = []
    for action in getattr(parser, "_actions", []):
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            keys += _parser_keys(sub)
        dest = getattr(action, "dest", "")
        if dest and dest not in ("help", "config", "print_config"):
            keys.append(dest)
    return keys


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else "."


def summary(message: str, parser: Any) -> str:
    """The one line that matters in a jsonargparse error ``message``."""
    missing = _NO_MODULE.search(message)
    if missing:
        top = missing.group(1).split(".")[0]
        where = f"run from the repository root (the folder that holds `{top}/`)" if top == "examples" else "install it"
        owner = _CLASS.search(message)
        what = owner.group(1) if owner else missing.group(1)
        return f"cannot import `{what}` (No module named {top!r}): {where}, or add its folder to PYTHONPATH."
    option, owner = _OPTION.search(message), _CLASS.search(message)
    if option and owner:
        word = option.group(1).rsplit(".", 1)[-1]
        hint = _did_you_mean(word, _init_arguments(owner.group(1)))
        return f"`{word}` is not an option of `{owner.group(1)}`{hint}"
    option = _SUBCOMMAND_OPTION.search(message) or option
    if option:
        key = next(group for group in option.groups() if group)
        keys = _parser_keys(parser)
        hint = _did_you_mean(key, keys)
        return f"`{key}` is not an option{hint}"
    return message.strip().splitlines()[0] if message.strip() else "invalid arguments."


def report(parser: Any, message: str, prog: str) -> str:
    """The whole report: the summary line, a few lines of detail, where the options are listed."""
    first = summary(message, parser)
    detail = [line for line in message.strip().splitlines() if line.strip() and line.strip() != first]
    lines = [f"lightning-bigmodel: error: {first}"]
    lines += ["  " + line[:200] for line in detail[:DETAIL_LINES]]
    if len(detail) > DETAIL_LINES:
        lines.append(f"  ... ({len(detail) - DETAIL_LINES} more lines with --debug)")
    lines.append(f"Options: `{prog} --help`.")
    return "\n".join(lines) + "\n"


class CompactErrors:
    """Mixin for a jsonargparse parser: a short report on stderr and exit status 2 (``--debug``: the usual error)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not getattr(self, "exit_on_error", True) or FULL_ERRORS[0]:
            super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = str(getattr(parser, "prog", "lightning-bigmodel")).replace(" [options]", "")
        sys.stderr.write(report(parser, message, prog))
        self.exit(2)  # type: ignore[attr-defined]


class CompactParser(CompactErrors, ArgumentParser):
    """``plan``'s parser."""


class CompactLightningParser(CompactErrors, LightningArgumentParser):
    """``predict``'s parser (LightningCLI's, with the short errors)."""
