"""A ``Cell`` in a fresh spawned process, its methods called over a pipe.

Each (model, mode) cell gets a new Python process, so CUDA allocator state, cached kernels or a crash in one
mode cannot touch the next one's figures. The child's stderr (library warnings, load bars) goes to a log file;
progress events come back through the pipe while a call runs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from qlora_core.cell import Cell, CellSettings
from qlora_core.modes import MODES, Mode, get_mode, register
from qlora_core.noise import count_repeats, warning_counts


class CellError(RuntimeError):
    """A cell method failed in the worker. ``status`` is ``oom``, ``error`` or ``crashed`` (worker died)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _serve(settings: dict, mode: Mode, conn, log: str | None) -> None:
    """Worker loop: build the Cell lazily, then answer ``(method, args)`` calls until ``None`` arrives.

    ``mode`` travels with the settings because a spawned process imports a fresh registry: a variant the
    parent registered at run time would not be in it.
    """
    import torch

    # Ctrl-C reaches the whole process group: the parent decides what it means and ends this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if mode.name not in MODES:
        register(mode)

    if log:
        with open(log, "a") as handle:  # fd 2 keeps the file open once this handle is closed
            os.dup2(handle.fileno(), sys.stderr.fileno())
    count_repeats()  # after the redirection above: repeated library warnings appear once in the log
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    report = lambda event: conn.send(("event", event))  # noqa: E731
    cell = None
    while (message := conn.recv()) is not None:
        method, args = message
        try:
            cell = cell or Cell(CellSettings.from_dict(settings), report)
            conn.send(("ok", getattr(cell, method)(*args)))
        except torch.cuda.OutOfMemoryError as error:
            conn.send(("oom", f"{type(error).__name__}: {error}"))
        except Exception as error:
            traceback.print_exc()
            conn.send(("error", f"{type(error).__name__}: {error}"))
    for text, count in warning_counts().items():
        if count > 1:
            print(f"(shown once above, occurred {count} times) {text}", file=sys.stderr)


class CellWorker:
    """Context manager holding one cell in a child process; ``call("step")`` runs ``Cell.step`` there."""

    def __init__(self, settings: CellSettings, log: Path | None = None, on_event: Callable[[dict], None] | None = None):
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("spawn")  # fork would inherit the parent's CUDA state
        self.conn, child_conn = context.Pipe()
        self.on_event = on_event or (lambda event: None)
        self.process = context.Process(
            target=_serve,
            args=(settings.describe(), get_mode(settings.mode), child_conn, str(log) if log else None),
            daemon=True,
        )
        self.process.start()
        child_conn.close()

    def call(self, method: str, *args):
        """Run ``Cell.<method>(*args)`` in the worker and return its (picklable) result."""
        try:
            self.conn.send((method, args))
            while True:
                status, value = self.conn.recv()
                if status != "event":
                    break
                self.on_event(value)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join(timeout=5)
            raise CellError("crashed", f"the cell process died (exit code {self.process.exitcode})") from None
        if status != "ok":
            raise CellError(status, value)
        return value

    def close(self, wait: bool = True) -> None:
        """End the worker: ask it to stop and wait for it (up to 60 s), or with ``wait=False`` kill it at once."""
        if wait and self.process.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def __enter__(self) -> CellWorker:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # on an exception (Ctrl-C in the parent) the worker may be mid-call and would not answer: kill it
        self.close(wait=exc_type is None)
