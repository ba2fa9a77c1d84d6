"""The memory picture (``report.memory_plot``): drawn from the floor and the measurements in result JSON, for
GPU runs (the published H200 run), CPU runs (predicted only) and cells that never ran; skipped without floors.
The components it stacks are checked to sum to the prediction in tests/test_measure_floor.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qlora_core.cell import CellSettings, does_not_fit_result
from qlora_core.cli import main
from qlora_core.lora import LoraSettings
from qlora_core.report import markdown_report, measured_peak, memory_plot
from qlora_core.result_model import CellResult, as_cells
from qlora_core.results import read_results
from qlora_core.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[1]
#: The published H200 run whose cells carry a floor and its comparison with the CUDA allocator.
PUBLISHED = REPO / "results" / "h200-smollm2-2026-12-02" / "run-1"
#: An older published run, from before cells carried a floor.
WITHOUT_FLOORS = REPO / "results" / "h200-smollm2-2026-11-28" / "cells"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def published() -> list[CellResult]:
    return read_results([PUBLISHED])


def test_measured_peak_is_the_allocators_with_its_slack(published):
    for result in published:
        measured = measured_peak(result)
        peak = result.memory.training_peak
        assert measured["allocated_bytes"] == result.predicted_vs_measured["training_peak"].measured_bytes
        assert measured["slack_bytes"] == peak.peak_reserved_bytes - peak.peak_allocated_bytes > 0


def test_memory_plot_of_the_published_run(published, tmp_path):
    path = memory_plot(published, tmp_path / "memory.png")
    assert path == tmp_path / "memory.png" and path.read_bytes()[:8] == PNG_MAGIC


def test_cpu_cells_are_predicted_only(cell_results, tmp_path):
    results = as_cells(cell_results.values())
    assert all(r.floor and measured_peak(r) is None for r in results)  # CPU: the allocator is not read
    assert memory_plot(results, tmp_path / "cpu.png").read_bytes()[:8] == PNG_MAGIC


def test_cells_without_a_floor_are_left_out(published, tmp_path):
    no_floor = published[0].with_values(floor=None, model=published[0].model.with_values(label="no-floor"))
    assert memory_plot([no_floor, *published[1:]], tmp_path / "some.png").read_bytes()[:8] == PNG_MAGIC
    assert memory_plot([no_floor], tmp_path / "none.png") is None
    assert memory_plot(read_results([WITHOUT_FLOORS]), tmp_path / "old.png") is None
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "old.png").exists()


def test_a_cell_that_does_not_fit_shows_its_prediction(tmp_path):
    settings = CellSettings(mode="bf16", shape="tiny-llama", seq_len=32, batch_size=2, timing_warmup=1,
                            device="cpu", lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_steps=2))
    unfit = CellResult.from_json(does_not_fit_result(settings, capacity_bytes=1))
    assert unfit.status == "does_not_fit" and measured_peak(unfit) is None
    assert memory_plot([unfit], tmp_path / "unfit.png").read_bytes()[:8] == PNG_MAGIC
    lean = does_not_fit_result(dataclasses.replace(settings, path="lean"), capacity_bytes=1)
    assert memory_plot([unfit, lean], tmp_path / "paths.png").read_bytes()[:8] == PNG_MAGIC


def test_report_links_the_picture_only_when_given(published):
    assert "![memory by component](memory.png)" in markdown_report(published, memory_png="memory.png")
    assert "memory.png" not in markdown_report(published)


def test_report_command_writes_the_picture(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(PUBLISHED), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["memory.png", "report.csv", "report.md", "report.png"]
    assert (out / "memory.png").read_bytes()[:8] == PNG_MAGIC
    assert "![memory by component](memory.png)" in (out / "report.md").read_text()
    assert f"{out / 'report.png'}, {out / 'memory.png'}" in capsys.readouterr().out
