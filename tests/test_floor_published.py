"""Today's memory floor against the H200's measured peaks: every context-frontier probe published in results/
that trained (shape cells, one step each under a hard cap), re-predicted at its own settings. The published
cells keep the floor they ran with; this checks the floor as it is now against what the allocator measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_core.cell import CellSettings, predicted_floor
from qlora_core.shapes import shape_config

RESULTS = Path(__file__).resolve().parent.parent / "results"
#: Allocated peaks predicted within this fraction (2026-12-03: every probe within 0.6 %).
REL_TOL = 0.01


def trained_probes() -> list[Path]:
    """The published probe cells that trained one step: status ok, a shape (random weights)."""
    found = []
    for path in sorted(RESULTS.glob("*/**/probes/*.json")):
        result = json.loads(path.read_text())
        if path.name != "run.json" and result.get("status") == "ok" and result["settings"].get("shape"):
            found.append(path)
    return found


PROBES = trained_probes()


def test_results_hold_probes_of_every_lever():
    levers = {(CellSettings.from_dict(json.loads(p.read_text())["settings"]).levers.label()) for p in PROBES}
    assert {"", "-offload", "-mlp-tile4096", "-offload-mlp-tile4096"} <= levers


@pytest.mark.parametrize("path", PROBES, ids=lambda path: f"{path.parent.parent.parent.name}/{path.stem}")
def test_today_s_floor_predicts_each_published_probe_s_peak(path):
    result = json.loads(path.read_text())
    settings = CellSettings.from_dict(result["settings"])
    outliers = result["floor"].get("int8_outlier_columns")  # int8's reference path holds them: as the probe had
    floor = predicted_floor(settings, shape_config(settings.shape), "cuda", outliers)
    measured = result["predicted_vs_measured"]["training_peak"]["measured_bytes"]
    assert measured == pytest.approx(floor["peak_bytes"], rel=REL_TOL)
