"""What a GPU legitimately changes in a test's expectations, in one place.

- Lightning 2.6 moves the predictions ``trainer.predict`` returns to the CPU (``_PredictionLoop`` appends
  ``move_data_to_device(predictions, "cpu")``); the device a step produced them on is seen by a callback's
  ``on_predict_batch_end``, which gets them before that move (:class:`DeviceSpy`).
- GPU kernels sum in another order than CPU ones (and pick algorithms by size, alignment and stream), so float results
  match a CPU reference only up to a tolerance that grows with the dtype's rounding (:func:`gpu_tolerance`).
- Greedy decoding amplifies that: where two tokens' logits are nearly tied, the GPU may pick the other one and the rest
  of the sequence differs. A generated sequence is right when every token it chose is a (near) argmax of the reference
  model's logits at that step (:func:`assert_greedy_consistent`), not when it equals the CPU's sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class DeviceSpy(Callback):
    """Records the devices of every prediction tensor as ``predict_step`` returned it (before Lightning's move)."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:  # fmt: skip
        tensors = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        self.devices += [t.device for t in tensors if isinstance(t, torch.Tensor)]


def gpu_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` tolerances for a GPU result against a CPU (or other-kernel) reference in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return {"atol": 2e-2, "rtol": 2e-2}
    return {"atol": 1e-4, "rtol": 1e-4}


@torch.no_grad()
def assert_greedy_consistent(reference: torch.nn.Module, prompt: torch.Tensor, generated: torch.Tensor,
                             atol: float = 1e-3) -> None:  # fmt: skip
    """Every token ``generated`` appended to ``prompt`` is within ``atol`` of the reference's best logit at its step.

    ``reference`` runs on the CPU in float32 over ``generated`` itself (teacher forcing), so a near-tie resolved the
    other way by a GPU passes, while a wrong token fails.
    """
    generated = generated.cpu()
    assert generated.shape[0] == prompt.shape[0] and generated.shape[1] > prompt.shape[1]
    assert torch.equal(generated[:, : prompt.shape[1]], prompt.cpu()), "the prompt was changed"
    logits = reference(generated[:, :-1]).float()
    for step in range(prompt.shape[1] - 1, generated.shape[1] - 1):
        chosen = logits[:, step].gather(1, generated[:, step + 1 : step + 2]).squeeze(1)
        best = logits[:, step].max(dim=1).values
        assert bool((chosen >= best - atol).all()), f"step {step}: token logit {chosen} vs best {best}"
