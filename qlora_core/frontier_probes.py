"""Probe cells that check a predicted context frontier (``measure.frontier``) on the device.

Each frontier gets three cells of the shape at batch 1 under the frontier's memory cap: at the predicted
length (it should run), ``ABOVE_MARGIN`` above it (it should run out of memory: then the real frontier lies
within that margin of the prediction) and at half the length, whose peak with the first one's gives the memory
one more token costs, measured. One training step each, with the optimizer's state made before it
(``TrainSettings.optimizer_state_upfront``), so that one step holds everything a later step would: a step at the
80 GiB frontier of an 8B model takes minutes, and a probe must fit a lent machine's command limit.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from qlora_core.cell import CellSettings
from qlora_core.levers import Levers
from qlora_core.measure.frontier import TOKEN_GRANULARITY
from qlora_core.sweep import ResumeMismatchError, cell_path, reusable
from qlora_core.trainer import TrainSettings
from qlora_core.units import GIB

#: How far above the predicted frontier the ``above`` probe runs: issue 13's target for the prediction (within
#: 5 %). Frontiers measured before 2026-12-03's second run probed one ``TOKEN_GRANULARITY`` step above, which
#: tested a precision no memory model has (their probes record the lengths run).
ABOVE_MARGIN = 0.05


def _above(tokens: int) -> int:
    return math.ceil(tokens * (1 + ABOVE_MARGIN) / TOKEN_GRANULARITY) * TOKEN_GRANULARITY


#: The probes of one frontier, each with the sequence length it runs at.
PROBES = {
    "half": lambda tokens: max(TOKEN_GRANULARITY, tokens // 2 // TOKEN_GRANULARITY * TOKEN_GRANULARITY),
    "at": lambda tokens: tokens,
    "above": _above,
}


def frontier_levers(frontier: dict) -> Levers:
    """The levers a frontier was predicted with (none for one saved before they existed)."""
    return Levers(**frontier.get("levers", {}))


def probe_name(frontier: dict, probe: str) -> str:
    """``<shape>-<mode>-<path><levers>-<capacity>gib-<probe>``: the probe cell's result file stem (``Levers.label``:
    empty when none is pulled)."""
    gib = frontier["capacity_bytes"] / GIB
    levers = frontier_levers(frontier).label()
    return f"{frontier['shape']}-{frontier['mode']}-{frontier['path']}{levers}-{gib:g}gib-{probe}"


def check_probes(names: list[str]) -> list[str]:
    """``names`` if each names a probe of ``PROBES`` (and there is at least one), else ValueError."""
    unknown = [name for name in names if name not in PROBES]
    if unknown or not names:
        raise ValueError(f"unknown probes {unknown or names}; choose from {', '.join(PROBES)}")
    return names


def probe_cells(frontier: dict, lora, device: str = "cuda", probes=tuple(PROBES),
                trace_memory: bool = False) -> dict[str, CellSettings]:
    """The named probe cells of one predicted frontier, of the ``probes`` asked for; none for a frontier of 0
    tokens (nothing fits), no ``above`` probe where the model's positions, not memory, bound it.
    ``trace_memory``: each records what is alive at its step's peak (``CellSettings.trace_memory``)."""
    if not frontier["tokens"]:
        return {}
    train = TrainSettings(max_steps=1, optimizer_state_upfront=True)
    base = CellSettings(mode=frontier["mode"], shape=frontier["shape"], path=frontier["path"], batch_size=1,
                        timing_warmup=0, train=train, lora=lora, device=device,
                        memory_cap_bytes=frontier["capacity_bytes"], **frontier_levers(frontier).describe(),
                        beyond_positions=frontier.get("beyond_positions", False), trace_memory=trace_memory)
    return {probe_name(frontier, probe): dataclasses.replace(base, seq_len=PROBES[probe](frontier["tokens"]))
            for probe in check_probes(list(probes)) if probe != "above" or frontier["limited_by"] == "memory"}


#: What a probe finds, either way a result a resumed frontier keeps: the length trained, or it ran out of memory.
PROBE_OUTCOMES = ("ok", "oom")


def finished_probes(frontiers: list[dict], lora, out_dir: Path, device: str = "cuda",
                    trace_memory: bool = False) -> dict[str, dict]:
    """Results of the probe cells of ``frontiers`` that an earlier call finished (``PROBE_OUTCOMES``) in
    ``out_dir`` with the settings they have now, by cell name: a frontier is measured one probe at a time
    (``--probes at``, then ``--probes above --resume``), and its document holds them all. A cell of the same
    name measured with other settings (a frontier predicted since at another length) is another frontier's
    probe, left out."""
    found = {}
    for frontier in frontiers:
        for name, cell in probe_cells(frontier, lora, device, trace_memory=trace_memory).items():
            path = cell_path(out_dir, name)
            try:
                if reusable(path, cell, PROBE_OUTCOMES):
                    found[name] = json.loads(path.read_text())
            except ResumeMismatchError:
                continue
    return found


def probe_peak_bytes(result: dict | None) -> int | None:
    """The training peak the CUDA allocator measured for a probe (growth since its load began), or None: not
    run, failed, or run where the allocator is not read."""
    row = ((result or {}).get("predicted_vs_measured") or {}).get("training_peak") or {}
    return row.get("measured_bytes")


def probe_predicted_bytes(result: dict | None) -> int | None:
    """The training peak the memory floor predicted for a probe's own length and settings, or None where its cell
    has no floor (not run, failed before its prediction)."""
    row = ((result or {}).get("predicted_vs_measured") or {}).get("training_peak") or {}
    return row.get("predicted_bytes")


def measured_over_predicted(frontier: dict) -> float | None:
    """The measured cost of a token ÷ the prediction's over the same span (``summarized``); where the probes
    recorded no predicted peaks (documents before 2026-12-07 read without their cells), ÷ the frontier's own
    ``bytes_per_token``. None where nothing was measured."""
    measured = frontier.get("measured_bytes_per_token")
    predicted = frontier.get("predicted_span_bytes_per_token") or frontier["bytes_per_token"]
    return None if measured is None or not predicted else measured / predicted


def with_probes(frontier: dict, results: dict[str, dict]) -> dict:
    """The frontier with what its probes measured (``results`` by cell name): each probe's tokens, status and
    peak allocated bytes and the peak its cell predicted; ``measured_bytes_per_token`` between the half and the at
    probe, and ``predicted_span_bytes_per_token``, the same span's as predicted; ``confirmed`` when the at probe
    ran and the above probe ran out of memory (or, bound by positions or host memory, the at probe ran)."""
    probes = {}
    for probe, length in PROBES.items():
        result = results.get(probe_name(frontier, probe))
        probes[probe] = {"tokens": length(frontier["tokens"]),
                         "status": result["status"] if result else "not run",
                         "peak_bytes": probe_peak_bytes(result),
                         "predicted_bytes": probe_predicted_bytes(result)}
    return summarized(frontier, probes)


def _slope(half: dict, at: dict, key: str) -> float | None:
    """Bytes a token between the half and the at probe's ``key`` bytes; None where either is missing."""
    if half.get(key) is None or at.get(key) is None or at["tokens"] <= half["tokens"]:
        return None
    return (at[key] - half[key]) / (at["tokens"] - half["tokens"])


def summarized(frontier: dict, probes: dict[str, dict]) -> dict:
    """The frontier with ``probes`` (by probe: tokens, status, peak bytes, predicted peak bytes) and what they make
    of it (see ``with_probes``). The measured slope is compared with the prediction's over the same span, not with
    the frontier's own cost of a token (``bytes_per_token``): the two differ where the cost changes between the
    probes, e.g. once offloaded activations outgrow the host's share and the rest stay on the GPU."""
    half, at = probes["half"], probes["at"]
    above_failed = probes["above"]["status"] == "oom" or frontier["limited_by"] != "memory"
    confirmed = at["status"] == "ok" and above_failed
    return {**frontier, "probes": probes, "measured_bytes_per_token": _slope(half, at, "peak_bytes"),
            "predicted_span_bytes_per_token": _slope(half, at, "predicted_bytes"), "confirmed": confirmed}
