"""Run cells for several modes, each in a fresh Python process, writing each result as it finishes.

A fresh process per cell keeps one mode's CUDA allocator state (and any crash or out-of-memory) out of the
next mode's figures. Results land atomically, one file per mode, so an interrupted sweep keeps everything that
finished and ``resume=True`` skips those cells on the next run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from qlora_core.cell import PROGRESS_MARK, CellSettings, failure_result
from qlora_core.modes import Mode
from qlora_core.results import write_json_atomic


def result_path(out_dir: Path, mode: Mode) -> Path:
    return out_dir / f"{mode.name}.json"


def finished(path: Path) -> bool:
    """True when ``path`` holds a completed cell (status ok): a resumed sweep skips it."""
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("status") == "ok"


def run_cell_process(settings: CellSettings, path: Path, on_event: Callable[[dict], None], log: Path) -> dict:
    """Run one cell in a child process and move its result to ``path``; if the child died without writing
    one (a segfault, a kill), a ``crashed`` result that names the log takes its place."""
    staging = path.with_name(f".{path.name}.running")
    staging.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(settings.describe(), handle)
    with open(log, "w") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "qlora_core.cell", handle.name, str(staging)],
            stdout=subprocess.PIPE, stderr=log_file, text=True,
        )
        for line in child.stdout:
            if line.startswith(PROGRESS_MARK):
                on_event(json.loads(line.removeprefix(PROGRESS_MARK)))
        returncode = child.wait()
    Path(handle.name).unlink()
    if staging.is_file():
        os.replace(staging, path)
    else:
        error = RuntimeError(f"cell process exited with {returncode} and wrote no result; its log: {log}")
        write_json_atomic(failure_result(settings, "crashed", error), path)
    return json.loads(path.read_text())


def run_sweep(
    base: CellSettings,
    modes: list[Mode],
    out_dir: Path,
    *,
    resume: bool = False,
    on_event: Callable[[Mode, dict], None] = lambda mode, event: None,
) -> list[dict]:
    """Measure ``base`` in each mode; results go to ``out_dir/<mode>.json`` (logs beside them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in modes:
        path = result_path(out_dir, mode)
        if resume and finished(path):
            on_event(mode, {"phase": "done (resumed)"})
        else:
            settings = dataclasses.replace(base, mode=mode.name)
            run_cell_process(settings, path, lambda event: on_event(mode, event), out_dir / f"{mode.name}.log")
        results.append(json.loads(path.read_text()))
    return results
