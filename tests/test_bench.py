"""bench/ as a GPU runner uses it, dry-run on the CPU: the README's command with --benchmark-json into a folder
that does not exist yet, two modes of the tiny model, every suite."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_core.manifest import MANIFEST_NAME
from qlora_core.results import read_results

REPO = Path(__file__).resolve().parents[1]
MODES = ("bf16", "nf4")


def run_bench(model_dir: Path, eval_text: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """pytest bench/ on the CPU over MODES of the tiny model, cells into ``out``."""
    command = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
               "--bench-device", "cpu", "--bench-models", str(model_dir), "--bench-modes", ",".join(MODES),
               "--bench-seq-len", "32", "--bench-batch-size", "2", "--bench-warmup", "1",
               "--bench-eval-text", str(eval_text), "--bench-eval-window", "32", "--bench-eval-stride", "16",
               "--bench-eval-batch-size", "4", "--bench-eval-max-tokens", "128", "--bench-out", str(out), *options]
    return subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, eval_text_file, tmp_path_factory):
    """(completed process, --bench-out folder, --benchmark-json path, launch time) of one bench/ session."""
    root = tmp_path_factory.mktemp("bench")
    bench_json = root / "not-yet-made" / "bench.json"
    out = root / "cells"
    launched = datetime.datetime.now(datetime.timezone.utc)
    run = run_bench(tiny_model_dir, eval_text_file, out, "--bench-steps", "3", "--bench-profile-steps", "1",
                    "--benchmark-json", str(bench_json))
    return run, out, bench_json, launched


def test_every_suite_passes_and_the_json_lands_in_a_new_folder(bench_run):
    run, _, bench_json, _ = bench_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "6 passed" in run.stdout
    benchmarks = json.loads(bench_json.read_text())["benchmarks"]
    assert sorted(b["name"] for b in benchmarks) == sorted(
        f"{test}[tiny-llama-{mode}]" for test in ("test_memory", "test_step_time", "test_perplexity") for mode in MODES)


def test_one_process_per_cell_gives_memory_time_and_perplexity(bench_run):
    _, out, bench_json, _ = bench_run
    cells = [cell.to_json() for cell in read_results([bench_json])]
    assert [c["mode"]["name"] for c in cells] == list(MODES)
    for cell in cells:
        saved = json.loads((out / f"tiny-llama-{cell['mode']['name']}.json").read_text())
        assert saved["status"] == "ok" and saved["training"]["losses"] == cell["training"]["losses"]
        assert set(cell["memory"]) >= {"before_load", "after_load", "after_setup", "training_peak"}
        assert set(cell["perplexity"]) == {"before", "after", "merged"}
        assert len(cell["training"]["step_seconds"]) == 1 + 3  # warm-up and timed steps, in the worker
        assert cell["profile"]["calls"] == 1 and cell["profile"]["top_host_ops"]  # one more step, profiled
        log = (out / f"tiny-llama-{cell['mode']['name']}.log").read_text()
        assert "profile of 1 training steps, operators by self host time" in log
    memory = [b for b in json.loads(bench_json.read_text())["benchmarks"] if b["name"].startswith("test_memory")]
    for record in memory:  # the load is what the memory suite times; its readings come with it
        assert record["stats"]["rounds"] == 1
        assert record["extra_info"]["weights"]["weights_bytes"] > 0
        assert set(record["extra_info"]["memory_readings"]) == {"before_load", "after_load", "after_setup"}


def test_the_manifest_accounts_for_the_run(bench_run):
    _, out, _, launched = bench_run
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    started = datetime.datetime.fromisoformat(manifest["started"])
    assert abs((started - launched).total_seconds()) < 0.5  # the clock starts with the process, imports counted
    assert manifest["command"][:2] == ["pytest", "bench/"] and "--bench-out" in manifest["command"]
    assert [(c["name"], c["status"]) for c in manifest["cells"]] == [(f"tiny-llama-{m}", "ok") for m in MODES]
    for cell in manifest["cells"]:
        assert (out / cell["result"]).is_file()
        assert 0 < cell["measured_seconds"] < cell["wall_seconds"]
        spent = cell["seconds_in"]  # where the cell's wall went, call by call
        assert set(spent) == {"taking a process", "load", "memory_readings", "evaluate", "setup_training", "step",
                              "end_training", "profile", "evaluate_merged", "result", "ending the process"}
        assert cell["measured_seconds"] < sum(spent.values()) <= cell["wall_seconds"]
    assert 0 < manifest["measured_share"] < 1
    assert manifest["wall_seconds"] > sum(c["wall_seconds"] for c in manifest["cells"])  # start-up counted too


def test_resume_reuses_cells_with_the_same_settings_and_refuses_others(bench_run, tiny_model_dir,
                                                                     eval_text_file, tmp_path):
    _, measured, _, _ = bench_run
    out = tmp_path / "cells"
    shutil.copytree(measured, out)
    again = run_bench(tiny_model_dir, eval_text_file, out, "--bench-steps", "3", "--bench-profile-steps", "1",
                      "--bench-resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "6 skipped" in again.stdout
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [(c["status"], c["resumed"]) for c in manifest["cells"]] == [("ok", True)] * len(MODES)
    other = run_bench(tiny_model_dir, eval_text_file, out, "--bench-steps", "4", "--bench-profile-steps", "1",
                      "--bench-resume")
    assert other.returncode != 0
    assert "measured with other settings" in other.stdout and "train.max_steps: 4 -> 5" in other.stdout


def test_a_session_that_runs_no_cell_writes_nothing(tmp_path):
    """CI collects bench/ with the CPU tests: without CUDA every cell skips, and no run folder appears."""
    command = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
               "--bench-out", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skipped" in run.stdout and not (tmp_path / "out").exists()


def test_benchmark_json_may_not_overwrite_the_manifest(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
               "--bench-out", str(out), "--benchmark-json", str(out / MANIFEST_NAME)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 4  # pytest's usage error, before anything runs
    assert "is the run's manifest" in run.stderr and not out.exists()


@pytest.mark.parametrize("option, message", [("--bench-modes=nf4,nf5", "unknown mode 'nf5'"),
                                             ("--bench-shapes=Llama-9B", "unknown shape 'Llama-9B'"),
                                             ("--bench-kernels=rmsnorm", "unknown kernel(s) rmsnorm")])
def test_an_unknown_cell_option_is_refused_before_anything_runs(tmp_path, option, message):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
               "--bench-device", "cpu", "--bench-out", str(out), option]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr  # pytest's usage error
    assert message in run.stderr and not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                    reason="Liger-Kernel is installed: its absence cannot be seen")
def test_fused_kernels_reach_the_lean_cells_and_fail_loudly_without_liger(tmp_path):
    """--bench-kernels goes into each cell's settings (the cells' shared inputs are made without it): on a machine
    without Liger-Kernel every cell fails saying how to install it, rather than run without the kernels."""
    command = [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
               "--bench-device", "cpu", "--bench-shapes", "tiny-llama", "--bench-paths", "lean", "--bench-modes",
               "bf16", "--bench-kernels", "swiglu", "--bench-steps", "2", "--bench-warmup", "1", "--bench-seq-len",
               "32", "--bench-batch-size", "2", "--bench-out", str(tmp_path / "out")]
    run = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "pip install 'qlora-bench[liger]'" in run.stdout
