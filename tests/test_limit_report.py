"""The larger-than-memory report judges each paired forward against the floor of its own moment."""

from __future__ import annotations

import pytest

from benchmarks.limit_report import fastest_read, floor_bytes, paired_ratios, render

GB = 10**9


def _results() -> dict:
    case = {
        "status": "completed", "limit": 2 * GB, "decode_s": 2.0, "prefill_s": 9.0, "read_bandwidth": 1.0 * GB,
        "read_methods": {"sequential read": {"bandwidth": 0.5 * GB}, "O_DIRECT, huge pages": {"bandwidth": 1.0 * GB}},
        "paired": {
            # forward 1: the reads bind (3 GB / 1.5 GB/s = 2 s > 0.5 s); forward 2: the resident forward binds (4 s)
            "decode": {"case_s": [2.6, 4.4, 3.0], "reference_s": [0.5, 4.0, 0.5], "bandwidth": [1.5 * GB, 3 * GB, GB]},
            "prefill": {"case_s": [9.0], "reference_s": [6.0], "bandwidth": [2 * GB]},
        },
    }  # fmt: skip
    return {
        "info": {"model_bytes": 5 * GB - 100 * 2**20, "params": 1e9, "shard_limit": 5e8},
        "floor": {"limit_bytes": 2 * GB, "margin": 100 * 2**20},
        "reference": {"decode_s": 0.5, "prefill_s": 6.0, "status": "completed"},
        "read_methods": {"madvise(WILLNEED)": 0.8 * GB},  # a run recorded before request sizes: a plain number
        "ours": case,
    }


def test_each_paired_forward_is_judged_against_its_own_floor():
    results = _results()
    assert floor_bytes(results, 2 * GB) == 3 * GB
    floor, ratio = paired_ratios(results, results["ours"], "decode")
    # floors 2.0, 4.0 and 3.0 s; ratios 1.3, 1.1 and 1.0: medians 3.0 s and 1.1x (not 2.6 / 3.0 or 3.0 / 2.0)
    assert floor == pytest.approx(3.0) and ratio == pytest.approx(1.1)
    assert paired_ratios(results, results["ours"], "prefill") == (pytest.approx(6.0), pytest.approx(1.5))
    del results["ours"]["paired"]
    assert paired_ratios(results, results["ours"], "decode") is None  # unpaired: the floor measured once


def test_the_fastest_read_counts_every_reading_of_the_run():
    results = _results()
    assert fastest_read(results) == 3 * GB  # the read before the second paired decode
    floor, ratio = paired_ratios(results, results["ours"], "decode", fastest_read(results))
    assert floor == pytest.approx(1.0) and ratio == pytest.approx(2.6 / 1.0)  # floors 1.0, 4.0, 1.0 s


def test_the_report_shows_the_paired_medians_and_the_fastest_method():
    text = render(_results(), "python -m benchmarks.limit_run", "gpt2-large")
    row = next(line for line in text.splitlines() if line.startswith("| ours |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[10:14] == ["2.00 s", "3.00 s", "1.10x", "2.60x"]
    assert cells[14:17] == ["9.00 s", "6.00 s", "1.50x"]
    assert cells[17] == "1.00 (O_DIRECT, huge pages)"
    assert "madvise(WILLNEED) 0.80" in text
