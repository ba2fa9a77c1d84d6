"""Sweeps: each mode in its own process, one result file per mode, resume, failures kept as results."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from tiny import TINY_STEPS, tiny_cell_settings
from qlora_core.cell import prepare_inputs
from qlora_core.manifest import MANIFEST_NAME
from qlora_core.modes import parse_modes
from qlora_core.results import RUN_SCHEMA, SCHEMA, write_json_atomic
from qlora_core.sweep import ResumeMismatchError, finished, result_path, reusable, run_sweep
from qlora_core.worker import LOOKAHEAD, MAX_STARTED_AT_ONCE, WorkerPool, processes_to_start_first

MODES = parse_modes("bf16,nf4")


class Events:
    """Collects ``on_event(mode, event)`` calls as (mode name, event)."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def __call__(self, mode, event):
        self.seen.append((mode.name, event))

    def of(self, name):
        return [event for mode, event in self.seen if mode == name]


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    """One real sweep of two modes, each in a child process, the data tokenized once here: (out dir, returned
    results, events)."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    events = Events()
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    results = run_sweep(settings, MODES, out, on_event=events, inputs=prepare_inputs(settings),
                        command=["qlora-bench", "sweep", "--modes", "bf16,nf4"])
    return out, results, events


def test_one_json_per_mode(swept):
    out, results, _ = swept
    assert sorted(p.name for p in out.glob("*.json")) == ["bf16.json", "nf4.json", MANIFEST_NAME]
    assert [r["mode"]["name"] for r in results] == ["bf16", "nf4"]
    for mode, result in zip(MODES, results):
        path = result_path(out, mode)
        assert json.loads(path.read_text()) == result
        assert result["status"] == "ok" and result["schema"] == SCHEMA
        assert result["settings"]["mode"] == mode.name
        assert (out / f"{mode.name}.log").is_file()
        assert finished(path)
    assert not list(out.glob(".*"))  # no staging files left


def test_progress_comes_back_from_the_children(swept):
    _, results, events = swept
    for mode, result in zip(MODES, results):
        steps = [e for e in events.of(mode.name) if "step" in e]
        assert [e["step"] for e in steps] == list(range(1, TINY_STEPS + 1))
        assert [e["loss"] for e in steps] == result["training"]["losses"]


def test_the_manifest_says_how_the_run_was_made_and_where_its_time_went(swept):
    out, results, _ = swept
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["schema"] == RUN_SCHEMA
    assert manifest["command"] == ["qlora-bench", "sweep", "--modes", "bf16,nf4"]
    assert manifest["environment"]["libraries"]["torch"] and manifest["ended"] >= manifest["started"]
    cells = manifest["cells"]
    assert [(c["mode"], c["status"], c["resumed"]) for c in cells] == [("bf16", "ok", False), ("nf4", "ok", False)]
    for cell, result in zip(cells, results):
        assert json.loads((out / cell["result"]).read_text()) == result
        phases = sum(result["phase_seconds"].values()) + sum(result["training"]["step_seconds"])
        assert cell["measured_seconds"] == pytest.approx(phases)
        assert 0 < cell["measured_seconds"] < cell["wall_seconds"] < manifest["wall_seconds"]
    assert manifest["measured_seconds"] == pytest.approx(sum(c["measured_seconds"] for c in cells))
    assert manifest["measured_share"] == pytest.approx(manifest["measured_seconds"] / manifest["wall_seconds"])


def test_cells_measure_the_inputs_the_sweep_prepared(tiny_model_dir, tmp_path):
    """The parent tokenizes once and the cells use its inputs, not their own: cut the held-out tokens to 40 here
    and the cell scores 39 of them (every token after the first), not the whole held-out set."""
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    inputs = prepare_inputs(settings)
    assert inputs.token_sets["heldout"].numel() > 40
    cut = dataclasses.replace(inputs, token_sets={"heldout": inputs.token_sets["heldout"][:40]})
    (result,) = run_sweep(settings, MODES[:1], tmp_path, inputs=cut)
    assert result["perplexity"]["before"]["heldout"]["n_tokens_scored"] == 40 - 1


def test_resume_skips_finished_cells(swept, tiny_model_dir):
    out, results, _ = swept
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != MANIFEST_NAME}
    events = Events()
    again = run_sweep(tiny_cell_settings(tiny_model_dir, "bf16"), MODES, out, resume=True, on_event=events)
    assert again == results
    # nothing rewritten, no log either; the manifest is this invocation's and says the cells were reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != MANIFEST_NAME} == stamps
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [(c["status"], c["resumed"], c["measured_seconds"]) for c in manifest["cells"]] == [("ok", True, None)] * 2
    for mode in MODES:
        assert events.of(mode.name) == [{"phase": "done (resumed)"}]


@pytest.mark.parametrize("change, named", [
    (dict(seq_len=16), "seq_len: 32 -> 16"),
    (dict(model="other-model-folder"), "model: "),
    (dict(lora=dataclasses.replace(tiny_cell_settings(".", "bf16").lora, r=8)), "lora.r: 4 -> 8"),
])
def test_resume_refuses_results_measured_with_other_settings(swept, tiny_model_dir, change, named):
    out, _, _ = swept
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = dataclasses.replace(tiny_cell_settings(tiny_model_dir, "bf16"), **change)
    with pytest.raises(ResumeMismatchError, match="bf16.json was measured with other settings") as error:
        run_sweep(other, MODES, out, resume=True)
    assert named in str(error.value)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # refused before any cell ran


def test_reusable_only_for_a_finished_cell_with_the_same_settings(swept, tiny_model_dir, tmp_path):
    out, _, _ = swept
    settings = tiny_cell_settings(tiny_model_dir, "nf4")
    assert reusable(out / "nf4.json", settings)
    assert not reusable(tmp_path / "nf4.json", settings)  # nothing there: run it
    steps = dataclasses.replace(settings.train, max_steps=TINY_STEPS + 1)
    with pytest.raises(ResumeMismatchError, match=f"train.max_steps: {TINY_STEPS} -> {TINY_STEPS + 1}"):
        reusable(out / "nf4.json", dataclasses.replace(settings, train=steps))


def test_a_result_written_before_a_setting_existed_is_reused_at_its_default(swept, tiny_model_dir, tmp_path):
    """A setting added later (profile_steps, num_processes) is missing from older results: at its default it
    is the set-up they were measured with, so they resume; at another value they are refused."""
    out, _, _ = swept
    older = json.loads((out / "nf4.json").read_text())
    for added in ("profile_steps", "num_processes"):
        del older["settings"][added]
    write_json_atomic(older, tmp_path / "nf4.json")
    settings = tiny_cell_settings(tiny_model_dir, "nf4")
    assert reusable(tmp_path / "nf4.json", settings)
    with pytest.raises(ResumeMismatchError, match="profile_steps: 0 -> 2"):
        reusable(tmp_path / "nf4.json", dataclasses.replace(settings, profile_steps=2))


def test_resume_reruns_unfinished_cells(swept, tiny_model_dir, tmp_path):
    source, _, _ = swept
    out = tmp_path / "partial"
    shutil.copytree(source, out)
    failed = json.loads((out / "nf4.json").read_text())
    failed["status"] = "error"
    (out / "nf4.json").write_text(json.dumps(failed))
    kept = (out / "bf16.json").stat().st_mtime_ns
    assert not finished(out / "nf4.json")

    results = run_sweep(tiny_cell_settings(tiny_model_dir, "bf16"), MODES, out, resume=True)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert (out / "bf16.json").stat().st_mtime_ns == kept
    assert json.loads((out / "nf4.json").read_text())["status"] == "ok"


def test_failed_cell_becomes_its_result_and_the_sweep_goes_on(tiny_model_dir, tmp_path):
    """A child that fails (here: its data file does not exist) yields an ``error`` result; the next mode runs."""
    missing = str(tmp_path / "no-such-rows.jsonl")
    base = dataclasses.replace(tiny_cell_settings(tiny_model_dir, "bf16"), data=missing)
    out = tmp_path / "run"
    results = run_sweep(base, MODES, out)
    assert [r["status"] for r in results] == ["error", "error"]  # the first failure did not end the sweep
    for mode, result in zip(MODES, results):
        assert json.loads(result_path(out, mode).read_text()) == result
        assert "DatasetError" in result["error"] and missing in result["error"]
        assert result["mode"]["name"] == mode.name
        assert result["settings"]["data"] == missing
        assert result["environment"]["libraries"]["torch"]
        assert not finished(result_path(out, mode))


def test_a_mode_registered_at_run_time_reaches_the_worker_process(tiny_model_dir, tmp_path):
    """Spawned workers import a fresh registry; the variant travels with the cell, so the sweep measures it."""
    from qlora_core.modes import MODES as REGISTRY
    from qlora_core.modes import get_mode, register

    variant = register(dataclasses.replace(get_mode("nf4"), name="nf4-fp32-compute", compute_dtype="float32"))
    try:
        (result,) = run_sweep(tiny_cell_settings(tiny_model_dir, "bf16"), [variant], tmp_path)
    finally:
        del REGISTRY[variant.name]
    assert result["status"] == "ok", result.get("error")
    assert result["mode"]["name"] == "nf4-fp32-compute"
    assert result["mode"]["compute_dtype"] == "float32"


def test_an_int8_cell_counts_its_repeated_cast_warning_and_states_its_matmul_dtype(tiny_model_dir, tmp_path):
    """bitsandbytes warns on every int8 matmul that it casts bf16 inputs to fp16: once in the log, all counted."""
    (result,) = run_sweep(tiny_cell_settings(tiny_model_dir, "bf16"), parse_modes("int8"), tmp_path)
    assert result["status"] == "ok", result.get("error")
    assert result["int8_matmul_dtype"] == "float16"
    casts = {text: n for text, n in result["warnings"].items() if "inputs will be cast" in text}
    (cast, count), = [(text, n) for text, n in casts.items() if "bfloat16 to float16" in text]
    assert count > 10  # a warning per int8 matmul call
    log = (tmp_path / "int8.log").read_text()
    for text, n in casts.items():  # the first occurrence, then its count at the end
        assert log.count(text.split(": ", 1)[1]) == 2 and f"occurred {n} times" in log
    assert "ResourceWarning" not in log


def test_the_pool_starts_the_next_cells_processes_when_a_cell_evaluates(tiny_model_dir):
    """With cells to follow, the pool starts their processes (up to ``LOOKAHEAD``) at the cell's first
    evaluation, not beside its load (that slowed the load ~10x on the H200); each later cell takes the oldest,
    the last leaves none behind, and every cell gets a process of its own."""
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    with WorkerPool() as pool:
        with pool.take(settings, cells_after=LOOKAHEAD + 1) as first:
            first.call("load")
            assert not pool.spares
            first.call("evaluate", "before")
            assert len(pool.spares) == LOOKAHEAD and all(spare.process.is_alive() for spare in pool.spares)
            oldest = pool.spares[0].process.pid
            assert first.process.pid not in {spare.process.pid for spare in pool.spares}
        with pool.take(settings) as second:
            second.call("load")
            second.call("evaluate", "before")
            assert second.process.pid == oldest
            assert len(pool.spares) == LOOKAHEAD - 1  # nothing started for cells that will not come
    assert not pool.spares


def test_a_cell_without_evaluation_starts_the_next_processes_after_its_timed_steps(tiny_model_dir):
    """A shape evaluates nothing: its next cells' processes start once its steps are over, never beside them
    (their imports spread a host-bound step's time by up to 50 % on the H200)."""
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    with WorkerPool() as pool:
        with pool.take(settings, cells_after=1) as cell:
            cell.call("load")
            cell.call("setup_training")
            cell.call("step")
            assert not pool.spares
            cell.call("end_training")
            assert len(pool.spares) == 1



@pytest.mark.parametrize("cells, cores, started", [
    (7, 16, 7),  # the H200 host: every cell of a 7-mode run before the first
    (20, 64, MAX_STARTED_AT_ONCE),
    (7, 2, LOOKAHEAD),  # a 2-core CI machine: no more than it can import beside the parent
    (1, 16, 1),  # nothing for cells that will not come
])
def test_processes_started_before_the_first_cell_follow_the_spare_cores(monkeypatch, cells, cores, started):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert processes_to_start_first(cells) == started


def test_processes_started_before_the_first_cell_serve_the_cells_in_order(tiny_model_dir, monkeypatch):
    """Started together before the first cell, the processes are taken oldest first, and while they last the pool
    starts no other beside a cell."""
    monkeypatch.setattr("os.cpu_count", lambda: 2 * (LOOKAHEAD + 1))
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    with WorkerPool() as pool:
        pool.start(LOOKAHEAD + 1)
        started = [spare.process.pid for spare in pool.spares]
        assert len(started) == LOOKAHEAD + 1
        with pool.take(settings, cells_after=LOOKAHEAD) as first:
            first.call("load")
            first.call("evaluate", "before")
            assert first.process.pid == started[0]
            assert [spare.process.pid for spare in pool.spares] == started[1:]
