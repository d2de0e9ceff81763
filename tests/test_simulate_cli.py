"""``lightning-bigmodel plan --input-shape``: simulated peaks per device printed next to the weights and the budget,
checked against activation sizes computed by hand; devices over budget are flagged with the fix."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_bigmodel.planning.table import format_bytes
from models import LinearLM

pytest.importorskip("jsonargparse")  # the CLI is built on it; the GPU machine may lack it
from lightning_bigmodel.pl.cli import plan  # noqa: E402

B, T, D, V = 2, 8, 16, 1000
F32 = 4
HEAD = V * D * F32  # the LM head's weight (no bias)
FRONT = V * D * F32 + 4 * (D * D + D) * F32  # embedding and four blocks


class LM(LinearLM):
    """Embedding, four linear blocks, an LM head (the class path the CLI builds: ``test_simulate_cli.LM``)."""

    def __init__(self) -> None:
        super().__init__(D, V, 4)


def _plan(capsys, *extra: str) -> tuple[dict, dict[str, list[str]]]:
    budget = json.dumps({"0": FRONT + 1000, "1": HEAD + 200_000, "cpu": 0})
    device_map_ = plan(["--model", "test_simulate_cli.LM", "--policy", "sequential", "--max_memory", budget, *extra])
    out = capsys.readouterr().out
    section = out.split("Memory at run time", 1)[1].splitlines()
    rows = {line.split()[0]: line.split(None, 4) for line in section[2:] if line.strip()}
    return device_map_, rows


def test_plan_prints_peaks_computed_by_hand_and_flags_the_device_over_budget(capsys):
    device_map, rows = _plan(capsys, "--input-shape", f"{B}x{T}", "--fit", "false")
    assert device_map == {"emb": 0, "blocks": 0, "head": 1}
    logits, hidden, ids = B * T * V * F32, B * T * D * F32, B * T * 8
    # GPU 1 holds the head: its weight, its input copied from GPU 0, the logits it computes.
    assert rows["cuda:1"][:4] == ["cuda:1", format_bytes(HEAD).split()[0], "KiB", format_bytes(HEAD + hidden + logits).split()[0]]
    # GPU 0: the weights, the batch, and the logits returned to the input's device at the end.
    gpu0 = rows["cuda:0"]
    assert " ".join(gpu0[1:3]) == format_bytes(FRONT)
    line = " ".join(gpu0)
    assert format_bytes(FRONT + ids + logits) in line
    over = FRONT + ids + logits - (FRONT + 1000)
    assert f"OVER by {format_bytes(over)}: lower `max_memory[0]` by {format_bytes(over)}" in line
    assert "a smaller batch" in line
    assert rows["cuda:1"][-1].endswith("yes")


def test_plan_fits_every_peak_by_default(capsys):
    device_map, rows = _plan(capsys, "--input-shape", f"{B}x{T}", "--max-new-tokens", "2")
    assert device_map != {"emb": 0, "blocks": 0, "head": 1}  # the weights-only plan does not fit (test above)
    assert rows and all(row[-1].endswith("yes") for row in rows.values()), rows


@pytest.mark.parametrize("shape", ["4by2048", "0x8", "x"])
def test_plan_input_shape_that_does_not_parse_is_named(shape):
    with pytest.raises(ValueError, match=rf"`input_shape={shape!r}` does not parse.*e.g. '4x2048'"):
        plan(["--model", "test_simulate_cli.LM", "--max_memory", '{"cpu": "1GiB"}', "--input-shape", shape])
