"""Tables and plots rendered from real ``run_cell`` results (the session's tiny-model runs)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from tiny import CELL_MODES, TINY_CELL
from qlora_core.modes import BASELINE_MODE, MODES
from qlora_core.report import RATIO_COLUMNS, footnotes, markdown_table, plot, results_frame, rich_table

MIB, GIB = 2**20, 2**30


def raw_figures(result: dict) -> dict:
    """The figures a row should hold, read straight from the result JSON (independently of report.py)."""
    ppl = result["perplexity"]
    return {
        "weights_mib": result["weights"]["weights_bytes"] / MIB,
        "peak_gib": result["memory"]["training_peak"]["peak_rss_bytes"] / GIB,
        "step_ms": 1000 * result["training"]["timing"]["median_s"],
        "ppl_heldout_after": ppl["after"]["heldout"]["perplexity"],
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


def test_footnotes_name_provenance_note():
    result = {"status": "ok", "memory": {"training_peak": {"kind": "cuda"}},
              "model": {"provenance": {"name": "M", "note": "already 4-bit"}},
              "perplexity": {"before": {"heldout": {"window": 8, "stride": 4, "n_tokens_scored": 9}}}}
    notes = footnotes([result])
    assert "M: already 4-bit." in notes
    assert not any("CPU figures" in note for note in notes)


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
    # one 4.2 x 3.6 inch panel per figure at 120 dpi: peak, step time, two perplexities
    assert (width, height) == (round(4 * 4.2 * 120), round(3.6 * 120))
