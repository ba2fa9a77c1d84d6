"""The typed cell result: every published result reads through it and back unchanged, a malformed one fails
naming its file and field, and unknown keys (new measurements, new settings) are kept."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlora_core import report
from qlora_core.result_model import (SCHEMA, CellResult, Column, ResultError, Section, Training, measurement,
                                     table_columns)
from qlora_core.results import cells_from_benchmark, is_benchmark_json, read_paths, write_cell_result

RESULTS = Path(__file__).resolve().parents[1] / "results"


def published_cells() -> list[tuple[str, dict]]:
    """(where, JSON) of every cell result under results/: cell files, and the cells inside bench/'s
    pytest-benchmark JSON (joined to their memory pass, as ``read_paths`` reads them)."""
    cells = []
    for file in sorted(RESULTS.rglob("*.json")):
        data = json.loads(file.read_text())
        where = str(file.relative_to(RESULTS))
        if isinstance(data, dict) and str(data.get("schema", "")).startswith("qlora-bench/cell/"):
            cells.append((where, data))
        elif is_benchmark_json(data):
            cells += [(f"{where}[{cell['mode']['name']}]", cell) for cell in cells_from_benchmark(data)]
    return cells


PUBLISHED = published_cells()


def test_the_published_results_hold_cells_of_every_kind():
    """The parametrized tests below see old and new results alike (a guard against an empty results/)."""
    statuses = {data["status"] for _, data in PUBLISHED}
    assert len(PUBLISHED) > 100 and {"ok", "does_not_fit"} <= statuses
    assert any("hfu" not in data.get("training", {"hfu": 0}) for _, data in PUBLISHED)  # made before hfu
    assert any("memory_pass" in data for _, data in PUBLISHED) and any("floor" in data for _, data in PUBLISHED)


@pytest.mark.parametrize("data", [data for _, data in PUBLISHED], ids=[where for where, _ in PUBLISHED])
def test_every_published_result_reads_and_writes_back_unchanged(data):
    result = CellResult.from_json(data)
    assert result.to_json() == data
    assert CellResult.from_json(result.to_json()) == result


def test_fields_are_typed_and_old_results_read_their_absent_fields_as_none():
    old = next(data for _, data in PUBLISHED if data["status"] == "ok" and "hfu" not in data["training"])
    result = CellResult.from_json(old)
    assert result.training.hfu is None and "hfu" in result.training.absent
    assert "hfu" not in result.to_json()["training"]  # absent it stays absent
    assert result.training.timing.median_s == old["training"]["timing"]["median_s"]
    assert result.mode.name == old["mode"]["name"]


def finished() -> dict:
    return copy.deepcopy(next(data for _, data in PUBLISHED if data["status"] == "ok" and "floor" in data))


def test_a_missing_field_is_named_with_the_file():
    data = finished()
    del data["training"]["timing"]["iqr_s"]
    with pytest.raises(ResultError, match=r"^run/a\.json: cell result without training\.timing\.iqr_s$") as caught:
        CellResult.from_json(data, "run/a.json")
    assert caught.value.missing == ["training.timing.iqr_s"]


def test_a_field_of_the_wrong_type_is_named():
    data = finished()
    data["training"]["tokens_per_s"] = "fast"
    data["settings"]["seq_len"] = 512.5
    with pytest.raises(ResultError) as caught:
        CellResult.from_json(data, "a.json")
    assert caught.value.wrong == ["settings.seq_len is float 512.5, not an integer",
                                  "training.tokens_per_s is str 'fast', not a number"]
    assert "a.json: cell result settings.seq_len is float 512.5" in str(caught.value)


def test_a_finished_cell_needs_its_figures_and_a_failed_one_does_not():
    data = finished()
    del data["weights"]
    with pytest.raises(ResultError) as caught:
        CellResult.from_json(data)
    assert caught.value.missing == ["weights.weights_bytes", "weights.bits_per_quantized_param"]
    failed = {"schema": SCHEMA, "status": "oom", "mode": {"name": "nf4"}, "settings": {}, "error": "CUDA OOM"}
    assert CellResult.from_json(failed).error == "CUDA OOM"


def test_settings_with_training_need_what_the_run_summary_names():
    data = finished()
    del data["settings"]["lora"]["r"], data["settings"]["timing_warmup"]
    with pytest.raises(ResultError) as caught:
        CellResult.from_json(data)
    assert caught.value.missing == ["settings.timing_warmup", "settings.lora.r"]


@pytest.mark.parametrize("schema, message", [("qlora-bench/cell/2", "newer than this version reads"),
                                             ("qlora-bench/run/1", "not qlora-bench/cell/<version>")])
def test_other_schemas_are_refused(schema, message):
    with pytest.raises(ResultError, match=message):
        CellResult.from_json({**finished(), "schema": schema})


def test_unknown_keys_are_kept_in_settings_floor_and_the_result():
    """A new setting, a new floor component or a new section is no error, and survives a round trip."""
    data = finished()
    data["settings"]["offload_activations"] = True
    data["settings"]["mlp_tile_tokens"] = 1024
    data["floor"]["offloaded_bytes"] = 123
    data["new_measurement"] = {"x": 1}
    result = CellResult.from_json(data)
    assert {"offload_activations": True, "mlp_tile_tokens": 1024}.items() <= result.settings.extra.items()
    assert result.floor.extra["offloaded_bytes"] == 123 and result.extra["new_measurement"] == {"x": 1}
    assert result.to_json() == data


def test_a_measurements_columns_are_declared_on_its_field():
    """The HFU column the tables show comes from ``Training.hfu``'s declaration, read from that field."""
    (hfu, read), = [(column, read) for column, read in table_columns() if column.name == "hfu"]
    assert (hfu.header, hfu.fmt) == ("HFU", "{:.1%}")
    assert Training.__dataclass_fields__["hfu"].metadata["columns"] == (hfu,)
    result = CellResult.from_json(finished())
    assert read(result) == result.training.hfu is not None
    assert ("hfu", "HFU", "{:.1%}") in report.COLUMNS
    assert report.result_row(result)["hfu"] == result.training.hfu


@dataclass(kw_only=True)
class Extra(Section):
    """A new measurement's section (module level: the model resolves its annotations by name)."""
    first_bytes: int = measurement(Column("first_mib", "first MiB", scale=1 / 2**20, ratio=True))
    second_s: float | None = measurement(Column("second_ms", None, scale=1e3), default=None)


@dataclass(kw_only=True)
class Holder(Section):
    extra_section: Extra | None = None


def test_a_new_measurement_brings_its_columns():
    """A section with a field declared as a ``measurement`` gets that column, scaled, in field order."""
    columns = table_columns(Holder)
    assert [column.name for column, _ in columns] == ["first_mib", "second_ms"]
    holder = Holder.from_json({"extra_section": {"first_bytes": 2**21, "second_s": 0.5}})
    assert [read(holder) for _, read in columns] == [2.0, 500.0]
    assert [read(Holder.from_json({})) for _, read in columns] == [None, None]


def test_a_result_is_checked_where_it_is_written(tmp_path):
    data = finished()
    assert write_cell_result(data, tmp_path / "ok.json").exists()
    del data["mode"]
    with pytest.raises(ResultError, match="broken.json: cell result without mode.name"):
        write_cell_result(data, tmp_path / "broken.json")
    assert not (tmp_path / "broken.json").exists()


def test_a_malformed_result_leaves_nothing_half_written_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "nf4.json"
    write_cell_result(finished(), path)
    before = path.read_bytes()
    broken = finished()
    broken["training"]["losses"] = "low"
    with pytest.raises(ResultError, match=r"nf4\.json: cell result training\.losses is str 'low', not a list"):
        write_cell_result(broken, path)
    assert path.read_bytes() == before
    assert [file.name for file in tmp_path.iterdir()] == ["nf4.json"]  # no staging file left beside it


def zero_steps() -> dict:
    """A finished cell of zero training steps, as ``cell.py`` writes it (867fb90): no timing, rate or loss."""
    data = finished()
    data["training"].update(timing=None, tokens_per_s=None, mfu=None, hfu=None, losses=[], step_seconds=[])
    return data


def test_a_cell_of_zero_steps_is_valid_written_and_read_back(tmp_path):
    data = zero_steps()
    path = write_cell_result(data, tmp_path / "zero.json")
    assert json.loads(path.read_text()) == data
    result = CellResult.from_json(json.loads(path.read_text()), reportable=False)
    assert result.status == "ok" and result.training.timing is None and result.training.losses == []
    assert result.to_json() == data


def test_a_cell_of_zero_steps_is_not_reportable_and_the_report_skips_it(tmp_path):
    with pytest.raises(ResultError) as caught:
        CellResult.from_json(zero_steps(), "zero.json")
    assert caught.value.missing == ["training.losses[0]"]
    assert caught.value.wrong == ["training.timing is NoneType None, not an object"]
    write_cell_result(zero_steps(), tmp_path / "zero.json")
    write_cell_result(finished(), tmp_path / "ok.json")
    reading = read_paths([tmp_path])
    assert len(reading.results) == 1
    assert [(file.name, reason) for file, reason in reading.skipped] == [
        ("zero.json", "cell result without training.losses[0]; training.timing is NoneType None, not an object")]
