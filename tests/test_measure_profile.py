"""Where a step's time goes: the profiler summary, and a cell's profile that changes none of its other figures."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_cell_settings
from qlora_core.cell import run_cell
from qlora_core.measure.profile import TOP, profile_calls
from qlora_core.report import profile_rows

CPU = torch.device("cpu")


def test_summary_counts_the_operators_of_each_call():
    a = torch.randn(32, 32)
    summary, table = profile_calls(lambda: (a @ a @ a).relu(), 4, CPU)
    by_name = {op["name"]: op for op in summary["top_host_ops"]}
    assert summary["calls"] == 4 and by_name["aten::mm"]["calls_per_call"] == 2  # two matmuls a call
    assert by_name["aten::relu"]["calls_per_call"] == 1
    assert summary["host_ops_per_call"] >= 3 and len(summary["top_host_ops"]) <= TOP
    assert summary["kernels_per_call"] is None and summary["device_busy_share"] is None  # a CPU has no device
    assert summary["top_kernels"] == [] and summary["wall_s_per_call"] > 0
    assert "aten::mm" in table


def test_no_call_is_refused():
    with pytest.raises(ValueError, match="calls must be >= 1"):
        profile_calls(lambda: None, 0, CPU)


def test_profiled_cell_keeps_every_other_figure(tiny_model_dir):
    """The profiled steps are undone before the evaluation: the perplexity after training and the losses are
    those of the same cell unprofiled, exactly."""
    plain = run_cell(tiny_cell_settings(tiny_model_dir, "nf4", eval_merged=False))
    profiled = run_cell(tiny_cell_settings(tiny_model_dir, "nf4", eval_merged=False, profile_steps=2))
    assert plain["profile"] is None and profiled["profile"]["calls"] == 2
    assert profiled["training"]["losses"] == plain["training"]["losses"]
    assert profiled["perplexity"] == plain["perplexity"]
    assert "profiling" in profiled["phase_seconds"]
    [row] = profile_rows([profiled, plain])
    assert row[1:4] == ["nf4", "2", f"{profiled['profile']['wall_s_per_call'] * 1e3:.0f}"] and row[4:7] == ["-"] * 3


@pytest.mark.gpu
def test_device_kernels_and_their_time_are_counted_on_cuda():
    """On CUDA the summary counts kernels and their device time: a matmul is one kernel or more, busy for part
    of the wall time (never more: one stream)."""
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    summary, _ = profile_calls(lambda: a @ a, 3, device)
    assert summary["kernels_per_call"] >= 1 and summary["kernel_s_per_call"] > 0
    assert 0 < summary["device_busy_share"] <= 1
    assert summary["top_kernels"] and summary["top_kernels"][0]["ms_per_call"] > 0
    assert any(op["name"] == "aten::mm" for op in summary["top_host_ops"])
