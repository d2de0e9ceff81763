"""Carry the caller's thread-local torch modes into a worker thread the library starts.

Grad, inference and autocast modes, and the torch-function mode stack, are per thread in PyTorch: work handed to a
background thread (prefetch, micro-batch workers) would otherwise run without them. Torch-function modes are what
``torch.device(...)`` contexts and the simulated GPUs' stand-ins (``lightning_bigmodel.simulate``) use, so code run in
the library's threads sees the same devices as the caller. Torch-dispatch modes (fake tensors, counting modes) are
stateful per thread and are not carried.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode, _push_mode


def capture_modes() -> Callable[[ExitStack], None]:
    """Capture the calling thread's modes; the returned function re-enters them on ``stack`` in another thread."""
    inference = torch.is_inference_mode_enabled()
    grad = torch.is_grad_enabled()
    cache = torch.is_autocast_cache_enabled()
    from lightning_bigmodel._accelerator import accelerator_type  # noqa: PLC0415

    types = dict.fromkeys(("cpu", "cuda", accelerator_type()))
    autocasts = []
    for device_type in types:
        try:
            if torch.is_autocast_enabled(device_type):
                autocasts.append((device_type, torch.get_autocast_dtype(device_type)))
        except RuntimeError:  # a device type without autocast support
            continue
    function_modes = _get_current_function_mode_stack()

    def enter(stack: ExitStack) -> None:
        stack.enter_context(torch.inference_mode() if inference else torch.set_grad_enabled(grad))
        for device_type, dtype in autocasts:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
        for mode in function_modes:
            stack.enter_context(_pushed(mode))

    return enter


@contextmanager
def _pushed(mode: TorchFunctionMode) -> Iterator[None]:
    """Push ``mode`` on this thread's stack without ``__enter__`` (whose saved state is per instance, not per thread)."""
    _push_mode(mode)
    try:
        yield
    finally:
        _pop_mode()
