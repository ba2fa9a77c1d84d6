"""Step-time statistics and the synchronized timer."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from qlora_core.measure.timing import (NOISY_RELATIVE_IQR, cpu_matmul_slowdown, cuda_mallocs, device_state, timed,
                                      timing_stats)

CPU = torch.device("cpu")


def test_warmup_is_dropped():
    stats = timing_stats([100.0, 50.0, 1.0, 2.0, 3.0], warmup=2)
    assert stats["rounds"] == 3 and stats["warmup"] == 2
    assert stats["max_s"] == 3.0 and stats["min_s"] == 1.0
    assert stats["mean_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("seconds, median", [([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 2.5), ([7.0], 7.0)])
def test_median(seconds, median):
    stats = timing_stats(seconds, warmup=0)
    assert stats["median_s"] == median
    if len(seconds) > 1:
        assert stats["stdev_s"] == pytest.approx(statistics.stdev(seconds))
    else:
        assert stats["stdev_s"] == 0.0 and stats["iqr_s"] == 0.0


def test_iqr_uses_quartiles():
    seconds = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    q1, _, q3 = statistics.quantiles(seconds, n=4)
    assert timing_stats(seconds, warmup=0)["iqr_s"] == pytest.approx(q3 - q1)


def test_noisy_flag():
    steady = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98]
    assert timing_stats(steady, warmup=0)["noisy"] is False
    spread = [1.0, 1.5, 0.6, 1.2, 0.8, 1.4]
    assert timing_stats(spread, warmup=0)["noisy"] is True


def test_noisy_threshold_is_relative_to_median():
    # quartiles of [a, m, b] (exclusive method) are a and b: IQR = b - a; put it just below / above the limit
    median = 2.0
    for scale, noisy in ((0.9, False), (1.1, True)):
        half = scale * NOISY_RELATIVE_IQR * median / 2
        assert timing_stats([median - half, median, median + half], warmup=0)["noisy"] is noisy
    # the same absolute spread on a 10x larger median is not noisy
    assert timing_stats([20.0 - 0.055, 20.0, 20.0 + 0.055], warmup=0)["noisy"] is False


def test_noisy_warmup_outlier_does_not_count():
    assert timing_stats([10.0, 1.0, 1.0, 1.0], warmup=1)["noisy"] is False
    assert timing_stats([10.0, 1.0, 1.0, 1.0], warmup=0)["noisy"] is True


def test_no_rounds_left():
    with pytest.raises(ValueError, match="leave none"):
        timing_stats([1.0, 2.0], warmup=2)


def test_timed_returns_result_and_duration():
    result, seconds = timed(lambda: sum(range(1000)), CPU)
    assert result == sum(range(1000))
    assert seconds > 0


def test_timed_measures_the_call():
    _, seconds = timed(lambda: time.sleep(0.05), CPU)
    assert 0.05 <= seconds < 1.0


def test_cpu_matmul_slowdown_is_a_finite_ratio():
    for dtype in (torch.float32, torch.bfloat16):
        assert 0 < cpu_matmul_slowdown(dtype, size=64) < float("inf")


def test_device_state_is_none_off_cuda_and_without_nvml(monkeypatch):
    """The GPU's clock, temperature and power are extras: a CPU, a missing nvidia-ml-py or an NVML that does not
    answer gives None, and any other error still surfaces."""
    assert device_state(torch.device("cpu")) is None
    cuda = torch.device("cuda")

    def missing(device=None):
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(torch.cuda, "clock_rate", missing)
    assert device_state(cuda) is None
    nvml_error = type("NVMLError_Unknown", (Exception,), {"__module__": "pynvml"})

    def not_answering(device=None):
        raise nvml_error("Unknown Error")

    monkeypatch.setattr(torch.cuda, "clock_rate", not_answering)
    assert device_state(cuda) is None

    def broken(device=None):
        raise ValueError("a bug")

    monkeypatch.setattr(torch.cuda, "clock_rate", broken)
    with pytest.raises(ValueError, match="a bug"):
        device_state(cuda)


@pytest.mark.gpu
def test_device_state_reads_the_gpu():
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (tools/device/stage-extras.sh stages it)")
    state = device_state(torch.device("cuda"))
    assert 100 <= state["sm_clock_mhz"] <= 5000 and 0 < state["temperature_c"] < 120 and 0 < state["power_w"] < 2000


@pytest.mark.gpu
def test_cuda_mallocs_counts_the_allocators_trips_to_the_driver():
    """A tensor larger than anything cached needs a new segment; freeing and re-making it is served from the cache."""
    assert cuda_mallocs(torch.device("cpu")) is None
    cuda = torch.device("cuda")
    before = cuda_mallocs(cuda)
    block = torch.empty(3 * 2**30 + 12345, dtype=torch.uint8, device=cuda)
    after_first = cuda_mallocs(cuda)
    del block
    block = torch.empty(3 * 2**30 + 12345, dtype=torch.uint8, device=cuda)
    assert after_first == before + 1 and cuda_mallocs(cuda) == after_first
