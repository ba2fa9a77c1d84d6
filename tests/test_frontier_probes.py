"""Probe cells that check a predicted frontier: which cells, and what their results say."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from qlora_core.cli import FRONTIER_ALLOCATOR_CONF, allocator_conf_for_children
from qlora_core.frontier_probes import finished_probes, probe_cells, probe_name, with_probes
from qlora_core.lora import LoraSettings
from qlora_core.measure.frontier import TOKEN_GRANULARITY

LORA = LoraSettings(r=4, alpha=8)
FRONTIER = {"shape": "Llama-3.1-8B", "mode": "nf4-dq", "path": "lean", "capacity_bytes": 24 * 2**30,
            "tokens": 31232, "peak_bytes": 0, "bytes_per_token": 0.0, "limited_by": "memory"}


def test_three_probes_at_batch_one_under_the_cap():
    cells = probe_cells(FRONTIER, LORA)
    assert list(cells) == [f"Llama-3.1-8B-nf4-dq-lean-24gib-{probe}" for probe in ("half", "at", "above")]
    # above: 5 % over the prediction, rounded up to whole steps (32,793.6 -> 33,024)
    assert [c.seq_len for c in cells.values()] == [15616, 31232, 129 * TOKEN_GRANULARITY]
    for settings in cells.values():
        assert settings.batch_size == 1 and settings.memory_cap_bytes == 24 * 2**30 and settings.device == "cuda"
        # one step, which holds it all: the optimizer's state is made before it
        assert settings.train.max_steps == 1 and settings.timing_warmup == 0
        assert settings.train.optimizer_state_upfront
        assert (settings.shape, settings.mode, settings.path, settings.lora) == ("Llama-3.1-8B", "nf4-dq", "lean", LORA)


def test_the_probes_asked_for_and_no_others():
    assert [name.rsplit("-", 1)[1] for name in probe_cells(FRONTIER, LORA, probes=["above", "at"])] == ["above", "at"]
    with pytest.raises(ValueError, match="unknown probes \\['beside'\\]; choose from half, at, above"):
        probe_cells(FRONTIER, LORA, probes=["at", "beside"])


def test_probes_go_past_the_positions_where_their_frontier_did():
    assert not any(cell.beyond_positions for cell in probe_cells(FRONTIER, LORA).values())
    assert all(cell.beyond_positions for cell in probe_cells({**FRONTIER, "beyond_positions": True}, LORA).values())


def test_probes_trace_their_memory_when_asked():
    assert not any(cell.trace_memory for cell in probe_cells(FRONTIER, LORA).values())
    assert all(cell.trace_memory for cell in probe_cells(FRONTIER, LORA, trace_memory=True).values())


def test_no_probes_where_nothing_fits_and_none_above_a_positions_or_host_bound():
    assert probe_cells({**FRONTIER, "tokens": 0}, LORA) == {}
    for bound in ("positions", "host memory"):
        assert not any(name.endswith("-above") for name in probe_cells({**FRONTIER, "limited_by": bound}, LORA))


def test_probes_of_a_frontier_with_levers_pull_them_and_say_so_in_their_names():
    levers = {"offload_activations": True, "mlp_tile_tokens": 4096}
    cells = probe_cells({**FRONTIER, "levers": levers}, LORA)
    assert list(cells)[0] == "Llama-3.1-8B-nf4-dq-lean-offload-mlp-tile4096-24gib-half"
    assert all(cell.offload_activations and cell.mlp_tile_tokens == 4096 for cell in cells.values())


def result(status: str, peak: int | None = None, predicted: int | None = None) -> dict:
    rows = {"training_peak": {"measured_bytes": peak, "predicted_bytes": predicted}} if peak is not None else None
    return {"status": status, "predicted_vs_measured": rows}


def test_confirmed_when_the_at_probe_runs_and_the_one_above_runs_out_of_memory():
    results = {probe_name(FRONTIER, "half"): result("ok", 10 * 2**30, 11 * 2**30),
               probe_name(FRONTIER, "at"): result("ok", 19 * 2**30, 21 * 2**30),
               probe_name(FRONTIER, "above"): result("oom")}
    checked = with_probes(FRONTIER, results)
    assert checked["confirmed"]
    assert checked["probes"]["above"] == {"tokens": 33024, "status": "oom", "peak_bytes": None, "predicted_bytes": None}
    assert checked["measured_bytes_per_token"] == 9 * 2**30 / (31232 - 15616)
    # the prediction's slope over the same span: the cells' own predicted peaks, not the frontier's last token
    assert checked["predicted_span_bytes_per_token"] == 10 * 2**30 / (31232 - 15616)
    results[probe_name(FRONTIER, "above")] = result("ok", 20 * 2**30)
    assert not with_probes(FRONTIER, results)["confirmed"]  # the prediction was short of the real frontier
    assert with_probes(FRONTIER, {})["probes"]["at"]["status"] == "not run"


def test_a_resumed_frontier_keeps_earlier_probes_of_its_own_settings_out_of_memory_ones_too(tmp_path):
    """An earlier call's probe that ran out of memory is a result (not run again, in the document); one of the
    same name at another length belongs to another prediction and is left out; a failure of another kind is
    run again."""
    cells = probe_cells(FRONTIER, LORA)
    names = {probe: probe_name(FRONTIER, probe) for probe in ("half", "at", "above")}
    write = lambda name, status, settings: (tmp_path / f"{name}.json").write_text(  # noqa: E731
        json.dumps({"status": status, "settings": settings.describe()}))
    write(names["at"], "oom", cells[names["at"]])
    write(names["above"], "ok", dataclasses.replace(cells[names["above"]], seq_len=99 * TOKEN_GRANULARITY))
    write(names["half"], "error", cells[names["half"]])
    kept = finished_probes([FRONTIER], LORA, tmp_path)
    assert list(kept) == [names["at"]] and kept[names["at"]]["status"] == "oom"
    assert with_probes(FRONTIER, kept)["probes"]["at"]["status"] == "oom"


def test_measure_dry_runs_the_probes_on_cpu_and_records_them(tmp_path):
    """The probes run one command at a time as a long frontier's would (``--probes``, then ``--resume``), each
    call's document holding every probe finished so far."""
    command = [sys.executable, "-m", "qlora_core.cli", "frontier", "--shapes", "tiny-llama", "--modes", "nf4",
               "--paths", "lean", "--capacity-gib", "0.0018", "--lora-r", "4", "--measure", "--device", "cpu",
               "--out", str(tmp_path)]
    first = subprocess.run([*command, "--probes", "at"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    (found,) = json.loads((tmp_path / "frontier.json").read_text())["frontiers"]
    assert [found["probes"][probe]["status"] for probe in ("half", "at", "above")] == ["not run", "ok", "not run"]
    # a later call for another probe keeps the earlier one in the frontier's document
    half = subprocess.run([*command, "--probes", "half", "--resume"], capture_output=True, text=True, timeout=600)
    assert half.returncode == 0, half.stderr
    (found,) = json.loads((tmp_path / "frontier.json").read_text())["frontiers"]
    assert [found["probes"][probe]["status"] for probe in ("half", "at", "above")] == ["ok", "ok", "not run"]
    run = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (found,) = json.loads((tmp_path / "frontier.json").read_text())["frontiers"]
    assert found["probes"]["at"]["status"] == "ok" and not found["confirmed"]  # no cap on a CPU: nothing fails
    assert (tmp_path / "frontier.png").stat().st_size > 0  # the checked frontier marked on its line
    manifest = json.loads((tmp_path / "probes" / "run.json").read_text())
    assert [cell["name"] for cell in manifest["cells"]] == [probe_name(found, p) for p in ("half", "at", "above")]
    assert [cell["resumed"] for cell in manifest["cells"]] == [True, True, False]
    # the probes' processes ran under the frontier's allocator configuration, and their results say so
    assert json.loads((tmp_path / "frontier.json").read_text())["probe_allocator_conf"] == FRONTIER_ALLOCATOR_CONF
    probe = json.loads((tmp_path / "probes" / f"{probe_name(found, 'at')}.json").read_text())
    assert probe["environment"]["allocator_conf"] == FRONTIER_ALLOCATOR_CONF


def test_allocator_conf_reaches_child_processes_only_inside(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.9")
    child = [sys.executable, "-c", "from qlora_core.results import allocator_conf; print(allocator_conf())"]
    with allocator_conf_for_children("expandable_segments:True"):
        inside = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip()
    with allocator_conf_for_children(""):
        default = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip()
    assert (inside, default) == ("expandable_segments:True", "None")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    assert os.environ["PYTORCH_ALLOC_CONF"] == "garbage_collection_threshold:0.9"


def test_measure_needs_an_out_folder():
    run = subprocess.run([sys.executable, "-m", "qlora_core.cli", "frontier", "--shapes", "tiny-llama", "--measure"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--measure needs --out" in run.stderr
