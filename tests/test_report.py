"""Tables and plots rendered from real ``run_cell`` results (the session's tiny-model runs)."""

from __future__ import annotations

import copy
import csv
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tiny import CELL_MODES, TINY_CELL
from qlora_core.cli import main
from qlora_core.modes import BASELINE_MODE, MODES
from qlora_core.report import (RATIO_COLUMNS, compare_frames, comparison_markdown, footnotes, has_regression,
                               markdown_report, markdown_table, plot, results_frame, rich_table)
from qlora_core.results import read_results
from qlora_core.units import GIB, MIB

#: The published H200 run: cells/ holds all seven modes; the pytest-benchmark JSON, of the resumed invocation,
#: holds fp4-dq, nf4 and nf4-dq with their memory pass (results/README.md tells how it ran).
STORED = Path(__file__).resolve().parents[1] / "results" / "h200-smollm2-2026-11-28"
STORED_CELLS, STORED_BENCH = STORED / "cells", STORED / "pytest-benchmark-resumed.json"
#: The modes the stored run measured (the seven bitsandbytes and half-precision ones), in registry order.
STORED_MODES = [mode for mode in MODES if (STORED_CELLS / f"smollm2-{mode}.json").is_file()]


def raw_figures(result: dict, peak_bytes: int | None = None) -> dict:
    """The figures a row should hold, read straight from the result JSON (independently of report.py); the
    peak is the cell's own unless given (the memory pass's)."""
    ppl = result["perplexity"]
    return {
        "weights_mib": result["weights"]["weights_bytes"] / MIB,
        "peak_gib": (peak_bytes or result["memory"]["training_peak"]["peak_rss_bytes"]) / GIB,
        "step_ms": 1000 * result["training"]["timing"]["median_s"],
        "tokens_per_s": result["training"]["tokens_per_s"],
        "ppl_heldout_before": ppl["before"]["heldout"]["perplexity"],
        "ppl_heldout_after": ppl["after"]["heldout"]["perplexity"],
        "ppl_eval_text_before": ppl["before"]["eval_text"]["perplexity"],
        "ppl_eval_text_after": ppl["after"]["eval_text"]["perplexity"],
    }


@pytest.fixture(scope="module")
def results(cell_results) -> list[dict]:
    return [cell_results[mode] for mode in reversed(CELL_MODES)]  # out of order on purpose


def test_rows_follow_the_registry_order(results):
    frame = results_frame(results)
    assert frame["mode"].tolist() == [m for m in MODES if m in CELL_MODES]
    assert set(frame["status"]) == {"ok"} and set(frame["memory_kind"]) == {"cpu_rss"}


def test_values_and_ratios_to_bf16(results, cell_results):
    frame = results_frame(results).set_index("mode")
    baseline = raw_figures(cell_results[BASELINE_MODE])
    assert set(RATIO_COLUMNS) == set(baseline)  # every ratio column is checked below
    for mode in CELL_MODES:
        raw = raw_figures(cell_results[mode])
        for column, value in raw.items():
            assert frame.loc[mode, column] == pytest.approx(value)
            assert frame.loc[mode, f"{column}_ratio"] == pytest.approx(value / baseline[column])
    for column in RATIO_COLUMNS:
        assert frame.loc[BASELINE_MODE, f"{column}_ratio"] == 1.0
    # a 4-bit base stores its linear weights in about a quarter of bf16's bytes
    assert frame.loc["nf4", "weights_mib_ratio"] < 0.9


def test_other_columns(results, cell_results):
    frame = results_frame(results).set_index("mode")
    for mode in CELL_MODES:
        result = cell_results[mode]
        bits = result["weights"]["bits_per_quantized_param"]
        if bits is None:
            assert pd.isna(frame.loc[mode, "bits_per_param"])
        else:
            assert frame.loc[mode, "bits_per_param"] == bits
        assert frame.loc[mode, "quant_error"] == pytest.approx(result["quant_error"]["relative_l2"])
        assert frame.loc[mode, "loss_first"] == result["training"]["losses"][0]
        assert frame.loc[mode, "loss_last"] == result["training"]["losses"][-1]
        assert frame.loc[mode, "ppl_heldout_before"] == result["perplexity"]["before"]["heldout"]["perplexity"]
        assert frame.loc[mode, "step_iqr_ms"] == pytest.approx(1000 * result["training"]["timing"]["iqr_s"])


def test_ratios_are_within_each_model(results):
    """Results of a second model get ratios to that model's own baseline row."""
    other = copy.deepcopy(results)
    for result in other:
        result["model"]["label"] = "other-model"
        result["weights"]["weights_bytes"] *= 3
    frame = results_frame(results + other)
    assert len(frame) == 2 * len(results)
    ours = frame[frame["model"] != "other-model"].set_index("mode")["weights_mib_ratio"]
    theirs = frame[frame["model"] == "other-model"].set_index("mode")["weights_mib_ratio"]
    assert theirs.to_dict() == pytest.approx(ours.to_dict())  # x3 on both sides of every ratio


def test_one_model_in_two_set_ups_reads_as_two_models(results, tmp_path):
    """Two runs of one model with other token counts, read together (as ``report results/`` does): each set-up
    gets its own label, baseline and table, named by the settings that differ."""
    from qlora_core.results import write_json_atomic

    longer = copy.deepcopy(results)
    for result in longer:
        result["settings"]["seq_len"] *= 2
        result["weights"]["weights_bytes"] *= 3
    for index, result in enumerate(results + longer):
        write_json_atomic(result, tmp_path / f"run-{index // len(results)}" / f"{result['mode']['name']}.json")
    frame = results_frame(read_results([tmp_path]))
    seq_len = TINY_CELL["seq_len"]
    assert sorted(set(frame["model"])) == [f"tiny-llama [seq_len={seq_len}]", f"tiny-llama [seq_len={2 * seq_len}]"]
    assert (frame[frame["mode"] == BASELINE_MODE]["weights_mib_ratio"] == 1.0).all()
    assert "tiny-llama [seq_len=" in markdown_report(read_results([tmp_path]))


def test_two_set_ups_on_the_lean_path_name_the_path_once(results, tmp_path):
    from qlora_core.results import write_json_atomic

    lean = copy.deepcopy(results)
    for result in lean:
        result["settings"]["path"] = "lean"
    longer = copy.deepcopy(lean)
    for result in longer:
        result["settings"]["seq_len"] *= 2
    for index, result in enumerate(lean + longer):
        write_json_atomic(result, tmp_path / f"run-{index // len(lean)}" / f"{result['mode']['name']}.json")
    seq_len = TINY_CELL["seq_len"]
    assert sorted(set(results_frame(read_results([tmp_path]))["model"])) == [
        f"tiny-llama [seq_len={seq_len}] (lean path)", f"tiny-llama [seq_len={2 * seq_len}] (lean path)"]


def test_a_list_setting_reads_as_its_items_in_a_label(results, tmp_path):
    from qlora_core.results import write_json_atomic

    for run, kernels in enumerate(([], ["rms-norm", "swiglu"])):
        for result in copy.deepcopy(results):
            result["settings"]["kernels"] = kernels
            write_json_atomic(result, tmp_path / f"run-{run}" / f"{result['mode']['name']}.json")
    labels = sorted(set(results_frame(read_results([tmp_path]))["model"]))
    assert labels == ["tiny-llama [kernels=none]", "tiny-llama [kernels=rms-norm,swiglu]"]


def test_a_setting_a_result_predates_reads_as_its_default(results, tmp_path):
    """A cell recorded before ``attention`` existed ran as the model loaded, which is that setting's default:
    beside the same cell recorded since, it is the same cell, read once, and beside an
    eager one the label names the default, not ``unset``."""
    from qlora_core.results import read_paths, write_json_atomic

    for run, attention in enumerate(("predates", None, "eager")):
        for result in copy.deepcopy(results):
            if attention == "predates":
                result["settings"].pop("attention", None)
            else:
                result["settings"]["attention"] = attention
            write_json_atomic(result, tmp_path / f"run-{run}" / f"{result['mode']['name']}.json")
    again = read_paths([tmp_path / "run-0", tmp_path / "run-1"])
    assert set(results_frame(again.results)["model"]) == {"tiny-llama"} and len(again.results) == len(results)
    assert sorted(set(results_frame(read_results([tmp_path / "run-0", tmp_path / "run-2"]))["model"])) == [
        "tiny-llama [attention=None]", "tiny-llama [attention=eager]"]


def test_set_ups_alike_in_their_first_settings_still_get_labels_of_their_own(results, tmp_path):
    """Three set-ups whose first differing settings (tokens, steps, LoRA rank) leave two alike: their labels
    name settings until each is its own, so no two cells become one row (``report results/`` crashed on it)."""
    from qlora_core.results import write_json_atomic

    def variant(seq_len_factor: int, steps: int, r: int, learning_rate: float) -> list[dict]:
        cells = copy.deepcopy(results)
        for result in cells:
            settings = result["settings"]
            settings["seq_len"] *= seq_len_factor
            settings["train"]["max_steps"] = steps
            settings["lora"]["r"] = r
            settings["train"]["learning_rate"] = learning_rate
        return cells

    runs = [variant(1, 3, 4, 1e-4), variant(2, 5, 8, 1e-4), variant(2, 5, 8, 2e-4)]
    for run, cells in enumerate(runs):
        for result in cells:
            write_json_atomic(result, tmp_path / f"run-{run}" / f"{result['mode']['name']}.json")
    frame = results_frame(read_results([tmp_path]))
    labels = sorted(set(frame["model"]))
    assert len(labels) == 3
    assert all("train.learning_rate=" in label for label in labels)
    assert len(frame) == 3 * len(results)


def test_failed_cell_is_a_row_with_its_error(results):
    failed = {
        "schema": results[0]["schema"], "status": "error", "mode": MODES["fp4"].describe(),
        "settings": results[0]["settings"], "error": "DatasetError: no rows", "model": results[0]["model"],
    }
    frame = results_frame(results + [failed])
    row = frame.set_index("mode").loc["fp4"]
    assert row["status"] == "error" and row["error"] == "DatasetError: no rows"
    assert "fp4 | error: DatasetError: no rows" in markdown_table(results + [failed])


def test_markdown_table(results, cell_results):
    text = markdown_table(results)
    lines = text.splitlines()
    assert lines[0].startswith("| model | mode | weights MiB |")
    rows = {line.split(" | ")[1]: line for line in lines[2:] if line.startswith("| ")}
    assert list(rows) == [m for m in MODES if m in CELL_MODES]
    baseline_bytes = cell_results[BASELINE_MODE]["weights"]["weights_bytes"]
    for mode in CELL_MODES:
        weights = cell_results[mode]["weights"]["weights_bytes"]
        cell = f"{weights / MIB:.1f}"
        if mode != BASELINE_MODE:
            cell += f" (x{weights / baseline_bytes:.2f})"
        assert f"| {cell} |" in rows[mode]
    assert "(x" not in rows[BASELINE_MODE]
    assert "CPU figures" in text
    window, stride, n_tokens = TINY_CELL["eval_window"], TINY_CELL["eval_stride"], TINY_CELL["eval_max_tokens"]
    assert f"window {window}, stride {stride}, {n_tokens - 1} tokens scored" in text


def finished_cell(**sections) -> dict:
    """A finished cell's JSON holding what the result model requires, and ``sections``."""
    return {"schema": "qlora-bench/cell/1", "status": "ok", "mode": {"name": "nf4"}, "settings": {},
            "model": {"provenance": {}}, "weights": {"weights_bytes": 1, "bits_per_quantized_param": 4.0},
            "memory": {"training_peak": {"kind": "cuda"}}, "perplexity": {},
            "training": {"timing": {"median_s": 1.0, "iqr_s": 0.0, "noisy": False, "rounds": 2, "warmup": 1},
                         "tokens_per_s": 1.0, "mfu": None, "losses": [1.0]}, **sections}


def test_footnotes_name_provenance_note():
    result = finished_cell(model={"provenance": {"name": "M", "note": "already 4-bit"}},
                           perplexity={"before": {"heldout": {"perplexity": 9.0, "window": 8, "stride": 4,
                                                              "n_tokens_scored": 9}}})
    notes = footnotes([result])
    assert "M: already 4-bit." in notes
    assert not any("CPU figures" in note for note in notes)


def test_footnotes_state_the_int8_matmul_dtype_only_for_int8_results():
    result = finished_cell()
    assert not any(note.startswith("int8:") for note in footnotes([result]))
    notes = footnotes([result, {**result, "int8_matmul_dtype": "float16"}])
    assert "int8: bitsandbytes casts the int8 matmuls' inputs to float16 whatever the mode's compute dtype." in notes


def test_footnotes_say_an_eager_attention_cell_has_no_prediction():
    eager = finished_cell(settings={"attention": "eager"}, model={"provenance": {}, "attn_implementation": "eager"})
    assert any(note.endswith("eager attention (transformers' matmul, softmax and matmul: the attention matrix is "
                             "made); the memory floor assumes fused attention (no prediction).")
               for note in footnotes([eager]))
    assert not any("eager attention" in note for note in footnotes([finished_cell()]))


def test_footnotes_say_an_int8_cell_computed_with_its_weight_dequantized():
    """The dequantized int8 matmul computes in the mode's dtype: no cast is claimed for it, and its note says so."""
    kernel = finished_cell(int8_matmul_dtype="float16")
    dequantized = finished_cell(int8_matmul_dtype="bfloat16", settings={"int8_matmul": "dequantized"})
    notes = footnotes([dequantized])
    assert not any("casts" in note for note in notes)
    assert any(note.startswith("int8 [int8_matmul=dequantized]: each int8 weight dequantized") for note in notes)
    both = footnotes([kernel, dequantized])
    assert sum(note.startswith("int8") for note in both) == 2


def test_footnotes_give_the_gpu_state_over_the_timed_steps(results):
    """The warm-up steps are left out; cells without readings (a CPU, no NVML) are left out."""
    read = copy.deepcopy(results[0])
    warmup = read["training"]["timing"]["warmup"]
    states = [{"sm_clock_mhz": 1980, "temperature_c": 70, "power_w": 700.0}] * warmup + [
        {"sm_clock_mhz": 1980, "temperature_c": 41, "power_w": 412.4},
        {"sm_clock_mhz": 1755, "temperature_c": 44, "power_w": 498.6}]
    read["training"]["device_states"] = states
    (note,) = [note for note in footnotes([read, results[1]]) if note.startswith("GPU during")]
    assert note == ("GPU during the timed steps (NVML after each step: SM clock, temperature, power): "
                    f"{read['mode']['name']} 1755-1980 MHz, up to 44 C, 412-499 W.")
    assert not any(note.startswith("GPU during") for note in footnotes(results))


def test_footnotes_name_the_timed_steps_that_went_to_the_driver_for_memory(results):
    """Warm-up steps are expected to allocate and are left out; cells whose later steps did not are not named."""
    read = copy.deepcopy(results[0])
    warmup = read["training"]["timing"]["warmup"]
    read["training"]["step_cuda_mallocs"] = [5] * warmup + [0, 2, 0, 1]
    quiet = copy.deepcopy(results[1])
    quiet["training"]["step_cuda_mallocs"] = [7] * warmup + [0, 0, 0, 0]
    (note,) = [note for note in footnotes([read, quiet]) if "cudaMalloc" in note]
    assert note.endswith(f": {read['mode']['name']} in 2 of 4 steps (3 calls).")
    assert not any("cudaMalloc" in note for note in footnotes([quiet]))


def test_footnotes_give_each_processs_peak_for_a_cell_on_several(results):
    several = copy.deepcopy(results[0])
    peak = lambda gib: {"memory": {"training_peak": {"kind": "cuda", "peak_allocated_bytes": int(gib * 2**30)}}}  # noqa: E731
    several["ranks"] = [{"rank": 0, **peak(8.5)}, {"rank": 1, **peak(8.25)}]
    (note,) = [note for note in footnotes([several]) if "processes" in note]
    assert note.endswith(f"{several['mode']['name']}: trained on 2 processes; peak GiB by process 8.50, 8.25 "
                         f"(largest 8.50) (DDP: each held the whole model); the table shows process 0's, which "
                         f"also evaluated.")
    assert not any("processes;" in note for note in footnotes(results))


def test_footnotes_give_the_scaling_of_a_cell_on_several_processes_beside_one(results):
    one = copy.deepcopy(results[0])
    two = copy.deepcopy(one)
    two["settings"]["num_processes"] = 2
    two["training"]["tokens_per_s"] = 1.8 * one["training"]["tokens_per_s"]
    (note,) = [note for note in footnotes([one, two]) if "scaling efficiency" in note]
    assert note.endswith(f"{two['mode']['name']}: 2 processes train 1.80x the tokens a second of one process: "
                         f"scaling efficiency 90%.")
    other = copy.deepcopy(two)
    other["settings"]["seq_len"] += 1  # another set-up: nothing to scale against
    assert not any("scaling efficiency" in note for note in footnotes([one, other]))


def test_footnotes_give_each_int8_linears_outlier_share(results):
    int8 = copy.deepcopy(results[0])
    int8["int8_outliers"] = {"columns": {"o_proj": 1.0, "down_proj": 96.0}, "share": {"o_proj": 0.01, "down_proj": 0.5}}
    (note,) = [note for note in footnotes([int8]) if "outlier columns" in note]
    assert note.endswith("int8: outlier columns (last step, share of each linear's inputs): o_proj 1.0%, "
                         "down_proj 50.0%.")
    assert not any("outlier columns" in note for note in footnotes(results))


def test_footnotes_name_the_fused_kernels_a_cell_ran(results):
    fused = copy.deepcopy(results[0])
    fused["settings"]["kernels"] = ["rms-norm", "swiglu"]
    (note,) = [note for note in footnotes([fused, results[1]]) if "Liger-Kernel" in note]
    assert note.endswith(f"{fused['mode']['name']}: fused kernels (Liger-Kernel): rms-norm, swiglu; the memory "
                         f"floor does not model them (no prediction).")
    assert not any("Liger-Kernel" in note for note in footnotes(results))


def test_noisy_step_time_is_marked(results):
    steady = copy.deepcopy(results)
    for result in steady:
        result["training"]["timing"]["noisy"] = False
    steady[0]["training"]["timing"]["noisy"] = True  # nf4-dq (results are in reverse order)
    rows = {line.split(" | ")[1]: line for line in markdown_table(steady).splitlines() if line.startswith("| ")}
    assert " ~ |" in rows["nf4-dq"] and " ~ |" not in rows["bf16"]


def test_rich_table_has_a_column_per_mode(results):
    from rich.console import Console

    console = Console(record=True, width=240)
    console.print(rich_table(results, title="t"))
    text = console.export_text()
    for mode in CELL_MODES:
        assert mode in text
    assert "weights MiB" in text and "ppl quotes after" in text


def test_plot_writes_png(results, tmp_path):
    import matplotlib.image

    path = plot(results, tmp_path / "report.png")
    assert path == tmp_path / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    # one model: a 2 x 2 grid (peak, step time, tokens/s, perplexities) on 11 x 8 inches at 120 dpi
    assert (width, height) == (round(11 * 120), round(8 * 120))


def test_tables_per_model(results):
    other = copy.deepcopy(results)
    for result in other:
        result["model"]["label"] = "other-model"
    text = markdown_table(results + other)
    assert "### other-model" in text and f"### {results[0]['model']['label']}" in text
    assert text.count("| model | mode |") == 2
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rich_table(results + other, title="t"))
    assert "t: other-model" in console.export_text()


# --- the published H200 run ----------------------------------------------------------------------------------


def test_every_published_result_renders_in_one_report(tmp_path, capsys):
    """``qlora-bench report results`` reads every published run at once and renders it, no cell lost to a label
    two set-ups share (issue 10: results/ renders without hand edits)."""
    published = STORED.parent
    assert main(["report", str(published), "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "report.csv")
    cells = read_results([published])
    assert len(table) == len(cells) == len(table[["model", "mode"]].drop_duplicates())
    assert "wrote" in capsys.readouterr().out



def stored_json() -> tuple[dict[str, dict], dict[str, dict]]:
    """mode -> cell result from cells/, and mode -> the test_memory benchmark's extra_info (the memory pass), read
    straight from the files (independently of read_results)."""
    cells = {}
    for file in STORED_CELLS.glob("*.json"):
        result = json.loads(file.read_text())
        cells[result["mode"]["name"]] = result
    benchmarks = json.loads(STORED_BENCH.read_text())["benchmarks"]
    memory_pass = {b["extra_info"]["mode"]: b["extra_info"] for b in benchmarks if b["name"].startswith("test_memory[")}
    return cells, memory_pass


@pytest.fixture(scope="module")
def stored_frame() -> pd.DataFrame:
    return results_frame(read_results([STORED_CELLS, STORED_BENCH]))


def test_stored_run_has_every_mode_once(stored_frame):
    cells, memory_pass = stored_json()
    assert len(cells) == 7 and set(memory_pass) == {"fp4-dq", "nf4", "nf4-dq"}
    assert stored_frame["mode"].tolist() == [m for m in MODES if m in cells]  # each once, registry order
    assert set(stored_frame["model"]) == {"smollm2"} and set(stored_frame["status"]) == {"ok"}
    assert set(stored_frame["memory_kind"]) == {"cuda"}
    # the benchmark JSON read alone gives its three cells; read first or second, the same frame
    assert read_results([STORED_BENCH])[0].mode.name in memory_pass
    pd.testing.assert_frame_equal(results_frame(read_results([STORED_BENCH, STORED_CELLS])), stored_frame)


def test_stored_values_and_ratios_to_bf16(stored_frame):
    cells, memory_pass = stored_json()
    peaks = {mode: info["memory"]["training_peak"]["peak_allocated_bytes"] for mode, info in memory_pass.items()}
    raw = {mode: raw_figures(result, peaks.get(mode) or result["memory"]["training_peak"]["peak_allocated_bytes"])
           for mode, result in cells.items()}
    frame = stored_frame.set_index("mode")
    for mode, figures in raw.items():
        for column, value in figures.items():
            assert frame.loc[mode, column] == pytest.approx(value), (mode, column)
            assert frame.loc[mode, f"{column}_ratio"] == pytest.approx(value / raw[BASELINE_MODE][column])
    # spot checks against results/README.md: 4-bit weights 0.42x of bf16, int8 peaks 58 % above it
    assert frame.loc["nf4-dq", "weights_mib_ratio"] == pytest.approx(0.415, abs=0.005)
    assert frame.loc["int8", "peak_gib_ratio"] == pytest.approx(1.58, abs=0.01)


def test_stored_peak_comes_from_the_memory_pass(stored_frame, tmp_path):
    frame = stored_frame.set_index("mode")
    for mode in STORED_MODES:
        expected = "memory pass" if mode in ("fp4-dq", "nf4", "nf4-dq") else "cell process"
        assert frame.loc[mode, "peak_source"] == expected, mode
    # in this run the pass and the cell agree to the byte; move the pass's peak to see which one is shown
    data = json.loads(STORED_BENCH.read_text())
    nf4_pass = next(b for b in data["benchmarks"] if b["name"] == "test_memory[smollm2-nf4]")
    peak = nf4_pass["extra_info"]["memory"]["training_peak"]
    peak["peak_allocated_bytes"] *= 2
    (tmp_path / "bench.json").write_text(json.dumps(data))
    moved = results_frame(read_results([STORED_CELLS, tmp_path / "bench.json"])).set_index("mode")
    assert moved.loc["nf4", "peak_gib"] == pytest.approx(peak["peak_allocated_bytes"] / GIB)
    assert moved.loc["nf4-dq", "peak_gib"] == frame.loc["nf4-dq", "peak_gib"]


def test_stored_benchmark_step_stats(stored_frame):
    benchmarks = json.loads(STORED_BENCH.read_text())["benchmarks"]
    frame = stored_frame.set_index("mode")
    for bench in benchmarks:
        if bench["name"].startswith("test_step_time["):
            mode = bench["extra_info"]["mode"]
            assert frame.loc[mode, "bench_step_ms"] == pytest.approx(1000 * bench["stats"]["median"])
            assert frame.loc[mode, "bench_step_iqr_ms"] == pytest.approx(1000 * bench["stats"]["iqr"])
    assert frame["bench_step_ms"].isna().sum() == 4  # the first invocation's JSON was lost


def test_stored_footnotes_name_peak_sources_and_tokens_per_text():
    results = read_results([STORED_CELLS, STORED_BENCH])
    notes = "\n".join(footnotes(results))
    cells, _ = stored_json()
    before = cells[BASELINE_MODE]["perplexity"]["before"]
    heldout, eval_text = before["heldout"]["n_tokens_scored"], before["eval_text"]["n_tokens_scored"]
    assert (f"window 1024, stride 512, {heldout:,} tokens scored on the held-out quotes, {eval_text:,} on the "
            f"evaluation text (wiki.test.raw)") in notes
    assert "memory pass (its own process: load, LoRA set-up, 5 training steps, no evaluation) for fp4-dq, nf4, " \
           "nf4-dq; † read in the cell's own process" in notes
    assert "for fp16, bf16, int8, fp4, which have no memory pass" in notes
    rows = {line.split(" | ")[1]: line for line in markdown_table(results).splitlines() if line.startswith("| ")}
    assert " † |" in rows["bf16"] and " † |" not in rows["nf4"]


def test_report_command_on_the_stored_run(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(STORED_CELLS), str(STORED_BENCH), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.md", "report.png"]
    with open(out / "report.csv") as handle:
        rows = {row["mode"]: row for row in csv.DictReader(handle)}
    assert list(rows) == STORED_MODES and len(rows) == 7
    assert rows["nf4"]["peak_source"] == "memory pass" and float(rows[BASELINE_MODE]["peak_gib_ratio"]) == 1.0
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# qlora-bench report")
    assert "NVIDIA H200 (driver 580.159.04, CUDA 13.0)" in markdown and "commit e4d57f44e723" in markdown
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    terminal = capsys.readouterr().out
    for mode in STORED_MODES:
        assert mode in terminal


def test_report_command_reads_the_whole_run_folder(capsys):
    """Given the run's folder, the report shows all seven modes, and says what it read."""
    assert main(["report", str(STORED)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"read 7 cells and 1 finetune summary from 9 files in {STORED}"
    for mode in STORED_MODES:
        assert re.search(rf"\s{re.escape(mode)}(\s|$)", out, re.M), mode


def test_report_command_warns_about_each_unusable_file(tmp_path, capsys):
    shutil.copytree(STORED, tmp_path / "run")
    (tmp_path / "run" / "cells" / "smollm2-int8.json").write_text('{"schema": "qlora-bench/cell/1", "sta')
    edited = json.loads((STORED_CELLS / "smollm2-nf4.json").read_text())
    del edited["memory"]
    (tmp_path / "run" / "cells" / "smollm2-nf4.json").write_text(json.dumps(edited))
    assert main(["report", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"qlora-bench: warning: skipped {tmp_path / 'run' / 'cells' / 'smollm2-int8.json'}: "
                                  f"unreadable JSON")
    assert warnings[1] == (f"qlora-bench: warning: skipped {tmp_path / 'run' / 'cells' / 'smollm2-nf4.json'}: cell "
                           f"result without memory.training_peak.kind")
    # nf4 is still there: the pytest-benchmark JSON holds it too; int8 is gone
    assert "read 6 cells and 1 finetune summary from 7 files" in captured.out and "skipped 2 unusable" in captured.out
    assert " int8 " not in captured.out and " nf4 " in captured.out


def test_report_command_on_nothing_readable_exits_2(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{")
    (tmp_path / "summary.json").write_text(json.dumps({"schema": "qlora-bench/finetune/1"}))
    assert main(["report", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"qlora-bench: error: no qlora-bench results in {tmp_path} (2 unusable " \
                                           f"files skipped)"  # the summary lacks every field the report reads
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"qlora-bench: error: {tmp_path / 'missing'}: no such file or folder\n"


def stored_run_manifest(**overrides) -> dict:
    """A run manifest (qlora-bench/run/1) for the stored cells, built by hand as the sweep will write it."""
    cells = [{"name": f"smollm2-{mode}", "mode": mode, "status": "ok", "result": f"cells/smollm2-{mode}.json",
              "wall_seconds": 80.0, "measured_seconds": 50.0} for mode in STORED_MODES]
    cells[2] = {**cells[2], "status": "oom", "result": None}
    return {"schema": "qlora-bench/run/1", "command": ["qlora-bench", "sweep", "--eval-text", "wiki [test].raw"],
            "commit": "e4d57f44e723", "started": "2026-11-28T12:00:00+00:00", "ended": "2026-11-28T12:09:20+00:00",
            "wall_seconds": 560.0, "measured_seconds": 350.0, "measured_share": 0.625, "environment": {},
            "cells": cells, **overrides}


def test_report_command_shows_each_run(tmp_path, capsys):
    shutil.copytree(STORED_CELLS, tmp_path / "run" / "cells")
    (tmp_path / "run" / "run.json").write_text(json.dumps(stored_run_manifest()))
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0
    block = [f"run {tmp_path / 'run' / 'run.json'}: qlora-bench sweep --eval-text 'wiki [test].raw' "
             f"(commit e4d57f44e723)",
             "  started 2026-11-28T12:00:00+00:00, ended 2026-11-28T12:09:20+00:00; wall 560 s, measured 350 s = "
             "62% of wall",
             "  cells: 6 ok, 1 oom (smollm2-int8)"]
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("read 7 cells and 1 run manifest from 8 files")
    assert "\n".join(block) in out
    assert "## Runs\n\n```\n" + "\n".join(block) + "\n```" in (tmp_path / "report" / "report.md").read_text()


def test_an_unfinished_run_says_so():
    from qlora_core.report import run_lines

    unfinished = stored_run_manifest(ended=None, wall_seconds=None, measured_seconds=None, measured_share=None,
                                     commit=None, cells=[])
    assert run_lines([unfinished])[1:] == [
        "  started 2026-11-28T12:00:00+00:00, NOT FINISHED (no end time); wall not recorded, measured share not "
        "recorded", "  cells: none"]
    assert run_lines([unfinished])[0].endswith("(commit not recorded)")


# --- comparing two runs --------------------------------------------------------------------------------------


def edited_copy(tmp_path: Path, mode: str, edit) -> Path:
    """A copy of the stored cells/ with ``edit(result)`` applied to one mode's result."""
    folder = tmp_path / "candidate"
    shutil.copytree(STORED_CELLS, folder)
    path = folder / f"smollm2-{mode}.json"
    result = json.loads(path.read_text())
    edit(result)
    path.write_text(json.dumps(result))
    return folder


def verdicts(comparison: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(mode, figure) -> verdict for every row that is not 'ok'."""
    changed = comparison[comparison["verdict"] != "ok"]
    return {(row["mode"], row["figure"]): row["verdict"] for _, row in changed.iterrows()}


def test_identical_runs_compare_clean(stored_frame, capsys):
    comparison = compare_frames(stored_frame, stored_frame)
    assert set(comparison["verdict"]) == {"ok"} and not has_regression(comparison)
    assert len(comparison) == 7 * 5  # every mode, five figures each
    assert main(["compare", str(STORED_CELLS), str(STORED_CELLS)]) == 0
    assert "no regression" in capsys.readouterr().out


def test_raised_peak_memory_is_a_regression(stored_frame, tmp_path, capsys):
    def raise_peak(result):
        result["memory"]["training_peak"]["peak_allocated_bytes"] = round(
            1.2 * result["memory"]["training_peak"]["peak_allocated_bytes"])

    candidate = edited_copy(tmp_path, "int8", raise_peak)
    comparison = compare_frames(stored_frame, results_frame(read_results([candidate])))
    assert verdicts(comparison) == {("int8", "peak GiB"): "regression"}
    row = comparison[(comparison["mode"] == "int8") & (comparison["figure"] == "peak GiB")].iloc[0]
    assert row["change"] == pytest.approx(0.2, abs=1e-6)
    out = tmp_path / "cmp"
    assert main(["compare", str(STORED_CELLS), str(candidate), "--out", str(out)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert "| int8 | peak GiB | 4.35 | 5.22 | +20.0% | REGRESSION |" in (out / "comparison.md").read_text()
    # a looser threshold lets it pass
    assert main(["compare", str(STORED_CELLS), str(candidate), "--threshold", "0.25"]) == 0


def test_comparison_knows_which_way_is_worse(stored_frame, tmp_path):
    def steady_and_cheaper(result):
        result["memory"]["training_peak"]["peak_allocated_bytes"] //= 2  # less memory: better
        result["perplexity"]["after"]["heldout"]["perplexity"] *= 1.1  # higher perplexity: worse
        timing = result["training"]["timing"]
        timing["noisy"] = False
        result["training"]["tokens_per_s"] *= 0.8  # fewer tokens/s: worse

    baseline = []
    for result in read_results([STORED_CELLS]):
        steady = result.training.with_values(timing=result.training.timing.with_values(noisy=False))
        baseline.append(result.with_values(training=steady))
    candidate = read_results([edited_copy(tmp_path, "nf4", steady_and_cheaper)])
    comparison = compare_frames(results_frame(baseline), results_frame(candidate))
    assert verdicts(comparison) == {("nf4", "peak GiB"): "improvement", ("nf4", "ppl quotes after"): "regression",
                                    ("nf4", "tokens/s"): "regression"}


def test_noisy_timing_is_reported_not_ranked(stored_frame, tmp_path):
    """Every stored step time is noisy (IQR > 5 % of the median): a slower candidate is 'noisy', exit 0; the
    same change between steady timings is a regression."""
    def slower(result):
        result["training"]["timing"]["median_s"] *= 1.3

    candidate = edited_copy(tmp_path, "bf16", slower)
    comparison = compare_frames(stored_frame, results_frame(read_results([candidate])))
    assert verdicts(comparison) == {("bf16", "step ms (median)"): "noisy"}
    assert not has_regression(comparison)
    assert main(["compare", str(STORED_CELLS), str(candidate)]) == 0

    steady = stored_frame.assign(noisy=False)
    comparison = compare_frames(steady, results_frame(read_results([candidate])).assign(noisy=False))
    assert verdicts(comparison) == {("bf16", "step ms (median)"): "regression"}


def test_failed_or_missing_cells(stored_frame, tmp_path):
    def out_of_memory(result):
        result.update(status="oom", error="CUDA out of memory")

    candidate = read_results([edited_copy(tmp_path, "fp4", out_of_memory)])
    candidate = [r for r in candidate if r.mode.name != "int8"]
    comparison = compare_frames(stored_frame, results_frame(candidate))
    assert verdicts(comparison) == {("int8", "status"): "missing", ("fp4", "status"): "regression"}
    assert "candidate oom: CUDA out of memory" in comparison_markdown(comparison, 0.05)
    # the other way round a cell that now finishes is an improvement, and one only in the candidate is new
    reverse = compare_frames(results_frame(candidate), stored_frame)
    assert verdicts(reverse) == {("int8", "status"): "new", ("fp4", "status"): "improvement"}


def edited_run(tmp_path: Path, edit, name: str = "candidate") -> Path:
    """A copy of the stored cells/ with ``edit(result)`` applied to every result."""
    folder = tmp_path / name
    shutil.copytree(STORED_CELLS, folder)
    for path in folder.glob("*.json"):
        result = json.loads(path.read_text())
        edit(result)
        path.write_text(json.dumps(result))
    return folder


def as_cpu_run(result):
    """The stored H200 result as if measured with the CPU profile (2 x 128 tokens, 4 steps, 1 warm-up)."""
    result["environment"]["gpu"] = None
    result["settings"].update(seq_len=128, batch_size=2, timing_warmup=1, eval_window=128, eval_stride=64,
                              eval_max_tokens=1024)
    result["settings"]["train"]["max_steps"] = 4
    result["memory"]["training_peak"]["peak_allocated_bytes"] //= 2


def test_compare_refuses_runs_on_other_devices_or_protocols(tmp_path, capsys):
    candidate = edited_run(tmp_path, as_cpu_run)
    assert main(["compare", str(STORED_CELLS), str(candidate)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "qlora-bench: error: device differs: baseline NVIDIA H200, candidate CPU",
        "qlora-bench: error: tokens a step (batch x sequence) differs: baseline 8 x 512, candidate 2 x 128",
        "qlora-bench: error: eval window differs: baseline 1024, candidate 128",
        "qlora-bench: error: eval stride differs: baseline 512, candidate 64",
        "qlora-bench: error: eval max tokens differs: baseline all, candidate 1024",
        "qlora-bench: error: training steps differs: baseline 45, candidate 4",
        "qlora-bench: error: timing warm-up steps differs: baseline 5, candidate 1",
        "qlora-bench: error: these runs are not comparable; --force compares them anyway",
    ]
    assert "REGRESSION" not in captured.out and "peak" not in captured.out
    # --force compares anyway, with each difference as a warning, in the terminal and in comparison.md
    assert main(["compare", str(STORED_CELLS), str(candidate), "--force", "--out", str(tmp_path / "cmp")]) == 0
    forced = capsys.readouterr()
    assert forced.err.splitlines()[0] == "qlora-bench: warning: device differs: baseline NVIDIA H200, candidate CPU"
    assert len(forced.err.splitlines()) == 7 and "improvement" in forced.out
    assert ("**WARNING: device differs: baseline NVIDIA H200, candidate CPU; figures may differ for that reason "
            "alone.**") in (tmp_path / "cmp" / "comparison.md").read_text()


def test_compare_refuses_another_model_or_mode_set(tmp_path, capsys):
    def other_model(result):
        result["model"]["label"] = "llama"

    assert main(["compare", str(STORED_CELLS), str(edited_run(tmp_path, other_model))]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "qlora-bench: error: model differs: baseline smollm2, " \
                                                      "candidate llama"
    fewer = edited_run(tmp_path, lambda result: None, name="fewer")
    (fewer / "smollm2-fp16.json").unlink()
    assert main(["compare", str(STORED_CELLS), str(fewer)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "qlora-bench: error: mode set differs: baseline fp16, bf16, int8, fp4, fp4-dq, nf4, nf4-dq, candidate "
        "bf16, int8, fp4, fp4-dq, nf4, nf4-dq")


def test_the_frontier_picture_marks_others_claims_only_on_their_shapes(tmp_path, monkeypatch):
    """One panel per shape; Unsloth's published figures appear where their shape is drawn, as claims."""
    import matplotlib.axes

    from qlora_core.report import CLAIM_MARKERS, CONTEXT_CLAIMS, frontier_plot

    found = {"mode": "nf4-dq", "path": "lean", "tokens": 1024, "capacity_bytes": 24 * 2**30, "peak_bytes": 1,
             "bytes_per_token": 1.0, "limited_by": "memory"}
    labels = []
    plot_line = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *args, **kw: labels.append(kw.get("label")) or plot_line(self, *args, **kw))
    frontier_plot([{**found, "shape": "Llama-3.1-8B"}, {**found, "shape": "tiny-llama"}], tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    claims = [label for shape, _, _, label in CONTEXT_CLAIMS if shape == "Llama-3.1-8B"]
    assert [label for label in labels if label in CLAIM_MARKERS] == claims


def test_the_frontier_picture_draws_each_set_of_levers_as_its_own_line(tmp_path, monkeypatch):
    """The published levers run: three frontiers without levers make one line, the one with activations offloaded
    and MLPs tiled another, named so in the legend."""
    import matplotlib.axes

    from qlora_core.report import frontier_plot
    from qlora_core.results import read_paths

    frontiers = read_paths([STORED.parent / "h200-frontier-levers-2026-12-03"]).frontiers
    lines = []
    plot_line = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, *args, **kw: lines.append(
        (kw.get("label"), list(x) if isinstance(x, list) else [x])) or plot_line(self, x, y, *args, **kw))
    frontier_plot(frontiers, tmp_path / "f.png")
    drawn = {label: gib for label, gib in lines if label and label.startswith("nf4-dq")}
    assert drawn == {"nf4-dq, lean": [24.0, 48.0, 80.0], "nf4-dq, lean + offload + MLP tiles of 4,096": [12.0]}


def test_a_frontier_s_probes_are_summarised_as_one_set_up_with_their_lengths():
    """Probe cells differ in their sequence length alone: one 'Measured:' line per path and commit, naming how many
    lengths and their range, not one line a probe."""
    from qlora_core.report import run_summary
    from qlora_core.results import read_paths

    folder = Path(__file__).resolve().parents[1] / "results" / "h200-frontier-paths-2026-12-03" / "frontier-8b-lean-24"
    results = read_paths([folder]).results
    lengths = {result.settings.seq_len for result in results}
    (line,) = run_summary(results)
    assert line.startswith(f"Llama-3.1-8B (lean path): 1 x {min(lengths):,} to {max(lengths):,} "
                           f"({len(lengths)} lengths) tokens a step")
    assert "seq_len=" not in line and len(lengths) > 1
