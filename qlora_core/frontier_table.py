"""The context frontier's table, rendered from ``qlora-bench frontier`` documents and their probe cells only: one
row per frontier (``results.Reading.frontiers``), the prediction beside what its probe cells measured."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qlora_core.frontier_probes import (ABOVE_MARGIN, PROBE_OUTCOMES, PROBES, measured_over_predicted, probe_name,
                                        probe_peak_bytes, probe_predicted_bytes, summarized)
from qlora_core.measure.frontier import ALLOCATOR_HEADROOM, TOKEN_GRANULARITY
from qlora_core.modes import MODES
from qlora_core.report import is_missing, lever_parts, markdown_rows
from qlora_core.result_model import CellResult
from qlora_core.units import GIB, MIB

#: Columns shown: (frame column, header, format); each probe's column shows its tokens, then its status. The
#: first ``NAMING`` name the frontier (they head its column in the terminal).
NAMING = 5
COLUMNS = [
    ("shape", "shape", "{}"),
    ("mode", "mode", "{}"),
    ("path", "path", "{}"),
    ("levers", "levers", "{}"),
    ("capacity_gib", "capacity GiB", "{:g}"),
    ("tokens", "predicted tokens", "{:,d}"),
    ("limited_by", "bound", "{}"),
    ("peak_gib", "predicted peak GiB", "{:.2f}"),
    ("mib_per_token", "predicted MiB/token", "{:.3f}"),
    *((f"{probe}_tokens", f"{probe} probe", "{:,d}") for probe in PROBES),
    ("at_peak_gib", "at probe peak GiB", "{:.2f}"),
    ("at_over_predicted", "at probe peak ÷ predicted", "{:.3f}"),
    ("at_tokens_per_s", "tokens/s at the frontier", "{:,.0f}"),
    ("measured_mib_per_token", "measured MiB/token", "{:.3f}"),
    ("measured_over_predicted", "measured ÷ predicted MiB/token", "{:.3f}"),
    ("confirmed", "confirmed", "{}"),
    ("allocator_conf", "allocator conf", "{}"),
    ("commit", "commit", "{}"),
]
#: Characters of a commit's hash shown (as ``git describe --abbrev=12`` writes it).
COMMIT_CHARS = 12


def _short_commit(commit: str | None) -> str | None:
    if commit is None:
        return None
    dirty = "-dirty" if commit.endswith("-dirty") else ""
    return commit.removesuffix("-dirty")[:COMMIT_CHARS] + dirty


def _allocator_conf(frontier: dict) -> str | None:
    """The CUDA allocator configuration the probes ran under: None when not probed; documents written before
    ``probe_allocator_conf`` existed did not record it."""
    if "probes" not in frontier:
        return None
    if "probe_allocator_conf" not in frontier:
        return "not recorded"
    return frontier["probe_allocator_conf"] or "PyTorch defaults"


def _above_predicted_bytes(frontier: dict) -> float | None:
    """The peak predicted at the above probe's length, by the frontier's cost of one more token (bytes); None
    where either is not recorded."""
    above, slope = frontier["probes"].get("above", {}).get("tokens"), frontier.get("bytes_per_token")
    return None if above is None or slope is None else frontier["peak_bytes"] + slope * (above - frontier["tokens"])


def _confirmed(frontier: dict) -> str:
    """yes, not measured, or no with what the probes found. "above ran within the headroom": the above probe's
    predicted peak fits the capacity itself, short only of the part left to the allocator (``usable_bytes``,
    since 2026-12-03), so its running is what the prediction expects: where the weights take most of the cap or
    the frontier is a few 256-token steps long, that part is worth more tokens than the above probe's margin."""
    if "probes" not in frontier:
        return "not measured"
    if frontier["confirmed"]:
        return "yes"
    at, above = frontier["probes"].get("at", {}), frontier["probes"].get("above", {})
    if at.get("status") != "ok":
        return f"no: at probe {at.get('status', 'not run')}"
    if above.get("status") != "ok":
        return f"no: above probe {above.get('status', 'not run')}"
    predicted = _above_predicted_bytes(frontier)
    if "usable_bytes" in frontier and predicted is not None and predicted <= frontier["capacity_bytes"]:
        return "no: above ran within the headroom"
    return "no: above ran"


def _probe_setup(shape: str, mode: str, path: str, levers: dict, capacity_bytes: int | None, tokens: int) -> tuple:
    """What names one probe's cell among results: its shape, mode, path, levers, memory cap and tokens."""
    return (shape, mode, path, bool(levers.get("offload_activations")), levers.get("offload_host_gib"),
            levers.get("mlp_tile_tokens"), capacity_bytes, tokens)


def probe_cells_by_setup(results: list[CellResult]) -> dict[tuple, CellResult]:
    """The shape cells of batch 1 among ``results`` (a frontier's probes are such cells) by ``_probe_setup``."""
    cells = {}
    for result in results:
        settings = result.settings
        if settings.shape and settings.batch_size == 1:
            extra = settings.extra
            setup = _probe_setup(settings.shape, settings.mode, settings.path, extra, extra.get("memory_cap_bytes"),
                                 settings.seq_len)
            cells[setup] = result
    return cells


def _probe_cell(frontier: dict, probe: str, probe_cells: dict[tuple, CellResult]) -> CellResult | None:
    """The cell of one of the frontier's probes among those read, whatever its status; None if not read."""
    tokens = ((frontier.get("probes") or {}).get(probe) or {}).get("tokens")
    setup = _probe_setup(frontier["shape"], frontier["mode"], frontier["path"], frontier.get("levers") or {},
                         frontier["capacity_bytes"], tokens)
    return probe_cells.get(setup)


def with_later_probes(frontier: dict) -> dict:
    """The frontier with its probes completed from their own cell files in the document's ``probes/`` folder,
    where one of the probe's length is there: a probe its document says was not run, run by a later call (a
    document written before ``--resume`` kept earlier probes, 2026-12-03, does not hold it), and each probe's
    predicted peak, which documents before 2026-12-07 did not record; and what the probes then make of it
    (``frontier_probes.summarized``)."""
    probes = dict(frontier.get("probes") or {})
    folder = Path(frontier["document"]).parent / "probes"
    for probe, entry in probes.items():
        path = folder / f"{probe_name(frontier, probe)}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        if result["settings"]["seq_len"] != entry["tokens"]:
            continue
        if entry["status"] == "not run" and result["status"] in PROBE_OUTCOMES:
            entry = {**entry, "status": result["status"], "peak_bytes": probe_peak_bytes(result)}
        probes[probe] = {**entry, "predicted_bytes": probe_predicted_bytes(result)}
    return frontier if probes == frontier.get("probes", {}) else summarized(frontier, probes)


def _at_probe_figures(frontier: dict, probe_cells: dict[tuple, CellResult]) -> dict:
    """The at probe's measured peak (GiB), its ratio to the predicted peak, and its cell's tokens a second where
    its cell was read beside the frontier (None otherwise): what training at the frontier holds and gets."""
    at = (frontier.get("probes") or {}).get("at") or {}
    peak = at.get("peak_bytes")
    cell = _probe_cell(frontier, "at", probe_cells) if at.get("status") == "ok" else None
    return {
        "at_peak_gib": None if peak is None else peak / GIB,
        "at_over_predicted": None if peak is None else peak / frontier["peak_bytes"],
        "at_tokens_per_s": None if cell is None or cell.training is None else cell.training.tokens_per_s,
    }


def frontier_row(frontier: dict, probe_cells: dict[tuple, CellResult] | None = None) -> dict:
    """One row (plain numbers, units in the keys) from a frontier as ``results.read_paths`` gives it, with its
    probes' cells from ``probe_cells`` (``probe_cells_by_setup``) where read."""
    probe_cells = probe_cells or {}
    frontier = with_later_probes(frontier)
    predicted, measured = frontier["bytes_per_token"], frontier.get("measured_bytes_per_token")
    row = {
        "shape": frontier["shape"],
        "mode": frontier["mode"],
        "path": frontier["path"],
        "levers": ", ".join(lever_parts(frontier)) or None,
        "capacity_gib": frontier["capacity_bytes"] / GIB,
        "tokens": frontier["tokens"],
        "limited_by": frontier["limited_by"],
        "peak_gib": frontier["peak_bytes"] / GIB,
        "mib_per_token": None if predicted is None else predicted / MIB,
    }
    probes = frontier.get("probes") or {}
    for probe in PROBES:
        row[f"{probe}_tokens"] = probes.get(probe, {}).get("tokens")
        row[f"{probe}_status"] = probes.get(probe, {}).get("status")
    return row | _at_probe_figures(frontier, probe_cells) | {
        "measured_mib_per_token": None if measured is None else measured / MIB,
        "measured_over_predicted": measured_over_predicted(frontier),
        "confirmed": _confirmed(frontier),
        "allocator_conf": _allocator_conf(frontier),
        "commit": _short_commit(frontier.get("commit")),
        "document": frontier["document"],
    }


def frontier_frame(frontiers: list[dict], results: list[CellResult] = ()) -> pd.DataFrame:
    """One row per frontier: by shape, modes in registry order, path, levers (none first), then capacity.
    ``results``: cells read beside the frontiers, where their probes' cells are found (``frontier_row``)."""
    order = {name: index for index, name in enumerate(MODES)}
    probe_cells = probe_cells_by_setup(list(results))
    frame = pd.DataFrame([frontier_row(frontier, probe_cells) for frontier in frontiers])
    return frame.sort_values(
        ["shape", "mode", "path", "levers", "capacity_gib"], na_position="first", kind="stable", ignore_index=True,
        key=lambda column: column.map(order) if column.name == "mode" else column)


def _text(row: pd.Series, column: str, fmt: str) -> str:
    value = row.get(column)
    if is_missing(value):
        return "-"
    text = fmt.format(int(value) if fmt == "{:,d}" else value)
    if column.endswith("_tokens") and column != "tokens":
        text += f" {row[column.removesuffix('_tokens') + '_status']}"
    return text


def table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows; '-' where a figure was not recorded (no levers, no probes)."""
    headers = [header for _, header, _ in COLUMNS]
    return headers, [[_text(row, column, fmt) for column, _, fmt in COLUMNS] for _, row in frame.iterrows()]


def notes() -> list[str]:
    """What the columns mean."""
    return [
        f"predicted: the memory floor's (measure.floor) allocated bytes of one training step at batch 1 with "
        f"gradient checkpointing; predicted tokens: the longest sequence, in whole steps of {TOKEN_GRANULARITY} "
        f"tokens, whose predicted peak fits the capacity (less {ALLOCATOR_HEADROOM * 100:g} % of it for the "
        f"allocator's slack, from 2026-12-03: documents with usable_bytes); bound: what held it there (memory, "
        f"the model's positions, or host memory for offloaded activations); predicted MiB/token: what one more "
        f"token costs there. The probes ran under a hard cap of the capacity on the CUDA allocator's reserved "
        f"bytes, so the allocator's slack (reserved beyond allocated) comes on top of the prediction.",
        "probes: cells at batch 1 at half the predicted tokens, at them and above them, each with its status "
        "(ok, oom: out of memory under the cap); measured MiB/token: between the half and the at probe's "
        "allocator peaks, and its ratio to the predicted peaks' slope over the same span (the probes' own "
        "predictions; where none was recorded, the frontier's predicted MiB/token); a probe the frontier's "
        "document says was not run is shown from its own cell in the document's probes/ folder where a later "
        "call ran it; at probe peak: its allocator's peak (allocated, growth since its load began) and its ratio "
        "to the predicted peak; tokens/s at the frontier: the at probe's step (its cell's row above; '-' where "
        "its cell was not read with the frontier).",
        f"confirmed: the at probe ran and the above probe ran out of memory (bound by positions or host memory: "
        f"the at probe ran); not measured: no probes; no, with what the probes found; 'above ran within the "
        f"headroom': the above probe's predicted peak fits the capacity, short only of the "
        f"{ALLOCATOR_HEADROOM * 100:g} % left to the allocator, so the peak's prediction held and the frontier lies "
        f"beyond the above probe (where the weights take most of the capacity or the frontier is a few "
        f"{TOKEN_GRANULARITY}-token steps long, that part is worth more tokens than the above probe's margin). "
        f"Older documents ran the above probe one "
        f"{TOKEN_GRANULARITY}-token step above the prediction, newer ones {ABOVE_MARGIN * 100:g} % above: its tokens are "
        f"shown.",
        "levers: the lean path's memory levers (offload: activations to pinned host memory; MLP tiles: each MLP "
        "run over the sequence in tiles of so many tokens); '-': none.",
    ]


def markdown(frame: pd.DataFrame, plot_png: str | None = None) -> str:
    """The table, its plot (``plot_png``, a file beside the Markdown) and its notes as Markdown."""
    picture = ["", f"![context frontier]({plot_png})"] if plot_png else []
    return "\n".join([*markdown_rows(*table_rows(frame)), *picture, "",
                      *(f"- {note}" for note in notes())]) + "\n"


def rich_table(frame: pd.DataFrame):
    """The terminal rendering, transposed so several frontiers fit 80 columns (a column per frontier, a row per
    figure), then the notes."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    headers, rows = table_rows(frame)
    table = Table(title="context frontier", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("figure")
    for row in rows:
        *naming, capacity = row[:NAMING]
        table.add_column("\n".join([*(text for text in naming if text != "-"), f"{capacity} GiB"]), justify="right")
    for index, header in enumerate(headers[NAMING:], start=NAMING):
        table.add_row(header, *(row[index] for row in rows))
    return Group(table, Text("\n".join(notes())))
