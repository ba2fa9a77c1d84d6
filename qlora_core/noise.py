"""Library noise: a hint that says nothing about the results is dropped; repeated warnings are counted.

bitsandbytes logs "Failed to load CPU gemm_4bit_forward ... pip install kernels" whenever it is imported on a
CPU with AVX512-BF16 and the optional ``kernels`` package is absent (every command, even ``report``); it then
uses its own CPU kernel, which is what the CPU figures measure. Its int8 matmul logs "inputs will be cast from
bfloat16 to float16" on every call (~2,100 lines, 180 KB of log, per CPU cell). In a cell's process each
distinct warning is shown once and every occurrence counted; the counts go into the cell's result.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections import Counter

#: Where bitsandbytes logs the "pip install kernels" hint, and how that line starts.
KERNELS_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HINT = "Failed to load CPU gemm_4bit_forward"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(KERNELS_HINT)


def drop_kernels_hint() -> None:
    """Drop bitsandbytes' "pip install kernels" line (other messages of its logger pass). Must run before
    bitsandbytes is imported: it logs the line at import."""
    logging.getLogger(KERNELS_LOGGER).addFilter(_DropKernelsHint())


class RepeatCounter(logging.Filter):
    """Counts each distinct warning; lets only its first occurrence through."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def first(self, text: str) -> bool:
        """Count ``text``; True the first time it is seen."""
        self.counts[text] += 1
        return self.counts[text] == 1

    def filter(self, record: logging.LogRecord) -> bool:
        return self.first(f"{record.name}: {record.getMessage()}")


#: The counts of this process: a cell's process holds one cell, so they are that cell's.
COUNTER = RepeatCounter()


def count_repeats(stream=None) -> logging.Handler:
    """In a cell's own process: log records (WARNING and above) and Python warnings are written to ``stream``
    (default: stderr, the cell's log) once per distinct message, and every occurrence is counted in
    ``COUNTER``. Returns the logging handler it added to the root logger."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(COUNTER)
    logging.getLogger().addHandler(handler)
    warnings.simplefilter("always")  # count every occurrence; the counter lets only the first be shown
    warnings.showwarning = _show_once(warnings.showwarning, COUNTER.first)
    return handler


def _show_once(show, first):
    """``warnings.showwarning`` that passes a warning to ``show`` only when ``first(its text)`` says so."""

    def show_once(message, category, filename, lineno, file=None, line=None):
        if first(f"{category.__name__}: {message}"):
            show(message, category, filename, lineno, file, line)

    return show_once


@contextlib.contextmanager
def each_warning_once():
    """Within: each distinct Python warning is shown once, which the warnings filters alone cannot do here:
    a library entering ``catch_warnings`` (each training step) resets their once-per-place and once registries,
    and bitsandbytes' int8 matmul warns on every call (40,320 lines in one H200 int8 finetune log). Which
    warnings show is left to the filters; everything is restored on exit."""
    seen: set[str] = set()

    def first(text: str) -> bool:
        new = text not in seen
        seen.add(text)
        return new

    with warnings.catch_warnings():
        warnings.showwarning = _show_once(warnings.showwarning, first)
        yield


def warning_counts() -> dict[str, int]:
    """Each distinct warning of this process -> how many times it occurred."""
    return dict(COUNTER.counts)
