"""Read the inputs of a no-code job: prompts (or texts to embed) from a text file, a JSONL file or a list.

A text file holds one prompt per line; a ``.jsonl`` file holds one JSON object per line with a string ``"prompt"``
(other fields are ignored). Blank lines are skipped; every prompt keeps the 1-based line it came from. Errors name the
file and line and say the fix, and are raised when the job is configured, before any weight is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

JSONL_SUFFIXES = (".jsonl", ".ndjson")
_FORMATS = 'a text file (one prompt per line) or a JSONL file (one {"prompt": "..."} object per line)'


@dataclass(frozen=True)
class Prompt:
    """One input of a job.

    Attributes:
        index: position among the job's prompts (the dataset index results carry).
        line: 1-based line of the file it came from (position in the list + 1 for a list).
        text: the prompt.
    """

    index: int
    line: int
    text: str


def read_prompts(source: Union[str, Path, Sequence[str]], field: str = "prompt") -> list[Prompt]:
    """The prompts of ``source``: a text or JSONL file path, or a list of strings.

    Args:
        source: a ``.jsonl``/``.ndjson`` file (one object per line), any other file (one prompt per line), or a list.
        field: the key holding the prompt in each JSONL object.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read as UTF-8 text, a JSONL line is not an object with a string ``field``,
            or there is no prompt at all.
    """
    if isinstance(source, (list, tuple)):
        return _from_list(source)
    path = Path(source).expanduser()
    lines = _read_lines(path)
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text = _json_prompt(path, number, line, field) if jsonl else line.strip()
        prompts.append(Prompt(index=len(prompts), line=number, text=text))
    if not prompts:
        raise ValueError(f"`prompts` file {str(path)!r} holds no prompt. Write {_FORMATS}.")
    return prompts


def _from_list(texts: Sequence[str]) -> list[Prompt]:
    if not texts:
        raise ValueError("`prompts` is an empty list. Pass at least one prompt, or the path of " + _FORMATS + ".")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if bad:
        raise ValueError(f"`prompts` items {bad[:5]} are empty or not strings. Pass non-empty strings.")
    return [Prompt(index=i, line=i + 1, text=text.strip()) for i, text in enumerate(texts)]


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"`prompts` file {str(path)!r} does not exist. Pass the path of {_FORMATS}.")
    if not path.is_file():
        raise ValueError(f"`prompts` path {str(path)!r} is not a file. Pass the path of {_FORMATS}.")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"`prompts` file {str(path)!r} cannot be read as UTF-8 text ({err}). Check its permissions and encoding; "
            f"it must be {_FORMATS}."
        ) from err


def _json_prompt(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"`prompts` file {str(path)!r} line {number} is not valid JSON ({err.msg}). Write one JSON object per "
            f'line, e.g. {{"{field}": "Once upon a time"}}, or use a .txt file with one prompt per line.'
        ) from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            f"`prompts` file {str(path)!r} line {number} has no non-empty string {field!r}: {line.strip()[:80]!r}. "
            f'Write one object per line, e.g. {{"{field}": "Once upon a time"}}.'
        )
    return text
