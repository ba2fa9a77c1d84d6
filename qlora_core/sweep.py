"""Run cells (a model in several modes, or any named set of cells), each in a fresh Python process, writing each
result as it finishes.

A fresh process per cell keeps one mode's CUDA allocator state (and any crash or out-of-memory) out of the
next mode's figures; the data is tokenized once, in the parent, and the next cell's process is started while
the current one evaluates, so the cells pay for measurement, not for start-up. Results land atomically, one
file per mode, with the run's manifest (``run.json``) beside them, so an interrupted sweep keeps everything
that finished and ``resume=True`` skips those cells on the next run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from qlora_core.cell import CellInputs, CellSettings, failure_result
from qlora_core.manifest import RunManifest
from qlora_core.modes import Mode
from qlora_core.results import flatten_settings, settings_as_today, write_cell_result
from qlora_core.worker import CellError, WorkerPool, serialize_inputs


def cell_path(out_dir: Path, name: str, suffix: str = ".json") -> Path:
    """Where the cell called ``name`` writes its result (``.json``) or its log (``.log``)."""
    return out_dir / f"{name}{suffix}"


def result_path(out_dir: Path, mode: Mode) -> Path:
    """A sweep's result file for ``mode``: its cells are named by mode."""
    return cell_path(out_dir, mode.name)


class ResumeMismatchError(ValueError):
    """A finished result to resume from was measured with other settings than the run being resumed."""


#: The statuses of a cell that a resumed run keeps by default: it trained.
KEPT_STATUSES = ("ok",)


def finished(path: Path, kept: tuple[str, ...] = KEPT_STATUSES) -> bool:
    """True when ``path`` holds a completed cell: one whose status is among ``kept``."""
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("status") in kept


def _differences(old: dict, new: dict) -> list[str]:
    """Dotted keys where two settings trees differ, as ``"key: old -> new"``."""
    old, new = flatten_settings(old), flatten_settings(new)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


def reusable(path: Path, settings: CellSettings, kept: tuple[str, ...] = KEPT_STATUSES) -> bool:
    """True when ``path`` holds a finished cell (``finished``, with the ``kept`` statuses) measured with
    ``settings``: a resumed run keeps it. False when there is no finished cell (it runs again).

    Raises ``ResumeMismatchError`` naming each differing setting (dotted key, old -> new) when the finished cell
    was measured with other settings: reusing it would mix two set-ups in one table.
    """
    if not finished(path, kept):
        return False
    old, new = settings_as_today(json.loads(path.read_text())["settings"]), settings_as_today(settings.describe())
    if differences := _differences(old, new):
        raise ResumeMismatchError(f"{path} was measured with other settings ({'; '.join(differences)}); "
                                  f"resume with the same options or choose another --out")
    return True


def run_cell_process(settings: CellSettings, path: Path, on_event: Callable[[dict], None], log: Path,
                     pool: WorkerPool, inputs: bytes | None = None, cells_after: int = 0) -> dict:
    """Run one cell in a fresh worker process from ``pool`` and write its result to ``path`` atomically; a
    failure (out of memory, an exception, a dead worker) becomes that cell's result rather than the sweep's end.
    ``inputs``: the cell's serialized inputs (``worker.serialize_inputs``), or None; ``cells_after``: how many
    cells follow, whose processes start while this one runs."""
    try:
        with pool.take(settings, log=log, on_event=on_event, inputs=inputs, cells_after=cells_after) as worker:
            result = worker.call("run_all")
    except CellError as error:
        result = failure_result(settings, error.status, f"{error} (log: {log})")
    write_cell_result(result, path)
    return result


def run_cells(
    cells: dict[str, CellSettings],
    out_dir: Path,
    *,
    resume: bool = False,
    on_event: Callable[[str, dict], None] = lambda name, event: None,
    inputs: CellInputs | None = None,
    command: list[str] | None = None,
    kept: tuple[str, ...] = KEPT_STATUSES,
) -> list[dict]:
    """Measure each named cell in its own process; results go to ``out_dir/<name>.json`` (logs beside them),
    the run's manifest to ``out_dir/run.json``, in the order given.

    ``inputs``: the tokenized data every cell shares, prepared once here rather than once per cell process
    (None: each cell prepares its own, as cells of different sequence lengths must); ``command``: the command
    line the manifest records. With ``resume``, finished cells (a status among ``kept``) measured with the same
    settings are kept; one measured with other settings raises ``ResumeMismatchError`` before any cell runs.
    """
    # every cell checked before the first one runs, so a mismatch costs no measurement
    reused = {name for name, settings in cells.items()
              if resume and reusable(cell_path(out_dir, name), settings, kept)}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(out_dir, command)
    payload = serialize_inputs(inputs)
    to_run = [name for name in cells if name not in reused]
    results = []
    with WorkerPool() as pool:
        pool.start(len(to_run))
        for name, settings in cells.items():
            path = cell_path(out_dir, name)
            if name in reused:
                on_event(name, {"phase": "done (resumed)"})
                results.append(json.loads(path.read_text()))
                manifest.finished(name, settings.mode, results[-1], path, None, resumed=True)
                continue
            events = lambda event, name=name: on_event(name, event)  # noqa: E731
            start = manifest.started(name, settings.mode)
            cells_after = len(to_run) - to_run.index(name) - 1
            results.append(run_cell_process(settings, path, events, cell_path(out_dir, name, ".log"), pool,
                                            payload, cells_after))
            manifest.finished(name, settings.mode, results[-1], path, start)
    manifest.close()
    return results


def run_sweep(
    base: CellSettings,
    modes: list[Mode],
    out_dir: Path,
    *,
    resume: bool = False,
    on_event: Callable[[Mode, dict], None] = lambda mode, event: None,
    inputs: CellInputs | None = None,
    command: list[str] | None = None,
) -> list[dict]:
    """``run_cells`` of ``base`` in each mode, named by mode: ``out_dir/<mode>.json``. ``inputs``: the data
    every cell shares (``cell.prepare_inputs(base)``)."""
    by_name = {mode.name: mode for mode in modes}
    cells = {mode.name: dataclasses.replace(base, mode=mode.name) for mode in modes}
    return run_cells(cells, out_dir, resume=resume, on_event=lambda name, event: on_event(by_name[name], event),
                     inputs=inputs, command=command)
