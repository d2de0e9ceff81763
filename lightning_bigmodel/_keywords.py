"""Keyword-only arguments with a clear message for positional calls written for accelerate.

The public functions share accelerate's names but not its argument order (``dispatch_model``'s 4th argument is
accelerate's ``state_dict``, ours was ``offload_folder``). Every argument after the first two is keyword-only; a call
passing more positionally is refused with the keywords to write instead, read in accelerate's order (the likely source
of such a call). Python's own ``TypeError`` ("takes 2 positional arguments but 4 were given") names none of them,
hence this wrapper.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence, TypeVar

F = TypeVar("F", bound=Callable)

__all__ = ["keyword_only"]


def keyword_only(accelerate_order: Sequence[tuple[str, Optional[str]]] = ()) -> Callable[[F], F]:
    """Refuse positional arguments beyond the function's positional parameters (its first two).

    Args:
        accelerate_order: accelerate's parameters after the first two, in order, each as ``(accelerate's name, our
            keyword or None when we have no equivalent)``; used to name the keyword each extra argument needs.
    """

    def wrap(fn: F) -> F:
        params = inspect.signature(fn).parameters
        positional = [p.name for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keywords = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > len(positional):
                raise TypeError(_message(fn.__name__, positional, len(args), accelerate_order, keywords))
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return wrap


def _message(name: str, positional: list[str], given: int, order, keywords: list[str]) -> str:
    extra = given - len(positional)
    ours, foreign = [], []
    for index in range(extra):
        if index < len(order):
            theirs, mine = order[index]
            (ours if mine else foreign).append(mine or theirs)
    head = ", ".join(positional)
    if ours:
        call = ", ".join(f"{k}=..." for k in ours)
        noun = "a keyword" if len(ours) == 1 else "keywords"
        text = f"{name}() takes {_join(ours)} as {noun}: {name}({head}, {call})."
    else:
        text = f"{name}() takes {len(positional)} positional arguments ({head}); pass the others by keyword."
    text += (
        f" Every argument after `{positional[-1]}` is keyword-only, since the order differs from accelerate's"
        f" ({given} positional arguments given; accelerate's order assumed)."
    )
    if foreign:
        text += f" accelerate's {_join(foreign)} {'has' if len(foreign) == 1 else 'have'} no equivalent here."
    return text + f" Keywords: {', '.join(keywords)}."


def _join(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)
