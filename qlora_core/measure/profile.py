"""Where a training step's time goes: ``torch.profiler`` over a few calls, summarised as plain JSON.

The question it answers first is whether a step is bound by the device or by the host: the device's kernel time
per call beside the wall time per call (their ratio is the share of the wall the device was busy), with how many
kernels and host-side operators each call launches. The operators and kernels that take the most time follow,
so a slow or noisy mode can be explained from its result alone. Profiled calls run slower than unprofiled ones
(the profiler records every operator): their times explain, the timed steps measure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from qlora_core.measure.timing import synchronize

#: How many operators (host side) and kernels (device side) a summary lists, the most expensive first.
TOP = 12


def _self_device_us(event) -> float:
    """An event's own device time in microseconds (named ``self_cuda_time_total`` before torch 2.4)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _is_device_event(event) -> bool:
    return event.device_type != torch.autograd.DeviceType.CPU


class Profiling:
    """``torch.profiler`` around calls made elsewhere (a ``Trainer``'s steps): ``start``, the calls, ``stop``.
    Device activity is recorded on CUDA; the wall time runs from after the profiler's own start to before its
    stop, the device synchronized at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.start_s: float | None = None

    def start(self) -> None:
        self.profiler.__enter__()
        synchronize(self.device)
        self.start_s = time.perf_counter()

    def end_recording(self) -> None:
        """Stop recording; ``stop`` also summarises, this alone is for calls that failed."""
        self.profiler.__exit__(None, None, None)

    def stop(self, calls: int) -> tuple[dict, str]:
        """End the profile of ``calls`` calls; returns the summary (``summarize``) and the profiler's own table
        of operators by self host time (for a log)."""
        synchronize(self.device)
        wall_s = time.perf_counter() - self.start_s
        self.end_recording()
        averages = self.profiler.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=2 * TOP)
        return summarize(averages, calls, wall_s, self.device), table


def profile_calls(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[dict, str]:
    """Call ``fn`` ``calls`` times under the profiler (``Profiling``); returns the summary and the table."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    profiling = Profiling(device)
    profiling.start()
    try:
        for _ in range(calls):
            fn()
    except BaseException:
        profiling.end_recording()
        raise
    return profiling.stop(calls)


def summarize(averages, calls: int, wall_s: float, device: torch.device) -> dict:
    """Per call: wall seconds, host operators launched, device kernels launched and their seconds, and the share
    of the wall the device was busy (``None`` on CPU, which has no separate device); then the ``TOP`` host
    operators by self host time and the ``TOP`` kernels by device time (name, calls, milliseconds a call).

    ``averages`` is ``profiler.key_averages()``: one entry per operator or kernel name.
    """
    host = [event for event in averages if not _is_device_event(event)]
    kernels = [event for event in averages if _is_device_event(event)]
    kernel_s = sum(_self_device_us(event) for event in kernels) / 1e6 / calls
    on_device = device.type != "cpu"
    by_host = sorted(host, key=lambda event: -event.self_cpu_time_total)[:TOP]
    by_device = sorted(kernels, key=lambda event: -_self_device_us(event))[:TOP]
    return {
        "calls": calls,
        "wall_s_per_call": wall_s / calls,
        "host_ops_per_call": sum(event.count for event in host) / calls,
        "kernels_per_call": sum(event.count for event in kernels) / calls if on_device else None,
        "kernel_s_per_call": kernel_s if on_device else None,
        "device_busy_share": kernel_s * calls / wall_s if on_device else None,
        "top_host_ops": [{"name": event.key, "calls_per_call": event.count / calls,
                          "self_ms_per_call": event.self_cpu_time_total / 1e3 / calls} for event in by_host],
        "top_kernels": [{"name": event.key, "calls_per_call": event.count / calls,
                         "ms_per_call": _self_device_us(event) / 1e3 / calls} for event in by_device],
    }
