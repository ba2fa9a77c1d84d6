"""pytest-benchmark suites for GPU runners: `pytest bench/ --benchmark-only [--bench-... options]`.

Every (model or shape, mode, path) cell runs in its own spawned process (qlora_core.worker); pytest groups the
tests of one cell together, so one model is on the GPU at a time. The data is tokenized once in this process,
and the next cell's process is started (its imports done) while the current cell runs. Each cell's full
result is written atomically to --bench-out as soon as the cell finishes, so an interrupted run keeps what
finished and --bench-resume skips it; --bench-out/run.json, the run's manifest, says how the run was made and
where its wall time went.
On a machine without CUDA every benchmark skips with its reason; collection never needs a GPU. A shape cell
(--bench-shapes: random weights, memory and time only) predicted not to fit the GPU is not attempted: its result
says ``does_not_fit`` with the prediction, and its tests skip (--bench-attempt-unfit tries it anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from qlora_core import settings as declared
from qlora_core.cell import CellSettings, does_not_fit_result, failure_result, prepare_inputs
from qlora_core.levers import Levers
from qlora_core.manifest import MANIFEST_NAME, RunManifest, process_start
from qlora_core.modes import BASELINE_MODE, parse_modes
from qlora_core.paths import PATHS, check_path
from qlora_core.shapes import check_shape
from qlora_core.results import environment, write_cell_result
from qlora_core.sweep import reusable
from qlora_core.units import GIB
from qlora_core.worker import CellError, WorkerPool, serialize_inputs

#: Every cell the options ask for (parsed once, at configure time), the selected ones in run order, and the
#: session's worker pool, kept on the config.
ASKED_CELLS = pytest.StashKey[list]()
CELL_KEYS = pytest.StashKey[list]()
POOL = pytest.StashKey[WorkerPool]()
#: pytest-benchmark 5.2.x opens --benchmark-json while parsing the command line and hands hooks a file object.
MIN_PYTEST_BENCHMARK = (5, 3, 1)


def pytest_addoption(parser):
    group = parser.getgroup("qlora-bench", "qlora-bench GPU suites")
    group.addoption("--bench-models", default=None,
                    help="comma-separated models: 'smollm2' (embedded default), local folders or hub ids "
                         "(default: smollm2, unless --bench-shapes is given)")
    group.addoption("--bench-shapes", default="",
                    help="comma-separated named shapes (qlora_core.shapes, e.g. Llama-3.1-8B,Llama-3.1-70B): "
                         "random weights, memory and time only")
    group.addoption("--bench-paths", default="reference", help="comma-separated training paths: reference, lean")
    group.addoption("--bench-capacity-gib", type=float, default=None,
                    help="device memory a cell may use, enforced on its CUDA allocator (a smaller GPU measured on "
                         "a larger one; beyond it a cell ends as oom); shape cells predicted not to fit it are not "
                         "attempted (default: the GPU's total memory)")
    group.addoption("--bench-attempt-unfit", action="store_true",
                    help="run shape cells predicted not to fit anyway (they end as oom)")
    group.addoption("--bench-modes", default="all", help="comma-separated modes or 'all'")
    for setting in declared.on("bench"):
        group.addoption(*setting.option_strings("bench"), **setting.option_kwargs("bench"))
    group.addoption("--bench-out", default="bench-results", help="folder for per-cell result JSON and logs")
    group.addoption("--bench-resume", action="store_true", help="skip cells whose result in --bench-out finished")


def pytest_configure(config):
    """Refuse a pytest-benchmark too old for --benchmark-json paths and options naming no known mode, path or
    shape; create --benchmark-json's folder now (pytest-benchmark opens the file only at the end of the session
    and loses every measurement of the run when its folder is missing); start the cells' processes."""
    version = importlib.metadata.version("pytest-benchmark")
    if tuple(int(part) for part in version.split(".")[:3]) < MIN_PYTEST_BENCHMARK:
        raise pytest.UsageError(f"pytest-benchmark {version} is too old for bench/ (needs >= 5.3.1, which takes "
                                f"--benchmark-json as a path): pip install -U 'pytest-benchmark>=5.3.1'")
    json_path = config.getoption("benchmark_json", None)
    if json_path and Path(json_path).resolve() == (Path(config.option.bench_out) / MANIFEST_NAME).resolve():
        raise pytest.UsageError(f"--benchmark-json {json_path} is the run's manifest (--bench-out/{MANIFEST_NAME}): "
                                f"name it otherwise, e.g. {Path(json_path).with_name('pytest-benchmark.json')}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        config.stash[ASKED_CELLS] = cells = cell_keys(config.option)
    except ValueError as error:  # an unknown mode, path or shape: refused before any process starts
        raise pytest.UsageError(str(error)) from None
    config.stash[POOL] = pool = WorkerPool()
    if config.option.bench_device == "cpu" or torch.cuda.is_available():
        pool.start(len(cells))  # their imports run while pytest collects and tokenizes


def pytest_unconfigure(config):
    if POOL in config.stash:
        config.stash[POOL].close()


def pytest_collection_finish(session):
    """The selected cells in the order they run (pytest groups a cell's tests), for the worker pool's look-ahead."""
    keys = [item.callspec.params["cell_key"] for item in session.items
            if hasattr(item, "callspec") and "cell_key" in item.callspec.params]
    session.config.stash[CELL_KEYS] = list(dict.fromkeys(keys))


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


class CellKey(NamedTuple):
    """One cell: a model (or, with ``model`` None, a named shape) in a mode, trained on a path."""

    model: str | None
    shape: str | None
    mode: str
    path: str

    @property
    def stem(self) -> str:
        """Test id and result file name: ``<model or shape>-<mode>``, and ``-<path>`` off the reference path
        (so earlier results keep their names)."""
        name = self.shape or Path(self.model).name
        return f"{name}-{self.mode}" + ("" if self.path == "reference" else f"-{self.path}")


def _names(option: str | None) -> list[str]:
    return [name.strip() for name in (option or "").split(",") if name.strip()]


def cell_keys(option) -> list[CellKey]:
    """Every cell the options ask for: (models, then shapes) x modes x paths."""
    shapes = [check_shape(name) for name in _names(option.bench_shapes)]
    models = _names(option.bench_models) or ([] if shapes else ["smollm2"])
    paths = [check_path(path) for path in _names(option.bench_paths)]
    sources = [(model, None) for model in models] + [(None, shape) for shape in shapes]
    return [CellKey(model, shape, mode.name, path) for model, shape in sources
            for mode in parse_modes(option.bench_modes) for path in paths]


def pytest_generate_tests(metafunc):
    if "cell_key" not in metafunc.fixturenames:
        return
    keys = metafunc.config.stash[ASKED_CELLS]
    # session scope: pytest runs all tests of one cell together and tears its worker down before the next
    metafunc.parametrize("cell_key", keys, ids=[key.stem for key in keys], scope="session")


def cell_settings(config, key: CellKey) -> CellSettings:
    """The cell's settings from the command-line options (the only place bench options are read)."""
    values = declared.parsed_values(config.option, "bench")
    # --bench-steps counts the timed steps only; a cell's max_steps counts the warm-up too (as the sweep's --steps)
    values["max_steps"] = values.pop("timed_steps") + values["timing_warmup"]
    return declared.cell_settings(values, mode=key.mode, model=key.model, shape=key.shape, path=key.path,
                                  memory_cap_bytes=capacity_cap_bytes(config))


class BenchRun:
    """What the cells of one pytest session share: the worker pool (made at configure time; the next cells'
    processes start while the current one runs), the tokenized inputs (prepared once per model and data, not
    once per cell) and the run's manifest (``run.json`` in --bench-out). Made when the first cell is, so a
    session that runs no cell writes nothing."""

    def __init__(self, config, keys: list[CellKey]):
        self.config = config
        self.pool = config.stash[POOL]  # started at configure time, closed at unconfigure
        self.remaining = list(keys)
        self._inputs: dict[str, bytes] = {}
        command = ["pytest", *config.invocation_params.args]
        self.manifest = RunManifest(Path(config.option.bench_out), command, start=process_start())

    def inputs_for(self, settings: CellSettings) -> bytes:
        """The cell's serialized inputs; mode, path, the path's levers and kernels and the attention do not change
        them, so cells that differ only there share one tokenization."""
        how_it_runs = dict(mode=BASELINE_MODE, path=PATHS[0], kernels=(), attention=None, **Levers().describe())
        key = json.dumps(dataclasses.replace(settings, **how_it_runs).describe(), sort_keys=True)
        if key not in self._inputs:
            self._inputs[key] = serialize_inputs(prepare_inputs(settings))
        return self._inputs[key]

    def cell_done(self, key: CellKey) -> None:
        if key in self.remaining:
            self.remaining.remove(key)

    def close(self) -> None:
        self.pool.close()  # no spare outlives the last cell: the manifest's end is the run's
        self.manifest.close()


class BenchCell:
    """One cell's worker process, with the bookkeeping the tests share: the phases run so far, steps taken,
    and the cell's result written to ``path`` atomically (and entered in the run's manifest) when the cell
    finishes or fails."""

    def __init__(self, key: CellKey, settings: CellSettings, path: Path, run: BenchRun):
        self.key = key
        self.settings = settings
        self.path = path
        self.run = run
        self.failure: CellError | None = None
        self.steps_taken = 0
        self.phases_done: set[tuple] = set()
        self.start = run.manifest.started(key.stem, key.mode)
        try:
            inputs = run.inputs_for(settings)
            with self.timed("taking a process"):
                self.worker = run.pool.take(settings, log=path.with_suffix(".log"), inputs=inputs,
                                            cells_after=len(run.remaining) - 1)
        except (CellError, ValueError, FileNotFoundError, RuntimeError) as error:
            self.worker = None
            self._fail(error if isinstance(error, CellError) else CellError("error", f"{type(error).__name__}: "
                                                                                     f"{error}"))

    @contextlib.contextmanager
    def timed(self, activity: str):
        """Count the block's wall seconds towards ``activity`` in the run's manifest."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.run.manifest.spent(self.key.stem, activity, time.perf_counter() - start)

    def _fail(self, error: CellError) -> None:
        self.failure = error
        result = failure_result(self.settings, error.status, str(error))
        write_cell_result(result, self.path)
        self.run.manifest.finished(self.key.stem, self.key.mode, result, self.path, self.start)

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
            with self.timed(method):
                value = self.worker.call(method, *args)
        except CellError as error:
            self._fail(error)
            return None
        self.phases_done.add((method, *args))
        return value

    def check(self, benchmark=None) -> None:
        """Fail the test if the cell has failed, marking its benchmark record with the status."""
        if not self.failure:
            return
        if benchmark is not None:
            benchmark.extra_info.update(status=self.failure.status, error=str(self.failure))
        pytest.fail(f"{self.settings.mode}: {self.failure.status}: {self.failure}")

    def prepare(self) -> None:
        """Whatever of load, evaluation before training and LoRA set-up has not run yet (a deselected test's
        part), in that order."""
        for method, *args in (("load",), ("evaluate", "before"), ("setup_training",)):
            if (method, *args) not in self.phases_done:
                self.call(method, *args)

    def step(self) -> float | None:
        self.steps_taken += 1
        return self.attempt("step")

    def end_training(self) -> None:
        """Read the training peak."""
        self.call("end_training")

    def train_to_end(self) -> None:
        """Take the remaining steps untimed (when the step-time test was deselected) and read the peak."""
        self.prepare()
        while self.steps_taken < self.settings.train.max_steps and not self.failure:
            self.step()
        self.check()
        self.end_training()

    def finish(self) -> dict | None:
        """Stop the worker, then write the full result (if the cell got that far) and enter it in the manifest,
        so the cell's wall time includes its process's end."""
        result = None
        self.run.cell_done(self.key)
        if not self.failure and self.steps_taken:
            result = self.attempt("result")
        if self.worker is not None:
            with self.timed("ending the process"):
                self.worker.close()
        if result is not None:
            write_cell_result(result, self.path)
            self.run.manifest.finished(self.key.stem, self.key.mode, result, self.path, self.start)
        return result


def _cell_path(config, cell_key: CellKey) -> Path:
    return Path(config.option.bench_out) / f"{cell_key.stem}.json"


def _skip_if_resumed(config, settings: CellSettings, path: Path, run: BenchRun, key: CellKey) -> None:
    """With --bench-resume, a cell finished with the same settings is reused; one finished with other settings
    fails its tests naming them (``sweep.reusable``)."""
    if config.option.bench_resume and reusable(path, settings):
        run.cell_done(key)
        run.manifest.finished(key.stem, key.mode, json.loads(path.read_text()), path, None, resumed=True)
        pytest.skip(f"already measured: {path} (--bench-resume)")


def capacity_cap_bytes(config) -> int | None:
    """--bench-capacity-gib in bytes, or None when not given."""
    gib = config.option.bench_capacity_gib
    return None if gib is None else int(gib * GIB)


def device_capacity_bytes(config) -> int | None:
    """The memory a cell may use: --bench-capacity-gib, else the CUDA device's total; None on a CPU run."""
    if (cap := capacity_cap_bytes(config)) is not None:
        return cap
    if config.option.bench_device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def _skip_if_unfit(config, settings: CellSettings, path: Path, run: BenchRun, key: CellKey) -> None:
    """A shape cell predicted not to fit is reported (result ``does_not_fit`` at ``path``) and not attempted."""
    capacity = device_capacity_bytes(config)
    if capacity is None or config.option.bench_attempt_unfit:
        return
    result = does_not_fit_result(settings, capacity)
    if result is not None:
        write_cell_result(result, path)
        run.cell_done(key)
        run.manifest.finished(key.stem, key.mode, result, path, None)
        pytest.skip(f"{path.stem}: does not fit: {result['error']}")


@pytest.fixture(scope="session")
def bench_run(request):
    """The session's shared worker pool, inputs and manifest (made with the first cell, closed at the end)."""
    run = BenchRun(request.config, request.config.stash[CELL_KEYS])
    yield run
    run.close()


@pytest.fixture(scope="session")
def bench_cell(cell_key, request, bench_run):
    """The cell's own process, bound to the cell; the tests run its phases (``BenchCell.prepare``)."""
    path = _cell_path(request.config, cell_key)
    settings = cell_settings(request.config, cell_key)
    _skip_if_resumed(request.config, settings, path, bench_run, cell_key)
    _skip_if_unfit(request.config, settings, path, bench_run, cell_key)
    cell = BenchCell(cell_key, settings, path, bench_run)
    yield cell
    cell.finish()
