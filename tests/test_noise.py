"""Library noise: the "pip install kernels" hint dropped, repeated warnings shown once and counted."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

import pytest

from qlora_core import noise
from qlora_core.noise import KERNELS_LOGGER, count_repeats, warning_counts

CAST = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"


@pytest.fixture
def counting(monkeypatch):
    """``count_repeats`` into a buffer with a fresh counter; logging and warnings restored afterwards."""
    monkeypatch.setattr(noise, "COUNTER", noise.RepeatCounter())
    stream = io.StringIO()
    with warnings.catch_warnings():  # restores the filters and showwarning count_repeats replaces
        handler = count_repeats(stream)
        yield stream
    logging.getLogger().removeHandler(handler)


def test_a_repeated_log_warning_is_shown_once_and_counted(counting):
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    for _ in range(5):
        logger.warning(CAST, "torch.bfloat16")
    logger.warning("something else")
    shown = counting.getvalue()
    assert shown.count("inputs will be cast") == 1 and "something else" in shown
    assert warning_counts() == {
        "bitsandbytes.autograd._functions: " + CAST % "torch.bfloat16": 5,
        "bitsandbytes.autograd._functions: something else": 1,
    }


def test_a_repeated_python_warning_is_shown_once_and_counted(monkeypatch):
    monkeypatch.setattr(noise, "COUNTER", noise.RepeatCounter())
    with warnings.catch_warnings(record=True) as shown:  # what would be printed lands in ``shown``
        handler = count_repeats(io.StringIO())
        for _ in range(3):  # one code line: Python's default filter would count it once
            warnings.warn("slow path", UserWarning)
    logging.getLogger().removeHandler(handler)
    assert [str(w.message) for w in shown] == ["slow path"]
    assert warning_counts() == {"UserWarning: slow path": 3}


def test_importing_bitsandbytes_prints_no_kernels_hint():
    """On CPUs with AVX512-BF16 bitsandbytes logs it at import when the optional kernels package is absent."""
    code = "import qlora_core, bitsandbytes, logging; logging.getLogger('%s').warning('kept')" % KERNELS_LOGGER
    error = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "pip install kernels" not in error
    assert "kept" in error  # the logger's other messages still pass
