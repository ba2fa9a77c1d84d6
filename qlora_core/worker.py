"""A ``Cell`` in a fresh spawned process, its methods called over a pipe, and a pool that starts the next
process while the current cell finishes.

Each (model, mode) cell gets a new Python process, so CUDA allocator state, cached kernels or a crash in one
mode cannot touch the next one's figures. A process is spawned *unbound*: it imports torch, transformers, peft
and bitsandbytes (seconds of start-up) and waits; ``WorkerPool`` spawns the first ones together before the first
cell and the next ones while a cell evaluates or after its timed steps, so a sweep pays that start-up once instead
of once per cell. Binding sends the cell's settings and its already tokenized inputs; only then does the process
touch the GPU. The child's stderr (library warnings, load bars) goes to the cell's log file; progress events come
back through the pipe.
"""

from __future__ import annotations

import collections
import io
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from qlora_core.cell import PHASES_TO_START_PROCESSES_IN, Cell, CellInputs, CellSettings
from qlora_core.modes import MODES, get_mode, register
from qlora_core.noise import count_repeats, warning_counts


class CellError(RuntimeError):
    """A cell method failed in the worker. ``status`` is ``oom``, ``error`` or ``crashed`` (worker died)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _import_libraries() -> None:
    """What every cell needs, imported before the process is bound: the seconds a new process spends here are
    spent while the previous cell is still evaluating."""
    import importlib

    import peft  # noqa: F401
    import transformers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    from qlora_core.backends import BACKENDS

    for backend in BACKENDS.values():
        try:
            importlib.import_module(backend.package)
        except ImportError:  # a mode that needs it is refused with its own message (backends.require)
            pass


def _bind(message: tuple, report) -> Cell:
    """Build the cell from the bind message: settings, mode (a spawned process has a fresh registry, so a variant
    the parent registered at run time travels with it), log path and the serialized inputs."""
    import torch

    _, settings, mode, log, inputs = message
    if mode.name not in MODES:
        register(mode)
    if log:
        with open(log, "a") as handle:  # fd 2 keeps the file open once this handle is closed
            os.dup2(handle.fileno(), sys.stderr.fileno())
    count_repeats()  # after the redirection above: repeated library warnings appear once in the log
    loaded = torch.load(io.BytesIO(inputs), weights_only=False) if inputs else None
    return Cell(CellSettings.from_dict(settings), report, inputs=loaded)


def _serve(conn) -> None:
    """Worker loop: import, wait for the bind message, then answer ``(method, args)`` calls until ``None``."""
    # Ctrl-C reaches the whole process group: the parent decides what it means and ends this process itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    import tqdm

    # progress bars lock with a thread lock: tqdm's default also makes a multiprocessing semaphore, which this
    # process, killed once its cell is done (CellWorker.close), could not unregister, and the parent's resource
    # tracker would warn about it at exit
    tqdm.tqdm.set_lock(threading.RLock())
    _import_libraries()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    report = lambda event: conn.send(("event", event))  # noqa: E731
    cell = None
    while (message := conn.recv()) is not None:
        try:
            if message[0] == "bind":
                cell = _bind(message, report)
                conn.send(("ok", None))
                continue
            method, args = message
            conn.send(("ok", getattr(cell, method)(*args)))
        except torch.cuda.OutOfMemoryError as error:
            conn.send(("oom", f"{type(error).__name__}: {error}"))
        except Exception as error:
            traceback.print_exc()
            conn.send(("error", f"{type(error).__name__}: {error}"))
    for text, count in warning_counts().items():
        if count > 1:
            print(f"(shown once above, occurred {count} times) {text}", file=sys.stderr)
    sys.stderr.flush()
    conn.send(("ok", None))  # the log is complete: the parent ends this process without waiting for its exit


def serialize_inputs(inputs: CellInputs | None) -> bytes | None:
    """``inputs`` as bytes for the bind message (tokenized once in the parent, not once per cell)."""
    import torch

    if inputs is None:
        return None
    buffer = io.BytesIO()
    torch.save(inputs, buffer)
    return buffer.getvalue()


class CellWorker:
    """Context manager holding one cell in a child process; ``call("step")`` runs ``Cell.step`` there.

    ``CellWorker()`` spawns an unbound process at once; ``bind`` gives it its cell.
    """

    def __init__(self):
        context = multiprocessing.get_context("spawn")  # fork would inherit the parent's CUDA state
        self.conn, child_conn = context.Pipe()
        self.on_event: Callable[[dict], None] = lambda event: None
        self.process = context.Process(target=_serve, args=(child_conn,), daemon=True)
        self.process.start()
        child_conn.close()

    def bind(self, settings: CellSettings, *, log: Path | None = None, on_event=None,
             inputs: bytes | None = None) -> CellWorker:
        """Give the process its cell: settings, log file, progress callback and serialized inputs (``None``:
        the cell tokenizes its own)."""
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda event: None)
        message = ("bind", settings.describe(), get_mode(settings.mode), str(log) if log else None, inputs)
        self._request(message)
        return self

    def call(self, method: str, *args):
        """Run ``Cell.<method>(*args)`` in the worker and return its (picklable) result."""
        return self._request((method, args))

    def _request(self, message: tuple):
        try:
            self.conn.send(message)
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
        """End the worker. With ``wait``, ask it to stop and wait (up to 60 s) until its log is complete; then
        kill it: the interpreter's own exit with torch and CUDA loaded takes seconds and keeps nothing."""
        if wait and self.process.is_alive():
            try:
                self.conn.send(None)
                if self.conn.poll(60):
                    self.conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
        if self.process.is_alive():
            self.process.kill()
        self.process.join()  # its GPU memory is released once it is reaped
        self.conn.close()

    def __enter__(self) -> CellWorker:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # on an exception (Ctrl-C in the parent) the worker may be mid-call and would not answer: kill it
        self.close(wait=exc_type is None)


#: How many cells ahead the pool keeps processes starting once cells run. On the H200 a process importing beside a
#: running SmolLM2 cell was still not ready when that cell ended (up to 2.6 s waited at 620b2db): two cells give
#: it time.
LOOKAHEAD = 2
#: At most this many processes start together before the first cell (``WorkerPool.start``).
MAX_STARTED_AT_ONCE = 8


def processes_to_start_first(cells: int) -> int:
    """How many of ``cells`` get their process before the first cell runs: one per spare core (half the host's,
    the rest left to the parent and the running cell), at least ``LOOKAHEAD``, at most ``MAX_STARTED_AT_ONCE``.

    A process spends its start-up importing on one core (17 s on the H200 host, where the parent also compiled
    1,607 modules from source, 3.6 s: the image keeps no bytecode for them), longer than any quiet phase of a
    SmolLM2 cell (~20 s a cell): started during a cell, its import ran on beside the next cell's load and made it
    2-4x slower (2026-12-02 pair). Started together before the first cell, they import while pytest collects and the parent tokenizes,
    and none imports beside a measured phase of a run of up to this many cells."""
    spare_cores = (os.cpu_count() or 1) // 2
    return min(cells, MAX_STARTED_AT_ONCE, max(LOOKAHEAD, spare_cores))


class WorkerPool:
    """Hands out fresh worker processes, each used for one cell only, and starts those of the next cells ahead
    of time. Context manager: spares left at the end are stopped."""

    def __init__(self):
        self.spares: collections.deque[CellWorker] = collections.deque()

    def start(self, cells: int) -> None:
        """Before the first of ``cells`` cells: start the processes of as many as the host can import at once
        (``processes_to_start_first``)."""
        self._start_up_to(processes_to_start_first(cells))

    def prepare(self, cells: int) -> None:
        """Have processes starting for the next ``cells`` cells (at most ``LOOKAHEAD``), their imports
        overlapping the current cell's work."""
        self._start_up_to(min(cells, LOOKAHEAD))

    def _start_up_to(self, count: int) -> None:
        while len(self.spares) < count:
            self.spares.append(CellWorker())

    def take(self, settings: CellSettings, *, log: Path | None = None, on_event=None,
             inputs: bytes | None = None, cells_after: int = 0) -> CellWorker:
        """A fresh process bound to this cell: the oldest spare, else a new one. With ``cells_after`` cells
        still to run after this one, their processes are started at the cell's first phase that nothing
        measured runs beside (``cell.PHASES_TO_START_PROCESSES_IN``: its first evaluation, else the end of its
        timed steps)."""
        worker = self.spares.popleft() if self.spares else CellWorker()
        if cells_after:
            on_event = self._preparing_when_quiet(on_event, cells_after)
        try:
            return worker.bind(settings, log=log, on_event=on_event, inputs=inputs)
        except BaseException:
            worker.close(wait=False)  # a failed or interrupted bind leaves a process no cell can use
            raise

    def _preparing_when_quiet(self, on_event, cells: int):
        """``on_event`` that also starts the next ``cells`` cells' processes (``prepare``) once the cell reaches a
        phase that a process starting beside cannot disturb."""

        def handle(event: dict) -> None:
            if event.get("phase") in PHASES_TO_START_PROCESSES_IN:
                self.prepare(cells)
            if on_event is not None:
                on_event(event)

        return handle

    def close(self) -> None:
        while self.spares:  # an unbound spare waits for its bind message: killing it loses nothing
            self.spares.popleft().close(wait=False)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
