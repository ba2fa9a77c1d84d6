"""Wall time of GPU work, synchronized, and the statistics reported for it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: A timing whose interquartile range exceeds this fraction of its median is flagged as too noisy to rank.
NOISY_RELATIVE_IQR = 0.05


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU kernels: without it a timer measures only the launch of asynchronous work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run ``fn`` and return its result and its wall time in seconds, synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def device_state(device: torch.device) -> dict | None:
    """The GPU's SM clock (MHz), temperature (deg C) and power draw (W) as NVML last sampled them (every 1/6 to
    1 s): a step that slows down as its clock falls was throttled, not slowed by the mode. None off CUDA or
    where NVML (the ``nvidia-ml-py`` package) is missing."""
    if device.type != "cuda":
        return None
    try:
        return {
            "sm_clock_mhz": torch.cuda.clock_rate(device),
            "temperature_c": torch.cuda.temperature(device),
            "power_w": torch.cuda.power_draw(device) / 1e3,  # NVML reports milliwatts
        }
    except ImportError:  # nvidia-ml-py absent
        return None
    except Exception as error:  # pynvml.NVMLError: NVML present but not answering. A reading, not a reason to fail
        if type(error).__module__.startswith("pynvml"):
            return None
        raise


def cuda_mallocs(device: torch.device) -> int | None:
    """How many times so far the caching allocator asked the driver for memory on ``device`` (cudaMalloc, which
    synchronizes the device: a step that needs it is slower than one the cache serves). None off CUDA."""
    return torch.cuda.memory_stats(device).get("num_device_alloc", 0) if device.type == "cuda" else None


def timing_stats(seconds: list[float], warmup: int) -> dict:
    """Summary of step times with the first ``warmup`` dropped (allocator growth, kernel autotuning).

    Returns seconds: ``median_s``, ``mean_s``, ``stdev_s``, ``min_s``, ``max_s``, ``iqr_s``; ``rounds``, ``warmup``,
    and ``noisy`` when the spread is too large for a ranking to mean anything.
    """
    measured = seconds[warmup:]
    if not measured:
        raise ValueError(f"{len(seconds)} timed steps leave none after {warmup} warm-up steps")
    quartiles = statistics.quantiles(measured, n=4) if len(measured) > 1 else [measured[0]] * 3
    median = statistics.median(measured)
    iqr = quartiles[2] - quartiles[0]
    return {
        "median_s": median,
        "mean_s": statistics.fmean(measured),
        "stdev_s": statistics.stdev(measured) if len(measured) > 1 else 0.0,
        "min_s": min(measured),
        "max_s": max(measured),
        "iqr_s": iqr,
        "rounds": len(measured),
        "warmup": warmup,
        "noisy": iqr > NOISY_RELATIVE_IQR * median,
    }


def cpu_matmul_slowdown(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
    """How many times longer a ``size`` x ``size`` matmul takes on this CPU in ``dtype`` than in float32 (best of
    ``repeats`` each). CPUs without bf16 instructions (AVX2 only) emulate it: ~60x on a 2-core AMD EPYC here."""
    def best(tensor_dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(tensor_dtype)
        return min(timed(lambda: a @ a, torch.device("cpu"))[1] for _ in range(repeats))

    return best(dtype) / best(torch.float32)
