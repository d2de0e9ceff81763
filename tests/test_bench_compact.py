"""The limit benchmark's own compare stays small inside the memory limit it measures under."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.cases_limit import _compact


def test_the_compared_sums_are_the_float64_sums_without_a_float64_copy_of_the_logits():
    """The figure is ``torch.sum(logits, dim=-1, dtype=torch.float64)`` exactly; the largest allocation while making it
    is a few rows in float64, not the whole logits (the sum with a dtype converts its whole input first: 206 MB for
    the benchmark's 4 x 128 prefill of gpt2-large)."""
    logits = torch.randn(2, 256, 4096, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _compact("prefill", logits)
    assert torch.equal(out["prefill_sums"], torch.sum(logits, dim=-1, dtype=torch.float64))
    assert torch.equal(out["prefill"], logits[:, -8:])
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= logits.numel() * 8 // 4, largest  # the old sum allocated logits.numel() * 8 at once
    noncontiguous = logits.transpose(0, 1)
    assert torch.equal(_compact("x", noncontiguous)["x_sums"], torch.sum(noncontiguous, dim=-1, dtype=torch.float64))
