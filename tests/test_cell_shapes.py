"""Cells of named shapes (random weights: memory and time only), the training path setting, the floor beside
every measurement, and shapes predicted not to fit; end to end through run_cell and through bench/ on CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_core.cell import CellSettings, does_not_fit_result, run_cell
from qlora_core.lora import LoraSettings
from qlora_core.results import read_results
from qlora_core.shapes import RANDOM_WEIGHTS_NOTE, UnknownShapeError
from qlora_core.trainer import TrainSettings

REPO = Path(__file__).resolve().parents[1]
SHAPE_CELL = dict(seq_len=32, batch_size=2, timing_warmup=1, device="cpu", lora=LoraSettings(r=4, alpha=8),
                  train=TrainSettings(max_steps=2, learning_rate=1e-2))
COMPARED = ("weights_after_load", "after_setup", "training_peak", "true_floor")


def shape_settings(mode: str = "nf4-dq", path: str = "reference", shape: str = "tiny-llama") -> CellSettings:
    return CellSettings(mode=mode, shape=shape, path=path, **SHAPE_CELL)


@pytest.fixture(scope="module", params=["reference", "lean"])
def shape_run(request) -> tuple[CellSettings, dict, list[dict]]:
    events: list[dict] = []
    settings = shape_settings(path=request.param)
    return settings, run_cell(settings, report=events.append), events


def test_shape_cell_measures_memory_and_time_only(shape_run):
    settings, result, events = shape_run
    assert result["status"] == "ok" and result["note"] == RANDOM_WEIGHTS_NOTE
    assert result["model"]["label"] == "tiny-llama"
    assert result["model"]["provenance"]["source"] == RANDOM_WEIGHTS_NOTE
    assert result["perplexity"] == {} and result["quant_error"] is None
    assert not any("evaluating" in event.get("phase", "") for event in events)
    assert all(math.isfinite(loss) for loss in result["training"]["losses"])
    assert result["training"]["tokens_per_step"] == settings.batch_size * settings.seq_len
    json.dumps(result, allow_nan=False)


def test_shape_and_path_are_saved_with_the_settings(shape_run):
    settings, result, _ = shape_run
    assert result["settings"]["shape"] == "tiny-llama" and result["settings"]["path"] == settings.path
    assert CellSettings.from_dict(json.loads(json.dumps(result["settings"]))) == settings


def test_floor_beside_the_measurements(shape_run):
    """On CPU the allocator cannot be read: weights and set-up are compared with the tensors' bytes (exactly
    predicted), the training peak is predicted but left unmeasured."""
    settings, result, _ = shape_run
    floor, comparison = result["floor"], result["predicted_vs_measured"]
    assert floor["path"] == settings.path and floor["device_type"] == "cpu"
    assert set(comparison) == set(COMPARED)
    for name in ("weights_after_load", "after_setup"):
        assert comparison[name]["measured_by"] == "tensor bytes"
        assert comparison[name]["remainder_bytes"] == 0 and comparison[name]["ratio"] == 1.0
    assert comparison["weights_after_load"]["measured_bytes"] == result["weights"]["weights_bytes"]
    assert comparison["training_peak"]["measured_bytes"] is None
    assert comparison["training_peak"]["predicted_bytes"] == floor["peak_bytes"] > floor["after_setup_bytes"]
    assert comparison["true_floor"]["predicted_bytes"] == floor["true_floor_bytes"]


def test_an_optimizer_state_made_upfront_is_predicted_at_set_up():
    """A probe's optimizer state, made at set-up, is in the set-up's tensors and in their prediction, exactly."""
    settings = shape_settings(path="lean")
    upfront = dataclasses.replace(settings, train=dataclasses.replace(settings.train, optimizer_state_upfront=True))
    results = [run_cell(cell) for cell in (settings, upfront)]
    plain, made = (result["predicted_vs_measured"]["after_setup"] for result in results)
    assert made["remainder_bytes"] == plain["remainder_bytes"] == 0
    adam_moments = 2 * 4 * results[0]["parameters"]["trainable_params"]  # two fp32 moments a parameter
    assert made["measured_bytes"] - plain["measured_bytes"] == adam_moments


def test_lean_and_reference_cells_train_the_same(shape_run):
    """Same random model and batches: the paths' first losses agree to rounding."""
    settings, result, _ = shape_run
    other = run_cell(dataclasses.replace(settings, path="lean" if settings.path == "reference" else "reference"))
    assert result["training"]["losses"][0] == pytest.approx(other["training"]["losses"][0], rel=1e-3)


def test_model_cells_carry_the_floor_too(cell_results):
    for result in cell_results.values():
        assert result["note"] is None and result["settings"]["path"] == "reference"
        assert result["predicted_vs_measured"]["weights_after_load"]["ratio"] == 1.0
        assert result["floor"]["weights_bytes"] == result["weights"]["weights_bytes"]


def test_settings_refuse_unknown_paths_and_shapes():
    with pytest.raises(ValueError, match="unknown path"):
        shape_settings(path="fastest")
    with pytest.raises(UnknownShapeError):
        shape_settings(shape="Llama-5-1T")


def test_a_shape_cell_trains_past_its_positions_only_when_told_to():
    """tiny-llama has 256 positions; RoPE computes position 320 as well as any: the step runs."""
    past = dataclasses.replace(shape_settings(path="lean"), seq_len=320, train=TrainSettings(max_steps=1),
                               timing_warmup=0)
    with pytest.raises(ValueError, match="exceeds the model's limit of 256 positions"):
        run_cell(past)
    result = run_cell(dataclasses.replace(past, beyond_positions=True))
    assert result["status"] == "ok" and result["settings"]["beyond_positions"]
    with pytest.raises(ValueError, match="beyond_positions is for shape cells"):
        CellSettings(mode="bf16", model="smollm2", beyond_positions=True)


def test_does_not_fit_reports_the_prediction():
    settings = shape_settings(mode="bf16", shape="Llama-3.1-70B")
    h200_bytes = 139 * 2**30
    result = does_not_fit_result(dataclasses.replace(settings, seq_len=1024, batch_size=4), h200_bytes)
    assert result["status"] == "does_not_fit" and result["note"] == RANDOM_WEIGHTS_NOTE
    assert result["floor"]["peak_bytes"] > result["capacity_bytes"] == h200_bytes
    assert "not attempted" in result["error"]
    assert does_not_fit_result(dataclasses.replace(settings, mode="nf4-dq", seq_len=1024, batch_size=4),
                               h200_bytes) is None
    model_cell = CellSettings(mode="bf16", model="smollm2")
    assert does_not_fit_result(model_cell, 1) is None  # only shapes are predicted before loading


def run_bench(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "bench/", "-q", "-rs", "-p", "no:cacheprovider", "--bench-device",
               "cpu", "--bench-shapes", "tiny-llama", "--bench-seq-len", "32", "--bench-batch-size", "2",
               "--bench-steps", "2", "--bench-warmup", "1",
               "--bench-out", str(tmp_path / "out"), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_bench_runs_a_shape_on_the_lean_path(tmp_path):
    bench_json = tmp_path / "not-yet-made" / "bench.json"  # bench/ creates the folder pytest-benchmark needs
    run = run_bench(tmp_path, "--bench-modes", "nf4-dq", "--bench-paths", "lean", "--benchmark-json", str(bench_json))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and RANDOM_WEIGHTS_NOTE in run.stdout  # the perplexity test
    (result,) = read_results([tmp_path / "out" / "tiny-llama-nf4-dq-lean.json", bench_json])
    assert result.status == "ok" and result.settings.path == "lean"
    assert result.predicted_vs_measured["after_setup"].ratio == 1.0


def test_bench_reports_an_unfit_shape_without_running_it(tmp_path):
    run = run_bench(tmp_path, "--bench-modes", "bf16", "--bench-capacity-gib", "0.0001")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 skipped" in run.stdout and "does not fit" in run.stdout
    result = json.loads((tmp_path / "out" / "tiny-llama-bf16.json").read_text())
    assert result["status"] == "does_not_fit" and result["floor"]["peak_bytes"] > result["capacity_bytes"]
    assert not (tmp_path / "out" / "tiny-llama-bf16.log").exists()  # no worker was started


#: Issue 5's target for the lean path: peak within 1.10x of the analytic floor in every mode.
LEAN_PEAK_TARGET_RATIO = 1.10


@pytest.fixture(scope="module", params=["bf16", "int8", "nf4-dq"])
def lean_1b_on_cuda(request) -> dict:
    """Llama-3.2-1B shape on the lean path, 4 x 1024 tokens, r=16 all-linear, checkpointing, on CUDA: the
    cell's result (made once per mode for the tests below)."""
    settings = dataclasses.replace(shape_settings(mode=request.param, path="lean", shape="Llama-3.2-1B"),
                                   seq_len=1024, batch_size=4, timing_warmup=2, device="cuda",
                                   lora=LoraSettings(), train=TrainSettings(max_steps=4))
    return run_cell(settings)


@pytest.mark.gpu
def test_lean_weights_and_set_up_match_the_floor_on_cuda(lean_1b_on_cuda):
    """Weights after load and after set-up: tensors plus the allocator's rounding, against the allocator's growth
    since the load began (this process ran other tests' models before)."""
    rows = lean_1b_on_cuda["predicted_vs_measured"]
    assert {row["measured_by"] for row in rows.values()} == {"cuda allocator"}
    assert rows["weights_after_load"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert rows["after_setup"]["ratio"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.gpu
def test_lean_peak_within_target_of_the_floor_on_cuda(lean_1b_on_cuda):
    """int8 included: its matmuls' held inputs and their measured outlier columns are in the floor."""
    if lean_1b_on_cuda["mode"]["name"] == "int8":
        outliers = lean_1b_on_cuda["int8_outliers"]
        assert set(outliers["columns"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert lean_1b_on_cuda["floor"]["int8_outlier_columns"] == outliers["columns"]
    # below 1 the floor over-estimates a transient: report it, but the target is the upper bound
    assert 0.9 <= lean_1b_on_cuda["predicted_vs_measured"]["training_peak"]["ratio"] <= LEAN_PEAK_TARGET_RATIO


@pytest.fixture(scope="module")
def both_paths() -> list[dict]:
    """One bf16 cell of the tiny shape on each training path."""
    return [run_cell(shape_settings("bf16", path)) for path in ("reference", "lean")]


def test_report_keeps_the_two_paths_apart_and_says_the_weights_are_random(both_paths, tmp_path):
    from qlora_core.report import floor_frame, footnotes, markdown_report, plot, results_frame

    frame = results_frame(both_paths)
    assert sorted(frame["model"]) == ["tiny-llama", "tiny-llama (lean path)"]
    assert frame["ppl_heldout_after"].isna().all()
    assert any(RANDOM_WEIGHTS_NOTE in note for note in footnotes(both_paths))
    floor = floor_frame(both_paths)
    weights = floor[floor["point"] == "weights_after_load"]
    assert len(weights) == 2 and (weights["measured_mib"] == weights["predicted_mib"]).all()
    assert "analytic floor vs measured" in markdown_report(both_paths)
    assert plot(both_paths, tmp_path / "shapes.png").stat().st_size > 0


def _run_in_a_process_of_its_own(settings: CellSettings) -> dict:
    """``run_cell`` in a fresh worker process, as bench/ and the sweep run a cell."""
    from qlora_core.worker import CellWorker

    with CellWorker() as worker:
        worker.bind(settings)
        return worker.call("run_all")


@pytest.mark.gpu
def test_a_memory_cap_makes_a_smaller_gpu_of_the_h200():
    """A cell capped below its need ends in the allocator's OutOfMemoryError (a result: oom), one capped above it
    runs and reserves no more than the cap. Each cell has a process of its own, as in a run: in a process that
    held an earlier cell, blocks left in partly used segments served a capped cell unchecked (H200, 2026-12-02)."""
    from qlora_core.worker import CellError

    settings = dataclasses.replace(shape_settings("nf4-dq", "lean"), device="cuda")
    needed = _run_in_a_process_of_its_own(settings)["memory"]["training_peak"]["peak_reserved_bytes"]
    with pytest.raises(CellError) as below:
        _run_in_a_process_of_its_own(dataclasses.replace(settings, memory_cap_bytes=needed // 4))
    assert below.value.status == "oom"
    capped = _run_in_a_process_of_its_own(dataclasses.replace(settings, memory_cap_bytes=2 * needed))
    assert capped["memory"]["training_peak"]["peak_reserved_bytes"] <= 2 * needed


def test_a_memory_cap_must_be_positive():
    with pytest.raises(ValueError, match="memory_cap_bytes must be >= 1"):
        dataclasses.replace(shape_settings("bf16", "lean"), memory_cap_bytes=0)
