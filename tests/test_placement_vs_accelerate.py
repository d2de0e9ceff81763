"""Never below accelerate: on every model shape, budget and policy, our plan keeps on the GPUs at least the bytes of
accelerate's plan on the same meta model and budget, less at most one offloaded layer (the prefetch slot), and leaves
no GPU empty that accelerate's plan uses, in every cell (where room for one offloaded layer on a GPU would leave a GPU
empty, our offloaded layers execute on the CPU; see tests/test_cpu_execution.py). Pure planning on meta models (fast). The models, budgets and the comparison
are those of the benchmark's "placement vs accelerate" table (:mod:`benchmarks.placement`)."""

from __future__ import annotations

import logging

import pytest

from models import meta_gpt
from lightning_bigmodel.planning.device_map import POLICIES, infer_device_map

accelerate = pytest.importorskip("accelerate")

from benchmarks.placement import BUDGETS, MODELS, compare, model_bytes  # noqa: E402  (needs accelerate)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget_name", BUDGETS)
@pytest.mark.parametrize("model_name", MODELS)
def test_the_gpus_hold_no_less_than_accelerate_s_plan_less_one_offloaded_layer(model_name, budget_name, policy):
    cell = compare(model_name, budget_name, policy)
    ours, theirs = cell["ours"], cell["theirs"]
    assert cell["ours_fits"], cell
    # also where accelerate's own plan is over its execution GPU's budget (it counts neither one offloaded layer nor
    # the offloaded buffers there): ours then runs its offloaded layers on the CPU where a GPU would be left empty
    assert not set(theirs) - set(ours), f"GPUs accelerate uses left empty: ours {ours}, accelerate {theirs}"
    assert sum(ours.values()) >= sum(theirs.values()) - cell["slot"], cell


def test_the_table_has_cells_where_accelerate_uses_the_gpus_and_offloads():
    """The comparison is not vacuous: in most cells accelerate's plan runs within budget, uses GPUs and offloads."""
    cells = [compare(model, budget, policy) for model in MODELS for budget in BUDGETS for policy in POLICIES]
    compared = [cell for cell in cells if cell["theirs_fits"] and cell["theirs"]]
    offloading = [cell for cell in compared if cell["slot"]]
    assert len(compared) >= len(cells) // 2 and len(offloading) >= len(cells) // 4, (len(compared), len(offloading))


def test_a_budgeted_gpu_left_empty_is_logged_with_its_budget_and_the_module_that_did_not_fit(caplog):
    model = meta_gpt("small", tie_weights=False)
    total = model_bytes(model)
    budget = {0: int(0.3 * total), 1: 500, 2: int(0.45 * total), "cpu": int(0.3 * total)}  # GPU 1: below any module
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        device_map = infer_device_map(model, budget, no_split_module_classes=["Block"], policy="sequential")
    assert 1 not in device_map.values() and {0, 2} <= set(device_map.values()), device_map
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_bigmodel.planning"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("GPU 1 gets no module (`max_memory[1]` = 500 B, 500 bytes)"), lines[0]
    assert "does not fit" in lines[0] and "Raise `max_memory[1]` to at least" in lines[0]


def test_nothing_is_logged_when_nothing_is_offloaded(caplog):
    model = meta_gpt("small", tie_weights=False)
    total = model_bytes(model)
    with caplog.at_level(logging.WARNING, logger="lightning_bigmodel.planning"):
        device_map = infer_device_map(model, {0: 2 * total, 1: 2 * total}, policy="sequential")
    assert device_map == {"": 0}
    assert not [r for r in caplog.records if r.name == "lightning_bigmodel.planning"]
