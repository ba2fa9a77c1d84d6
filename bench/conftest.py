"""pytest-benchmark suites for GPU runners: `pytest bench/ --benchmark-only [--bench-... options]`.

Every (model, mode) cell runs in its own spawned process (qlora_core.worker); pytest groups the tests of one
cell together, so one model is on the GPU at a time. Each cell's full result is also written atomically to
--bench-out as soon as the cell finishes, so an interrupted run keeps what finished and --bench-resume skips it.
On a machine without CUDA every benchmark skips with its reason; collection never needs a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from qlora_core.cell import CellSettings, failure_result
from qlora_core.lora import LoraSettings
from qlora_core.modes import parse_modes
from qlora_core.results import environment, write_json_atomic
from qlora_core.sweep import finished
from qlora_core.trainer import TrainSettings
from qlora_core.worker import CellError, CellWorker


def pytest_addoption(parser):
    group = parser.getgroup("qlora-bench", "qlora-bench GPU suites")
    group.addoption("--bench-models", default="smollm2",
                    help="comma-separated models: 'smollm2' (embedded default), local folders or hub ids")
    group.addoption("--bench-gguf", default=os.environ.get("QLORA_BENCH_GGUF"),
                    help="local copy of the default model's GGUF (default $QLORA_BENCH_GGUF)")
    group.addoption("--bench-modes", default="all", help="comma-separated modes or 'all'")
    group.addoption("--bench-seq-len", type=int, default=512, help="tokens per training block")
    group.addoption("--bench-batch-size", type=int, default=8, help="blocks per step")
    group.addoption("--bench-steps", type=int, default=40, help="timed training steps per cell")
    group.addoption("--bench-warmup", type=int, default=5, help="untimed warm-up steps before them")
    group.addoption("--bench-memory-steps", type=int, default=5, help="steps of the separate memory pass")
    group.addoption("--bench-lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    group.addoption("--bench-no-gradient-checkpointing", action="store_true", help="keep all activations")
    group.addoption("--bench-eval-text", default=os.environ.get("QLORA_BENCH_EVAL_TEXT"),
                    help="extra evaluation text path, e.g. WikiText-2 wiki.test.raw (default $QLORA_BENCH_EVAL_TEXT)")
    group.addoption("--bench-eval-window", type=int, default=1024, help="perplexity window (tokens)")
    group.addoption("--bench-eval-stride", type=int, default=512, help="perplexity stride (tokens)")
    group.addoption("--bench-eval-batch-size", type=int, default=32, help="perplexity windows per forward pass")
    group.addoption("--bench-eval-max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    group.addoption("--bench-device", default="cuda", choices=["cuda", "cpu"],
                    help="'cpu' dry-runs the suites without a GPU (to check them; figures are not GPU figures)")
    group.addoption("--bench-out", default="bench-results", help="folder for per-cell result JSON and logs")
    group.addoption("--bench-resume", action="store_true", help="skip cells whose result in --bench-out finished")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.option.bench_device == "cpu":
        return
    skip = pytest.mark.skip(reason="CUDA is not available: the qlora-bench GPU suites need a GPU")
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):  # this hook sees every collected item, tests/ included
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    """GPU, driver, CUDA and library versions beside pytest-benchmark's own machine info."""
    machine_info["qlora_bench"] = environment()


def pytest_generate_tests(metafunc):
    if "cell_key" not in metafunc.fixturenames:
        return
    options = metafunc.config.option
    models = [m.strip() for m in options.bench_models.split(",") if m.strip()]
    keys = [(model, mode.name) for model in models for mode in parse_modes(options.bench_modes)]
    ids = [f"{Path(model).name}-{mode}" for model, mode in keys]
    # session scope: pytest runs all tests of one cell together and tears its worker down before the next
    metafunc.parametrize("cell_key", keys, ids=ids, scope="session")


def cell_settings(config, model: str, mode: str) -> CellSettings:
    """The cell's settings from the command-line options (the only place bench options are read)."""
    option = config.option
    steps = option.bench_warmup + option.bench_steps
    return CellSettings(
        mode=mode,
        model=model,
        gguf=option.bench_gguf,
        seq_len=option.bench_seq_len,
        batch_size=option.bench_batch_size,
        timing_warmup=option.bench_warmup,
        gradient_checkpointing=not option.bench_no_gradient_checkpointing,
        eval_text=option.bench_eval_text,
        eval_window=option.bench_eval_window,
        eval_stride=option.bench_eval_stride,
        eval_max_tokens=option.bench_eval_max_tokens,
        eval_batch_size=option.bench_eval_batch_size,
        device=option.bench_device,
        lora=LoraSettings(r=option.bench_lora_r, alpha=2 * option.bench_lora_r),
        train=TrainSettings(max_steps=steps),
    )


class BenchCell:
    """One cell's worker process, with the bookkeeping the tests share: steps taken, and the cell's result
    written to ``path`` atomically when the cell finishes or fails."""

    def __init__(self, settings: CellSettings, path: Path):
        self.settings = settings
        self.path = path
        self.failure: CellError | None = None
        self.steps_taken = 0
        self.worker = CellWorker(settings, log=path.with_suffix(".log"))

    def call(self, method: str, *args):
        """Run a Cell phase in the worker; a failure (OOM, error, crash) becomes this cell's result and fails
        the test."""
        result = self.attempt(method, *args)
        self.check()
        return result

    def attempt(self, method: str, *args):
        """``call`` for benchmark targets: a failure is recorded, not raised, because pytest-benchmark cannot
        save a benchmark with no rounds (it loses the whole JSON); the test calls ``check`` afterwards."""
        if self.failure:
            return None
        try:
            return self.worker.call(method, *args)
        except CellError as error:
            self.failure = error
            write_json_atomic(failure_result(self.settings, error.status, str(error)), self.path)
            return None

    def check(self, benchmark=None) -> None:
        """Fail the test if the cell has failed, marking its benchmark record with the status."""
        if not self.failure:
            return
        if benchmark is not None:
            benchmark.extra_info.update(status=self.failure.status, error=str(self.failure))
        pytest.fail(f"{self.settings.mode}: {self.failure.status}: {self.failure}")

    def step(self) -> float | None:
        self.steps_taken += 1
        return self.attempt("step")

    def train_to_end(self) -> None:
        """Take the remaining steps untimed (when the step-time test was deselected) and read the peak."""
        while self.steps_taken < self.settings.train.max_steps and not self.failure:
            self.step()
        self.call("end_training")

    def finish(self) -> dict | None:
        """Write the full result (if the cell got that far) and stop the worker."""
        result = None
        if not self.failure and self.steps_taken:
            result = self.call("result")
            write_json_atomic(result, self.path)
        self.worker.close()
        return result


def _cell_path(config, cell_key) -> Path:
    model, mode = cell_key
    return Path(config.option.bench_out) / f"{Path(model).name}-{mode}.json"


def _skip_if_resumed(config, path: Path) -> None:
    if config.option.bench_resume and finished(path):
        pytest.skip(f"already measured: {path} (--bench-resume)")


@pytest.fixture(scope="session")
def bench_cell(cell_key, request):
    """The cell loaded, evaluated before training and set up for LoRA, in its own process."""
    path = _cell_path(request.config, cell_key)
    _skip_if_resumed(request.config, path)
    cell = BenchCell(cell_settings(request.config, *cell_key), path)
    cell.call("load")
    cell.call("evaluate", "before")
    cell.call("setup_training")
    yield cell
    cell.finish()


@pytest.fixture
def memory_cell(cell_key, request):
    """A second, separate process for the memory pass (no evaluation; a few untimed steps)."""
    path = _cell_path(request.config, cell_key)
    _skip_if_resumed(request.config, path)
    settings = cell_settings(request.config, *cell_key)
    steps = request.config.option.bench_memory_steps
    settings = dataclasses.replace(
        settings, timing_warmup=0, eval_text=None, train=dataclasses.replace(settings.train, max_steps=steps)
    )
    cell = BenchCell(settings, path.with_name(f"memory-{path.name}"))
    yield cell
    cell.worker.close()
