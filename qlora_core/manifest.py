"""The run manifest: ``run.json`` in every run folder says how the run was made and how its time was spent.

It holds the command line, the commit and environment, start and end time, wall seconds, and each cell with
its status, result file and seconds; rewritten atomically as each cell starts and finishes, so an interrupted
run still says what it got through. *Measured* seconds are those inside a cell's measured phases (load,
evaluations, LoRA set-up, training steps); their share of the run's wall time says how much of a run is
overhead (process start-up, imports, tokenization).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from qlora_core.results import RUN_SCHEMA, environment, write_json_atomic

MANIFEST_NAME = "run.json"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def process_start() -> float:
    """When this process started, as a ``time.perf_counter()`` stamp: a manifest made after start-up (bench/'s,
    made with the first cell) still counts the interpreter's start and the library imports in its wall time.

    Linux: the process's start in clock ticks since boot (/proc/self/stat), against the boot clock (10 ms).
    Elsewhere psutil's create time, whose boot time is in whole seconds."""
    stat = Path("/proc/self/stat")
    if stat.exists() and hasattr(time, "CLOCK_BOOTTIME"):
        # field 22 counted from the end of the command name, which may itself hold spaces
        start_ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    else:
        import psutil

        age = time.time() - psutil.Process().create_time()
    return time.perf_counter() - age


def measured_seconds(result: dict) -> float | None:
    """Seconds a cell spent in measured phases: its phases (load, evaluations, set-up) and its training steps;
    None for a result that ran none (a failure before loading, a prediction that it does not fit)."""
    phases = result.get("phase_seconds")
    if not phases:
        return None
    steps = (result.get("training") or {}).get("step_seconds") or []
    return sum(phases.values()) + sum(steps)


class RunManifest:
    """``run.json`` of one invocation in ``folder``; ``command`` defaults to this process's command line, and
    ``start`` (a ``time.perf_counter()`` stamp) to now: pass the invocation's own start when the manifest is
    made later, so its wall time covers the whole run."""

    def __init__(self, folder: Path, command: list[str] | None = None, start: float | None = None):
        self.path = Path(folder) / MANIFEST_NAME
        self._start = time.perf_counter() if start is None else start
        started = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=time.perf_counter() - self._start)
        env = environment()
        self.data = {
            "schema": RUN_SCHEMA,
            "command": list(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
            "commit": env["commit"],
            "started": started.isoformat(timespec="milliseconds"),
            "ended": None,
            "wall_seconds": None,
            "measured_seconds": None,
            "measured_share": None,
            "environment": env,
            "cells": [],
        }
        self._cells: dict[str, dict] = {}
        self._write()

    def _entry(self, name: str, mode: str) -> dict:
        if name not in self._cells:
            self._cells[name] = {"name": name, "mode": mode, "status": "pending", "result": None,
                                 "resumed": False, "wall_seconds": None, "measured_seconds": None,
                                 "seconds_in": {}}
            self.data["cells"].append(self._cells[name])
        return self._cells[name]

    def started(self, name: str, mode: str) -> float:
        """Mark a cell running; returns a start stamp for ``finished``."""
        self._entry(name, mode)["status"] = "running"
        self._write()
        return time.perf_counter()

    def spent(self, name: str, activity: str, seconds: float) -> None:
        """Add ``seconds`` of a cell's wall time to ``activity`` (a call into its process, as seen from this one,
        or waiting for the process): with the measured seconds it says where a cell's time went. Written with
        the cell's outcome."""
        seconds_in = self._entry(name, "")["seconds_in"]
        seconds_in[activity] = seconds_in.get(activity, 0.0) + seconds

    def finished(self, name: str, mode: str, result: dict, result_path: Path | None, start: float | None,
                 *, resumed: bool = False) -> None:
        """Record a cell's outcome: its status, result file (relative to the run folder), wall seconds of this
        invocation (None when it was resumed from an earlier one) and measured seconds."""
        entry = self._entry(name, mode)
        entry.update(
            status=result["status"],
            result=str(result_path.relative_to(self.path.parent)) if result_path else None,
            resumed=resumed,
            wall_seconds=None if resumed or start is None else time.perf_counter() - start,
            measured_seconds=None if resumed else measured_seconds(result),
        )
        self._write()

    def close(self) -> None:
        """The end of the run: end time, wall seconds and the measured share."""
        wall = time.perf_counter() - self._start
        measured = sum(cell["measured_seconds"] or 0.0 for cell in self.data["cells"])
        self.data.update(ended=_now(), wall_seconds=wall, measured_seconds=measured,
                         measured_share=measured / wall if wall > 0 else None)
        self._write()

    def _write(self) -> None:
        write_json_atomic(self.data, self.path)
