"""The context frontier's table, rendered from the published ``qlora-bench frontier --measure`` documents."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from qlora_core import frontier_table
from qlora_core.cli import main
from qlora_core.results import read_paths, write_json_atomic
from qlora_core.units import GIB, MIB

RESULTS = Path(__file__).resolve().parents[1] / "results"
#: Three frontiers without levers (above probe one 256-token step over the prediction) and one with activations
#: offloaded and MLPs tiled (5 % over), their probes under expandable segments.
LEVERS_RUN = RESULTS / "h200-frontier-levers-2026-12-03"
#: One-step probes: the 8B with both levers at 24 and 80 GiB (80: the at probe alone), each lever alone at 24.
PROBES_RUN = RESULTS / "h200-frontier-350k-2026-12-03"
#: The reference path's frontiers and the lean path's per mode at 24, 48 and 80 GiB (int8's lean ones twice: at
#: 98f363f, where they ran out of memory, and at fe17686, whose floor counts LLM.int8's input quantization).
PATHS_RUN = RESULTS / "h200-frontier-paths-2026-12-03"
#: The 70B frontier whose offload is capped by the host: its cost of a token changes between its probes.
HOST_BOUND_70B = RESULTS / "h200-frontier-80-2026-12-07" / "frontier-70b-nf4-dq-lean-offload-host105-tile-80"
#: The first measured frontiers: no levers, no ``probe_allocator_conf``.
FIRST_RUN = RESULTS / "h200-lean-adapters-2026-12-03"


def documents(folder: Path) -> list[dict]:
    """Each frontier under ``folder`` with its document, read straight from the files (not through results.py)."""
    return [{**frontier, "document": document}
            for file in sorted(folder.rglob("frontier.json"))
            for document in [json.loads(file.read_text())] for frontier in document["frontiers"]]


@pytest.fixture(scope="module")
def levers_frame() -> pd.DataFrame:
    return frontier_table.frontier_frame(read_paths([LEVERS_RUN]).frontiers)


def test_the_levers_run_is_a_row_per_frontier_with_its_figures(levers_frame):
    expected = documents(LEVERS_RUN)
    assert len(levers_frame) == len(expected) == 4
    assert list(levers_frame["capacity_gib"]) == [f["capacity_bytes"] / GIB for f in expected] == [24, 48, 80, 12]
    for (_, row), frontier in zip(levers_frame.iterrows(), expected):
        assert row["tokens"] == frontier["tokens"] and row["limited_by"] == frontier["limited_by"]
        assert row["peak_gib"] == frontier["peak_bytes"] / GIB
        assert row["mib_per_token"] == frontier["bytes_per_token"] / MIB
        assert row["above_tokens"] == frontier["probes"]["above"]["tokens"]
        assert row["commit"] == frontier["document"]["environment"]["commit"][:12]
    # without levers every probe ran, the above one too (so none is confirmed); with them the at probe ran out
    assert list(levers_frame["at_status"]) == ["ok", "ok", "ok", "oom"]
    assert list(levers_frame["confirmed"]) == ["no: above ran"] * 3 + ["no: at probe oom"]  # before the headroom
    measured = expected[0]["measured_bytes_per_token"] / expected[0]["bytes_per_token"]
    assert levers_frame["measured_over_predicted"][0] == pytest.approx(measured) and 0.9 < measured < 1
    assert pd.isna(levers_frame["measured_over_predicted"][3])  # its at probe measured nothing


def test_the_at_probe_s_peak_and_tokens_a_second_come_beside_its_frontier():
    """From the frontier document its at probe's peak and its ratio to the prediction; from the probe's own cell,
    read with it, its tokens a second (none where the cells were not read, or the at probe did not run: the
    traced half probe's folder)."""
    reading = read_paths([PROBES_RUN])
    probe_cells = frontier_table.probe_cells_by_setup(reading.results)
    rates = {json.loads(file.read_text())["settings"]["seq_len"]: json.loads(file.read_text())["training"]
             for file in PROBES_RUN.rglob("probes/*-at.json")}
    ran = [frontier for frontier in reading.frontiers if frontier["probes"]["at"]["status"] == "ok"]
    assert len(ran) == 4 and len(reading.frontiers) == 5
    for frontier in ran:
        row, at = frontier_table.frontier_row(frontier, probe_cells), frontier["probes"]["at"]
        assert row["at_peak_gib"] == at["peak_bytes"] / GIB
        assert row["at_over_predicted"] == at["peak_bytes"] / frontier["peak_bytes"] < 1
        assert row["at_tokens_per_s"] == rates[at["tokens"]]["tokens_per_s"] > 0
        assert frontier_table.frontier_row(frontier)["at_tokens_per_s"] is None
    (traced,) = [frontier for frontier in reading.frontiers if frontier not in ran]
    assert frontier_table.frontier_row(traced, probe_cells)["at_tokens_per_s"] is None


def test_levers_read_as_words_and_none_as_a_dash(levers_frame):
    headers, rows = frontier_table.table_rows(levers_frame)
    levers = [row[headers.index("levers")] for row in rows]
    assert levers == ["-", "-", "-", "offload, MLP tiles of 4,096"]
    assert [row[headers.index("above probe")] for row in rows] == [
        "31,488 ok", "72,960 ok", "128,256 ok", "40,704 oom"]  # a 256-token step above, then 5 % above
    assert {row[headers.index("allocator conf")] for row in rows} == {"expandable_segments:True"}


def test_the_first_frontiers_say_their_allocator_was_not_recorded():
    frame = frontier_table.frontier_frame(read_paths([FIRST_RUN]).frontiers)
    assert list(frame["allocator_conf"]) == ["not recorded"] * 2
    assert list(frame["confirmed"]) == ["no: at probe oom"] * 2 and list(frame["at_status"]) == ["oom"] * 2


def test_an_above_probe_that_ran_within_the_allocator_s_headroom_says_so():
    """Since the headroom, an above probe predicted to fit the capacity itself ran where the prediction said it
    could (bf16 at 24 GiB: the weights take most of it; int8's reference path: a few 256-token steps); one
    predicted past the capacity that ran would be "no: above ran"."""
    frontiers = read_paths(sorted(PATHS_RUN.glob("frontier-8b-*"))).frontiers  # not the traced half probe's
    frame = frontier_table.frontier_frame(frontiers)
    by_cell = {(row["mode"], row["path"], row["capacity_gib"], row["commit"][:7]): row for _, row in frame.iterrows()}
    for cell in [("bf16", "lean", 24), ("bf16", "reference", 24), ("int8", "reference", 24),
                 ("int8", "reference", 48)]:
        row = by_cell[(*cell, "98f363f")]
        assert row["confirmed"] == "no: above ran within the headroom" and row["above_status"] == "ok", cell
    assert by_cell[("int8", "lean", 24, "98f363f")]["confirmed"] == "no: at probe oom"  # before fe17686's floor
    assert by_cell[("int8", "lean", 24, "fe17686")]["confirmed"] == "yes"
    frontier = next(f for f in frontiers if f["mode"] == "bf16" and f["path"] == "lean"
                    and f["capacity_bytes"] == 24 * GIB)
    moved = {**frontier, "bytes_per_token": frontier["bytes_per_token"] * 10}  # the above predicted past the cap
    assert frontier_table.frontier_row(moved)["confirmed"] == "no: above ran"


def test_a_frontier_without_probes_is_not_measured(tmp_path):
    document = json.loads((LEVERS_RUN / "frontier-8b-nf4-dq-lean-24" / "frontier.json").read_text())
    document["frontiers"] = [{key: value for key, value in frontier.items()
                              if key not in ("probes", "measured_bytes_per_token", "confirmed")}
                             for frontier in document["frontiers"]]
    write_json_atomic({**document, "probe_allocator_conf": None}, tmp_path / "frontier.json")
    frame = frontier_table.frontier_frame(read_paths([tmp_path]).frontiers)
    headers, [row] = frontier_table.table_rows(frame)
    shown = dict(zip(headers, row))
    assert shown["confirmed"] == "not measured"
    assert shown["half probe"] == shown["measured MiB/token"] == shown["allocator conf"] == "-"
    assert shown["predicted tokens"] == "31,232" and shown["bound"] == "memory"


def test_markdown_has_a_row_per_frontier_and_says_what_confirmed_means(levers_frame):
    markdown = frontier_table.markdown(levers_frame, plot_png="frontier.png")
    rows = [line for line in markdown.splitlines() if line.startswith("| Llama-3.1-8B |")]
    assert len(rows) == 4 and rows[-1].split(" | ")[3] == "offload, MLP tiles of 4,096"
    assert "![context frontier](frontier.png)" in markdown
    assert "confirmed: the at probe ran and the above probe ran out of memory" in markdown
    assert "one 256-token step above the prediction, newer ones 5 % above" in markdown
    assert "hard cap of the capacity on the CUDA allocator's reserved bytes" in markdown


def test_report_of_a_folder_holding_only_a_frontier(tmp_path, capsys):
    """Without a cell or workflow record the frontier is the report: its section, CSV and picture."""
    folder = tmp_path / "frontier"
    folder.mkdir()
    (folder / "frontier.json").write_bytes((LEVERS_RUN / "frontier-8b-nf4-dq-lean-offload-tile-12" /
                                            "frontier.json").read_bytes())
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    terminal = capsys.readouterr().out
    assert terminal.splitlines()[0] == f"read 0 cells and 1 context frontier from 1 file in {folder}"
    assert "context frontier" in terminal and "38,656 oom" in terminal
    assert sorted(path.name for path in out.iterdir()) == ["frontier.csv", "frontier.png", "report.md"]
    assert (out / "report.md").read_text().startswith("# qlora-bench report\n\n## Context frontier\n\n| shape |")
    csv = pd.read_csv(out / "frontier.csv")
    assert list(csv["tokens"]) == [38656] and list(csv["levers"]) == ["offload, MLP tiles of 4,096"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_puts_the_frontier_after_the_cells_and_the_workflow(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(LEVERS_RUN), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown.index("## Classic workflow") < markdown.index("## Context frontier")
    assert markdown.count("## Context frontier") == 1 and markdown.count("| Llama-3.1-8B | nf4-dq | lean |") == 4
    wrote = capsys.readouterr().out.splitlines()[-1]
    assert wrote.endswith(f"{out / 'workflow.csv'}, {out / 'frontier.csv'}, {out / 'frontier.png'}")


def test_the_picture_marks_what_each_frontier_s_probes_found():
    """Confirmed, ran without confirmation (the above probe ran or is to come), or the predicted length failed:
    the published frontiers hold all three."""
    from qlora_core.report import CHECK_MARKERS, _check_state

    confirmed, ran, failed = CHECK_MARKERS
    frontiers = read_paths([LEVERS_RUN, PROBES_RUN]).frontiers
    states = [_check_state(f) for f in frontiers]
    assert {confirmed, ran, failed} == set(states)
    for frontier, state in zip(frontiers, states):
        assert (state == confirmed) == frontier["confirmed"]
        assert (state == failed) == (frontier["probes"]["at"]["status"] != "ok")


def test_a_probe_a_later_call_ran_is_read_from_its_cell_beside_the_document():
    """The reference path's half probes at 24 and 48 GiB ran in a later call whose document (written before
    ``--resume`` kept earlier probes) was left out: their cells, in the at/above document's probes/ folder,
    fill in its half probe and the measured cost of a token, the cells' own peaks' slope."""
    folders = [PATHS_RUN / f"frontier-8b-reference-{gib}" for gib in (24, 48)]
    frame = frontier_table.frontier_frame(read_paths(folders).frontiers)
    assert len(frame) == 8 and set(frame["half_status"]) == {"ok"}
    assert all(json.loads((folder / "frontier.json").read_text())["frontiers"][0]["probes"]["half"]["status"]
               == "not run" for folder in folders)
    peaks = {}
    for folder in folders:
        for probe in ("half", "at"):
            for cell in (folder / "probes").glob(f"*-{probe}.json"):
                result = json.loads(cell.read_text())
                key = (result["settings"]["mode"], result["settings"]["memory_cap_bytes"])
                peaks.setdefault(key, {})[result["settings"]["seq_len"]] = (
                    result["predicted_vs_measured"]["training_peak"]["measured_bytes"])
    for _, row in frame.iterrows():
        (short, low), (long, high) = sorted(peaks[(row["mode"], row["capacity_gib"] * GIB)].items())
        assert row["measured_mib_per_token"] == pytest.approx((high - low) / (long - short) / MIB)


def test_the_measured_cost_of_a_token_is_set_beside_the_prediction_over_the_same_span():
    """Between the 70B frontier's half probe (every layer's input offloaded) and its at probe (past the host's
    105 GiB, the last layers' inputs kept on the GPU) a token's cost changes: the measured slope is compared with
    the probes' own predicted peaks' slope, not with the frontier's last token's cost, many times larger."""
    (row,) = frontier_table.frontier_frame(read_paths([HOST_BOUND_70B]).frontiers).to_dict("records")
    cells = {probe: json.loads(next((HOST_BOUND_70B / "probes").glob(f"*-{probe}.json")).read_text())
             for probe in ("half", "at")}
    peaks = {probe: cell["predicted_vs_measured"]["training_peak"] for probe, cell in cells.items()}
    tokens = {probe: cell["settings"]["seq_len"] for probe, cell in cells.items()}
    span = tokens["at"] - tokens["half"]
    measured = (peaks["at"]["measured_bytes"] - peaks["half"]["measured_bytes"]) / span
    predicted = (peaks["at"]["predicted_bytes"] - peaks["half"]["predicted_bytes"]) / span
    assert row["measured_mib_per_token"] == pytest.approx(measured / MIB)
    assert row["measured_over_predicted"] == pytest.approx(measured / predicted)
    assert row["mib_per_token"] > 5 * predicted / MIB
