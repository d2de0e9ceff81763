"""The simulated memory of a plan as text and JSON: weights, peak and budget per device, with a fix for each device
whose peak exceeds its budget."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from lightning_bigmodel.planning.devices import Device
from lightning_bigmodel.planning.table import device_label, format_bytes


def fix_for(device: Device, over: int, input_shape: Sequence[int]) -> str:
    """What to change when ``device``'s peak is ``over`` bytes above its budget."""
    key = repr(device)
    batch = "a smaller batch" if input_shape and input_shape[0] > 1 else "a shorter sequence"
    if device == "cpu":
        return f"lower `max_memory[{key}]` by {format_bytes(over)} (more goes to disk), or {batch}"
    return f"lower `max_memory[{key}]` by {format_bytes(over)} (the planner then leaves that room free), or {batch}"


def render_peaks(
    memory: Mapping[Device, Mapping[str, int]],
    budget: Mapping[Device, int],
    input_shape: Sequence[int],
    max_new_tokens: int = 0,
) -> str:
    """One line per device: weights, simulated peak, budget, and ``OVER by X: <fix>`` where the peak exceeds it."""
    shape = "x".join(map(str, input_shape))
    lines = [
        f"Memory at run time for a batch of {shape} token ids and {max_new_tokens} new tokens "
        "(simulated on fake tensors):",
        f"{'device':<7}  {'weights':>10}  {'peak':>10}  {'budget':>10}  fits",
    ]
    for device, usage in memory.items():
        limit: Optional[int] = budget.get(device)
        verdict = "yes"
        if limit is not None and device != "disk" and usage["peak"] > limit:
            over = usage["peak"] - limit
            verdict = f"OVER by {format_bytes(over)}: {fix_for(device, over, input_shape)}"
        lines.append(
            f"{device_label(device):<7}  {format_bytes(usage['weights']):>10}  {format_bytes(usage['peak']):>10}  "
            f"{format_bytes(limit):>10}  {verdict}"
        )
    return "\n".join(lines)


def peaks_json(
    memory: Mapping[Device, Mapping[str, int]], input_shape: Sequence[int], max_new_tokens: int = 0
) -> dict[str, Any]:
    """``{"input_shape", "max_new_tokens", "weights_per_device", "peak_per_device"}`` (devices as in the table)."""
    return {
        "input_shape": list(input_shape),
        "max_new_tokens": max_new_tokens,
        "weights_per_device": {device_label(d): usage["weights"] for d, usage in memory.items()},
        "peak_per_device": {device_label(d): usage["peak"] for d, usage in memory.items()},
    }
