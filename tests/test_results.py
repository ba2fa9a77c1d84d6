"""Self-describing results: the environment, atomic JSON files, reading results back."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from pathlib import Path

import pytest

from qlora_core.results import (MERGE_SCHEMA, RUN_SCHEMA, SCHEMA, cpu_model, describe_reading, environment, git_commit,
                                missing_cell_fields, non_finite, read_paths, read_results, read_runs, write_json_atomic)


def test_write_json_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic({"a": 1}, path)
    write_json_atomic({"b": [1.5, None]}, path)
    assert json.loads(path.read_text()) == {"b": [1.5, None]}
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_non_finite_names_every_nan_and_infinity():
    data = {"ok": 1.5, "training": {"losses": [2.0, float("nan")]}, "ppl": {"after": float("inf")}, "n": None}
    assert non_finite(data) == ["training.losses.1", "ppl.after"]
    assert non_finite({"a": [1.0, 0, "nan"]}) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_write_json_atomic_refuses_non_finite_floats(tmp_path, value):
    path = tmp_path / "r.json"
    with pytest.raises(ValueError):
        write_json_atomic({"perplexity": value}, path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its staging copy


def test_read_results_skips_other_files(tmp_path):
    write_json_atomic({**cell("bf16"), "n": 1}, tmp_path / "a.json")
    write_json_atomic({"schema": SCHEMA, "status": "error", "mode": {"name": "nf4"}, "settings": {}, "n": 2},
                      tmp_path / "b.json")
    write_json_atomic({"schema": "other"}, tmp_path / "c.json")
    write_json_atomic([1, 2], tmp_path / "d.json")
    (tmp_path / "a.log").write_text("not json")
    assert [r.extra["n"] for r in read_results([tmp_path])] == [1, 2]  # a key the model does not declare is kept
    assert [r.extra["n"] for r in read_results([tmp_path / "b.json"])] == [2]
    reading = read_paths([tmp_path])
    assert reading.others == [tmp_path / "c.json", tmp_path / "d.json"] and reading.skipped == []


def test_a_cell_measured_again_is_shown_once_and_said(tmp_path):
    """Two runs of the same set-up read together keep one result per cell, and the reading says how many
    measurements were left out; another file of the same measurement is no repeat."""
    first = {**cell("bf16"), "environment": {"timestamp": "2026-12-02T09:50:17+00:00"}}
    again = {**first, "environment": {"timestamp": "2026-12-02T09:53:40+00:00"}}
    write_json_atomic(first, tmp_path / "run-1" / "bf16.json")
    # the same measurement's other file, stamped a second later (as a bench run's pytest-benchmark entry can be)
    write_json_atomic({**first, "environment": {"timestamp": "2026-12-02T09:50:18+00:00"}},
                      tmp_path / "run-1" / "copy-of-bf16.json")
    write_json_atomic(again, tmp_path / "run-2" / "bf16.json")
    reading = read_paths([tmp_path])
    assert len(reading.results) == 1 and reading.repeated == 1
    assert "1 cell measured again with the same model, mode and settings, shown once" in describe_reading(
        reading, [tmp_path])
    assert read_paths([tmp_path / "run-1"]).repeated == 0

def test_environment_is_plain_json():
    env = environment()
    assert json.loads(json.dumps(env)) == env
    assert set(env["libraries"]) >= {"torch", "transformers", "peft", "bitsandbytes", "qlora-bench"}


def test_cpu_model_is_the_name_cpuinfo_gives(tmp_path):
    """Host-bound steps depend on the CPU: the environment names its model, and falls back to the architecture."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_model(tmp_path / "absent") == (platform.processor() or platform.machine())


def test_git_commit_names_this_checkout():
    """The suite runs from a git checkout (CI clones the repository): the result names its commit."""
    assert re.fullmatch(r"[0-9a-f]{7,}(-dirty)?", git_commit() or "")


def bench_record(test: str, mode: str, extra_info: dict, median: float = 1.0) -> dict:
    """One benchmark as pytest-benchmark's JSON holds it (the fields read_results uses, and a few more)."""
    stats = {"median": median, "iqr": 0.1, "stddev": 0.05, "mean": median, "min": median / 2, "max": 2 * median,
             "rounds": 4, "q1": median - 0.05, "q3": median + 0.05}
    return {"name": f"{test}[m-{mode}]", "group": test, "param": f"m-{mode}", "params": {"cell_key": ["m", mode]},
            "extra_info": {"mode": mode, **extra_info}, "stats": stats}


def bench_json(cells: list[dict], memory_peak: int = 123) -> dict:
    """A bench/ run's pytest-benchmark JSON holding ``cells``: three benchmarks a cell, as bench/test_lora.py
    records them (the memory pass with its own settings and peak)."""
    benchmarks = []
    for cell in cells:
        mode = cell["mode"]["name"]
        memory_settings = {**cell["settings"], "eval_text": None}
        memory = {"training_peak": {"kind": "cuda", "peak_allocated_bytes": memory_peak}}
        benchmarks += [
            bench_record("test_memory", mode, {"settings": memory_settings, "memory": memory,
                                               "weights": {"weights_bytes": 7}}, median=9.0),
            bench_record("test_step_time", mode, {"settings": cell["settings"], "worker_timing": {}}, median=0.5),
            bench_record("test_perplexity", mode, {"settings": cell["settings"], "cell": cell}, median=3.0),
        ]
    return {"machine_info": {"qlora_bench": {"commit": "abc"}}, "commit_info": {}, "benchmarks": benchmarks,
            "version": "5.2.3"}


def cell(mode: str, **settings) -> dict:
    """A finished cell holding the fields the report reads, and no more."""
    return {"schema": SCHEMA, "status": "ok", "mode": {"name": mode}, "model": {"label": "m", "provenance": {}},
            "settings": {"model": "m", "seq_len": 8, **settings},
            "weights": {"weights_bytes": 10, "bits_per_quantized_param": None},
            "memory": {"training_peak": {"kind": "cuda", "peak_allocated_bytes": 100}},
            "training": {"timing": {"median_s": 0.49, "iqr_s": 0.01, "noisy": False, "rounds": 3, "warmup": 1},
                         "tokens_per_s": 16.3, "mfu": None, "losses": [2.0]},
            "perplexity": {"before": {"heldout": {"perplexity": 9.0, "window": 8, "stride": 4,
                                                  "n_tokens_scored": 31}}}}


def test_read_results_takes_cells_from_pytest_benchmark_json(tmp_path):
    write_json_atomic(bench_json([cell("bf16"), cell("nf4")]), tmp_path / "bench.json")
    results = [result.to_json() for result in read_results([tmp_path / "bench.json"])]
    assert [r["mode"]["name"] for r in results] == ["bf16", "nf4"]
    for result in results:
        assert result["memory_pass"]["memory"]["training_peak"]["peak_allocated_bytes"] == 123
        assert result["memory_pass"]["weights"] == {"weights_bytes": 7}
        assert result["memory_pass"]["settings"]["eval_text"] is None  # the pass's own settings
        assert result["memory_pass"]["load_s"] == 9.0
        assert result["memory"]["training_peak"]["peak_allocated_bytes"] == 100  # the cell's own, untouched
        assert result["training"]["benchmark_stats"] == {
            "median_s": 0.5, "iqr_s": 0.1, "stddev_s": 0.05, "mean_s": 0.5, "min_s": 0.25, "max_s": 1.0, "rounds": 4}
        assert result["environment"] == {"commit": "abc"}  # from machine_info where the cell has none


def test_read_results_keeps_the_fuller_of_two_files_for_one_cell(tmp_path):
    """A bench/ run leaves each cell in --bench-out and in the pytest-benchmark JSON: read both, report once."""
    write_json_atomic(cell("bf16"), tmp_path / "cells" / "m-bf16.json")
    write_json_atomic(cell("nf4"), tmp_path / "cells" / "m-nf4.json")
    write_json_atomic(cell("nf4", seq_len=16), tmp_path / "cells" / "m-nf4-longer.json")  # another cell
    write_json_atomic(bench_json([cell("nf4")]), tmp_path / "bench.json")
    for paths in ([tmp_path / "cells", tmp_path / "bench.json"], [tmp_path / "bench.json", tmp_path / "cells"]):
        results = read_results(paths)
        described = sorted((r.mode.name, r.settings.seq_len, r.memory_pass is not None) for r in results)
        assert described == [("bf16", 8, False), ("nf4", 8, True), ("nf4", 16, False)]
    assert len(read_results([tmp_path / "cells", tmp_path / "cells"])) == 3


def test_failed_cell_in_pytest_benchmark_json_is_a_failure_result(tmp_path):
    """A cell that failed has no full result in the JSON, only the status its benchmark recorded."""
    data = bench_json([cell("bf16")])
    settings = cell("nf4")["settings"]
    data["benchmarks"].append(bench_record("test_step_time", "nf4", {"settings": settings, "status": "oom",
                                                                     "error": "CUDA out of memory"}))
    write_json_atomic(data, tmp_path / "bench.json")
    failed = read_results([tmp_path / "bench.json"])[1].to_json()
    assert (failed["status"], failed["mode"], failed["error"]) == ("oom", {"name": "nf4"}, "CUDA out of memory")
    assert failed["settings"] == settings


def test_other_pytest_benchmark_json_yields_nothing(tmp_path):
    data = {"machine_info": {}, "benchmarks": [{"name": "test_x", "param": None, "extra_info": {}, "stats": {}}]}
    write_json_atomic(data, tmp_path / "bench.json")
    assert read_results([tmp_path]) == []


def test_written_results_are_readable_by_others_as_the_umask_allows(tmp_path):
    import os
    import stat

    from qlora_core.results import write_json_atomic

    previous = os.umask(0o022)
    try:
        path = write_json_atomic({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --- reading a whole run folder ---------------------------------------------------------------------------------

#: The published H200 run: cells/ (seven modes), the resumed invocation's pytest-benchmark JSON (three of them,
#: with their memory pass) and workflow/ (a fine-tuning summary: a workflow record, not a cell).
STORED = Path(__file__).resolve().parents[1] / "results" / "h200-smollm2-2026-11-28"


def test_a_run_folder_is_read_whole(tmp_path):
    """Given the run's folder, not its cells/ sub-folder, every mode is found once (issue 8.6: 3 of 7 were)."""
    stored_modes = {json.loads(file.read_text())["mode"]["name"] for file in (STORED / "cells").glob("*.json")}
    reading = read_paths([STORED])
    assert sorted(r.mode.name for r in reading.results) == sorted(stored_modes) and len(stored_modes) == 7
    assert len(reading.sources) == len(stored_modes) + 2  # the cells, the pytest-benchmark JSON, the summary
    assert [f["path"] for f in reading.finetunes] == [str(STORED / "workflow" / "nf4-dq-summary.json")]
    assert reading.others == [] and reading.skipped == []
    with_pass = {r.mode.name for r in reading.results if r.memory_pass is not None}
    assert with_pass == {"fp4-dq", "nf4", "nf4-dq"}  # the fuller record of each benchmarked cell was kept


def test_unusable_files_are_skipped_with_their_reason(tmp_path):
    shutil.copytree(STORED / "cells", tmp_path / "cells")
    (tmp_path / "cells" / "torn.json").write_text('{"schema": "qlora-bench/cell/1", "status": "o')
    (tmp_path / "garbage.json").write_bytes(b"\xff\xfe\x00garbage")
    no_timing = json.loads((STORED / "cells" / "smollm2-nf4.json").read_text())
    del no_timing["training"]["timing"]
    no_timing["mode"]["name"] = "nf4-edited"
    write_json_atomic(no_timing, tmp_path / "sub" / "deep" / "no-timing.json")
    write_json_atomic({"schema": "qlora-bench/cell/2"}, tmp_path / "future.json")
    reading = read_paths([tmp_path])
    assert len(reading.results) == 7 and "nf4-edited" not in {r.mode.name for r in reading.results}
    reasons = {file.relative_to(tmp_path).as_posix(): reason for file, reason in reading.skipped}
    assert set(reasons) == {"cells/torn.json", "garbage.json", "sub/deep/no-timing.json", "future.json"}
    assert reasons["cells/torn.json"].startswith("unreadable JSON")
    assert reasons["sub/deep/no-timing.json"] == (
        "cell result without training.timing.median_s, training.timing.iqr_s, training.timing.noisy, "
        "training.timing.rounds, training.timing.warmup")
    assert "unsupported cell schema 'qlora-bench/cell/2'" in reasons["future.json"]


@pytest.mark.parametrize("path", [("status",), ("mode", "name"), ("settings",), ("model", "provenance"),
                                  ("weights", "weights_bytes"), ("memory", "training_peak", "kind"),
                                  ("training", "losses"), ("perplexity", "before", "heldout", "window")],
                         ids=".".join)
def test_every_field_the_report_reads_is_checked(path):
    result = cell("bf16")
    assert missing_cell_fields(result) == []
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    assert missing_cell_fields(result) == [".".join(path)]


def test_empty_losses_are_missing_and_a_failed_cell_needs_no_figures():
    assert missing_cell_fields({**cell("bf16"), "training": {**cell("bf16")["training"], "losses": []}}) == [
        "training.losses[0]"]
    assert missing_cell_fields({"schema": SCHEMA, "status": "oom", "mode": {"name": "x"}, "settings": {}}) == []


def test_malformed_pytest_benchmark_json_is_skipped(tmp_path):
    data = bench_json([cell("bf16")])
    del data["benchmarks"][0]["name"]
    write_json_atomic(data, tmp_path / "bench.json")
    reading = read_paths([tmp_path])
    assert reading.results == [] and [file for file, _ in reading.skipped] == [tmp_path / "bench.json"]


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        read_paths([tmp_path / "no-such-run"])


def run_manifest(**overrides) -> dict:
    """A run manifest as the sweep writes ``run.json`` (qlora-bench/run/1), built by hand."""
    return {"schema": RUN_SCHEMA, "command": ["qlora-bench", "sweep", "--modes", "bf16,nf4"], "commit": "abc123",
            "started": "2026-12-02T01:00:00+00:00", "ended": "2026-12-02T01:04:00+00:00", "wall_seconds": 240.0,
            "measured_seconds": 150.0, "measured_share": 0.625, "environment": {"gpu": None},
            "cells": [{"name": "m-bf16", "mode": "bf16", "status": "ok", "result": "bf16.json",
                       "wall_seconds": 100.0, "measured_seconds": 70.0},
                      {"name": "m-nf4", "mode": "nf4", "status": "oom", "result": None, "wall_seconds": 140.0,
                       "measured_seconds": 80.0}],
            **overrides}


def test_run_manifests_are_read_beside_the_cells(tmp_path):
    write_json_atomic(cell("bf16"), tmp_path / "bf16.json")
    write_json_atomic(run_manifest(), tmp_path / "run.json")
    write_json_atomic(run_manifest(cells=[{"name": "x"}]), tmp_path / "old" / "run.json")
    reading = read_paths([tmp_path])
    assert [r.mode.name for r in reading.results] == ["bf16"]
    assert reading.runs == [{**run_manifest(), "path": str(tmp_path / "run.json")}]
    assert reading.skipped == [(tmp_path / "old" / "run.json", "run manifest without cells[0].mode, cells[0].status")]
    assert read_runs([tmp_path]) == reading.runs


def test_published_folders_are_readable_by_others_as_the_umask_allows(tmp_path):
    """mkdtemp makes the staging folder 0700 and safetensors writes 0600: the published folder must not keep
    either (others on a shared runner could not read an adapter)."""
    import stat

    from qlora_core.results import publish_folder

    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "weights.bin").write_bytes(b"w")
        os.chmod(folder / "sub" / "weights.bin", 0o600)  # as safetensors leaves it
        (folder / "run.sh").write_text("#!/bin/sh\n")
        os.chmod(folder / "run.sh", 0o700)

    previous = os.umask(0o027)
    try:
        folder = publish_folder(tmp_path / "adapter", write)
    finally:
        os.umask(previous)
    modes = {str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
             for path in [folder, *folder.rglob("*")]}
    assert modes == {"adapter": 0o750, "adapter/sub": 0o750, "adapter/sub/weights.bin": 0o640,
                     "adapter/run.sh": 0o750}


def test_workflow_records_are_read_apart_from_cells_and_checked(tmp_path):
    """A finetune summary (an old one, without per-step times, still reads) and a merge report go to their own
    lists; one without a field the report needs is skipped with the field named."""
    summary = json.loads((STORED / "workflow" / "nf4-dq-summary.json").read_text())
    write_json_atomic(summary, tmp_path / "ft" / "summary.json")
    broken = {**summary, "training": {k: v for k, v in summary["training"].items() if k != "wall_s"}}
    write_json_atomic(broken, tmp_path / "broken" / "summary.json")
    write_json_atomic({"schema": MERGE_SCHEMA, "mode": {"name": "nf4-dq"}}, tmp_path / "merge-report.json")
    reading = read_paths([tmp_path])
    assert reading.results == [] and [f["path"] for f in reading.finetunes] == [str(tmp_path / "ft" / "summary.json")]
    assert reading.merges == [] and reading.sources == [tmp_path / "ft" / "summary.json"]
    reasons = {file.relative_to(tmp_path).as_posix(): reason for file, reason in reading.skipped}
    assert reasons["broken/summary.json"] == "finetune summary without training.wall_s"
    assert reasons["merge-report.json"].startswith("merge report without adapter_dir, merged.perplexity.perplexity")
    assert "read 0 cells and 1 finetune summary from 1 file" in describe_reading(reading, [tmp_path])


#: A published frontier measured with levers pulled (``levers``, ``probe_allocator_conf``), and one of the first
#: frontiers, written before either key existed.
LEVERS_FRONTIER = STORED.parent / "h200-frontier-levers-2026-12-03" / "frontier-8b-nf4-dq-lean-offload-tile-12"
FIRST_FRONTIER = STORED.parent / "h200-lean-adapters-2026-12-03" / "frontier-8b-nf4-dq-lean-24"


def test_frontier_documents_are_read_as_one_row_per_frontier():
    """Each frontier of a ``qlora-bench frontier`` document is a row with what its document says of it; the probe
    cells beside it are cells as before, and the document is no longer an 'other' JSON."""
    reading = read_paths([LEVERS_FRONTIER, FIRST_FRONTIER])
    document = json.loads((LEVERS_FRONTIER / "frontier.json").read_text())
    newer, older = reading.frontiers
    assert newer == {**document["frontiers"][0], "document": str(LEVERS_FRONTIER / "frontier.json"),
                     "commit": document["environment"]["commit"], "command": document["command"],
                     "probe_allocator_conf": "expandable_segments:True"}
    assert "probe_allocator_conf" not in older and older["commit"].startswith("66777a8")
    assert reading.skipped == [] and not any(file.name == "frontier.json" for file in reading.others)
    assert {LEVERS_FRONTIER / "frontier.json", FIRST_FRONTIER / "frontier.json"} <= set(reading.sources)
    assert len(reading.results) == 6  # the two documents' probe cells
    assert "2 context frontiers" in describe_reading(reading, [LEVERS_FRONTIER, FIRST_FRONTIER])


def test_a_frontier_document_without_a_field_the_table_needs_is_skipped_naming_it(tmp_path):
    document = json.loads((LEVERS_FRONTIER / "frontier.json").read_text())
    del document["frontiers"][0]["limited_by"], document["frontiers"][0]["probes"]["at"]["status"]
    write_json_atomic(document, tmp_path / "broken" / "frontier.json")
    write_json_atomic({**document, "frontiers": {}}, tmp_path / "no-list" / "frontier.json")
    predicted = {**document, "frontiers": [{key: value for key, value in document["frontiers"][0].items()
                                           if key not in ("probes", "measured_bytes_per_token", "confirmed")}]}
    predicted["frontiers"][0]["limited_by"] = "memory"
    write_json_atomic(predicted, tmp_path / "predicted" / "frontier.json")
    reading = read_paths([tmp_path])
    reasons = {file.relative_to(tmp_path).as_posix(): reason for file, reason in reading.skipped}
    assert reasons == {"broken/frontier.json": "frontier document without frontiers[0].limited_by, "
                                               "frontiers[0].probes.at.status",
                       "no-list/frontier.json": "frontier document without frontiers[]"}
    assert [row["document"] for row in reading.frontiers] == [str(tmp_path / "predicted" / "frontier.json")]
