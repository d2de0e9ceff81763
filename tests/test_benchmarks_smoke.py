"""Keep the benchmark harness from rotting: report maths on synthetic results, failure capture, and one quick run.

No timing is asserted anywhere: only that figures exist, ratios are computed from them, and failures are reported.
"""

import json

import pytest
import torch

from benchmarks.cases import map_arguments
from benchmarks.checkpoints import build_checkpoints, model_bytes
from benchmarks.measure import MemorySampler, folder_bytes
from benchmarks.report import write_report
from benchmarks.run import main
from benchmarks.targets import target_rows
from benchmarks.worker import run_case
from examples.gpt import GPT, GPTConfig


def _ok(**figures):
    return {"ok": True, "stage": "done", **figures}


def _entry(lib, fmt, map_, result, nbytes=1000):
    return {"spec": {"kind": "load", "lib": lib, "fmt": fmt, "map": map_, "model_bytes": nbytes}, "result": result}


def test_target_rows_compute_ratios_and_report_missing_cases():
    results = {
        "s/plain/safetensors/resident": _entry("plain", "safetensors", "resident", _ok(decode_s=1.0, prefill_s=2.0)),
        "s/ours/safetensors/disk": _entry("ours", "safetensors", "disk", _ok(decode_s=1.1, prefill_s=2.2)),
        "s/accelerate/safetensors/disk": _entry("accelerate", "safetensors", "disk", _ok(decode_s=2.2)),
        "s/ours/bin/resident": _entry("ours", "bin", "resident", {"ok": False, "stage": "load", "error": "boom"}),
    }
    rows = target_rows(results, "s")
    assert "1.100x" in rows[0] and "PASS" in rows[0]  # 1.1 / 1.0 <= 1.15
    assert "2.000x" in rows[1] and "PASS" in rows[1]  # 2.2 / 1.1 >= 1.8
    assert "1.100x" in rows[2] and "MISS" in rows[2]  # 2.2 / 2.0 > 1.05
    assert "NOT MEASURED" in rows[3] and "failed at load" in rows[3]


def test_worker_reports_failures_instead_of_raising():
    result = run_case({"kind": "no-such-kind", "threads": 1})
    assert result["ok"] is False
    assert "no-such-kind" in result["error"]


def test_checkpoints_hold_the_model_once(tmp_path):
    info = build_checkpoints("tiny", tmp_path)
    torch.manual_seed(0)
    reference = GPT(GPTConfig.preset("tiny"))
    assert info["model_bytes"] == model_bytes(reference)
    assert len(info["shards"]["safetensors"]) >= 2
    index = json.loads((tmp_path / "checkpoints/tiny/bin/pytorch_model.bin.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied to wte, saved once
    assert set(index["weight_map"]) == set(reference.state_dict()) - {"lm_head.weight"}
    assert build_checkpoints("tiny", tmp_path) == info  # reused


def test_sampler_and_folder_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 5000)
    assert folder_bytes(str(tmp_path))["apparent"] == 5000
    assert folder_bytes(str(tmp_path / "missing"))["files"] == 0
    sampler = MemorySampler().start()
    block = torch.ones(4 * 2**20)  # 16 MB, touched
    growth = sampler.stop()
    del block
    assert set(growth) >= {"peak_anon_growth", "peak_total_growth"}
    assert map_arguments("disk", 100)["max_memory"] == {"cpu": 50}


@pytest.mark.slow
def test_quick_run_writes_a_report(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--timeout", "300"]) == 0
    text = out.read_text()
    for heading in ("## Targets of issue 4", "## Headline ratios", "## Empty init", "## Every case", "## Failures",
                    "## Loading a `.bin` checkpoint to the CPU", "## Placement vs accelerate"):
        assert heading in text
    results = json.loads((tmp_path / "cache" / "results.json").read_text())["results"]
    for case_id, entry in results.items():
        assert entry["result"]["ok"] or entry["result"].get("error"), case_id  # every failure says why
    # Every case of this library (the core API and the Trainer) succeeds and matches plain PyTorch's outputs.
    ours = {cid: entry for cid, entry in results.items() if entry["spec"].get("lib") in ("ours", "trainer")}
    for case_id, entry in ours.items():  # loads, Trainer runs, empty init and planning
        result = entry["result"]
        assert result["ok"], f"{case_id} failed at {result.get('stage')}: {result.get('error')}"
    assert {"empty_init/ours", "plan/ours"} <= set(ours)
    loads = {cid: entry for cid, entry in ours.items() if entry["spec"]["kind"] in ("load", "trainer")}
    cpu_cases = {("ours", fmt, m) for fmt in ("safetensors", "bin") for m in ("resident", "disk")}
    cpu_cases |= {("trainer", "safetensors", m) for m in ("resident", "disk")}
    assert cpu_cases <= {(e["spec"]["lib"], e["spec"]["fmt"], e["spec"]["map"]) for e in loads.values()}
    for case_id, entry in loads.items():
        diffs = entry["result"].get("max_abs_diff") or {}
        shapes = {"decode", "prefill"} if entry["spec"]["fmt"] == "safetensors" else {"decode"}
        assert set(diffs) >= shapes and max(diffs.values()) < 1e-5, (case_id, diffs)  # compared, and equal
    plain = results["tiny/plain/safetensors/resident"]["result"]
    assert plain["ok"], plain.get("error")
    assert plain["decode_s"] > 0 and plain["load_s"] > 0
    assert results["tiny/plain/bin/resident"]["result"]["ok"]
    accelerate = results["tiny/accelerate/safetensors/disk"]["result"]
    assert accelerate["ok"], accelerate.get("error")
    assert accelerate["max_abs_diff"]["decode"] < 1e-5  # compared with plain PyTorch
    write_report(tmp_path / "again.md", json.loads((tmp_path / "cache" / "results.json").read_text())["meta"], results)
