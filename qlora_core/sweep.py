"""Run cells for several modes, each in a fresh Python process, writing each result as it finishes.

A fresh process per cell keeps one mode's CUDA allocator state (and any crash or out-of-memory) out of the
next mode's figures. Results land atomically, one file per mode, so an interrupted sweep keeps everything that
finished and ``resume=True`` skips those cells on the next run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from qlora_core.cell import CellSettings, failure_result
from qlora_core.modes import Mode
from qlora_core.results import write_json_atomic
from qlora_core.worker import CellError, CellWorker


def result_path(out_dir: Path, mode: Mode) -> Path:
    return out_dir / f"{mode.name}.json"


class ResumeMismatchError(ValueError):
    """A finished result to resume from was measured with other settings than the run being resumed."""


def finished(path: Path) -> bool:
    """True when ``path`` holds a completed cell (status ok)."""
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("status") == "ok"


def _differences(old, new, key: str = "") -> list[str]:
    """Dotted keys where two settings trees differ, as ``"key: old -> new"``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for name in sorted(old.keys() | new.keys())
                for line in _differences(old.get(name), new.get(name), f"{key}.{name}" if key else name)]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def reusable(path: Path, settings: CellSettings) -> bool:
    """True when ``path`` holds a finished cell measured with ``settings``: a resumed run keeps it. False when
    there is no finished cell (it runs again).

    Raises ``ResumeMismatchError`` naming each differing setting (dotted key, old -> new) when the finished cell
    was measured with other settings: reusing it would mix two set-ups in one table.
    """
    if not finished(path):
        return False
    # a JSON round trip makes tuples lists, as they are in the file
    old, new = json.loads(path.read_text())["settings"], json.loads(json.dumps(settings.describe()))
    if differences := _differences(old, new):
        raise ResumeMismatchError(f"{path} was measured with other settings ({'; '.join(differences)}); "
                                  f"resume with the same options or choose another --out")
    return True


def run_cell_process(settings: CellSettings, path: Path, on_event: Callable[[dict], None], log: Path) -> dict:
    """Run one cell in a fresh worker process and write its result to ``path`` atomically; a failure (out of
    memory, an exception, a dead worker) becomes that cell's result rather than the sweep's end."""
    try:
        with CellWorker(settings, log=log, on_event=on_event) as worker:
            result = worker.call("run_all")
    except CellError as error:
        result = failure_result(settings, error.status, f"{error} (log: {log})")
    write_json_atomic(result, path)
    return result


def run_sweep(
    base: CellSettings,
    modes: list[Mode],
    out_dir: Path,
    *,
    resume: bool = False,
    on_event: Callable[[Mode, dict], None] = lambda mode, event: None,
) -> list[dict]:
    """Measure ``base`` in each mode; results go to ``out_dir/<mode>.json`` (logs beside them).

    With ``resume``, finished cells measured with the same settings are kept; one measured with other settings
    raises ``ResumeMismatchError`` before any cell runs.
    """
    # every mode checked before the first cell runs, so a mismatch costs no measurement
    reused = {mode.name for mode in modes
              if resume and reusable(result_path(out_dir, mode), dataclasses.replace(base, mode=mode.name))}
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in modes:
        path = result_path(out_dir, mode)
        if mode.name in reused:
            on_event(mode, {"phase": "done (resumed)"})
            results.append(json.loads(path.read_text()))
            continue
        settings = dataclasses.replace(base, mode=mode.name)
        log = out_dir / f"{mode.name}.log"
        results.append(run_cell_process(settings, path, lambda event: on_event(mode, event), log))
    return results
