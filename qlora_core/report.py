"""Tables and plots, rendered from result JSON only.

``results_frame`` flattens cell results into one row per (model, mode) with units in the column names; every
renderer (rich, Markdown, CSV, PNG) starts from that frame, so the figures agree across formats. Ratios are
to the baseline mode (``BASELINE_MODE``) of the same model and run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from qlora_core.measure.memory import GIB
from qlora_core.modes import BASELINE_MODE, MODES

MIB = 2**20

#: Columns shown in tables: (frame column, header, format). Ratio columns are added beside the starred ones.
COLUMNS = [
    ("weights_mib", "weights MiB", "{:.1f}"),
    ("bits_per_param", "bits/param", "{:.3f}"),
    ("quant_error", "weight err", "{:.2%}"),
    ("peak_gib", "peak GiB", "{:.2f}"),
    ("step_ms", "step ms", "{:.0f}"),
    ("step_iqr_ms", "± IQR ms", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("ppl_heldout_before", "ppl quotes before", "{:.2f}"),
    ("ppl_heldout_after", "ppl quotes after", "{:.2f}"),
    ("ppl_eval_text_before", "ppl eval-text before", "{:.2f}"),
    ("ppl_eval_text_after", "ppl eval-text after", "{:.2f}"),
]
#: Columns also shown as a ratio to the baseline mode.
RATIO_COLUMNS = ("weights_mib", "peak_gib", "step_ms", "ppl_heldout_after", "ppl_eval_text_after")


def _peak_bytes(memory: dict) -> int | None:
    peak = memory.get("training_peak", {})
    return peak.get("peak_allocated_bytes", peak.get("peak_rss_bytes"))


def _ppl(result: dict, when: str, name: str) -> float | None:
    entry = result.get("perplexity", {}).get(when, {}).get(name)
    return entry["perplexity"] if entry else None


def result_row(result: dict) -> dict:
    """One table row (plain numbers, units in the keys) from one cell result."""
    row = {
        "model": result.get("model", {}).get("label", result["settings"].get("model") or "smollm2"),
        "mode": result["mode"]["name"],
        "status": result["status"],
        "device": result.get("device"),
    }
    if result["status"] != "ok":
        return {**row, "error": result.get("error")}
    training = result["training"]
    peak = _peak_bytes(result["memory"])
    return {
        **row,
        "memory_kind": result["memory"]["training_peak"]["kind"],
        "weights_mib": result["weights"]["weights_bytes"] / MIB,
        "bits_per_param": result["weights"]["bits_per_quantized_param"],
        "quant_error": (result.get("quant_error") or {}).get("relative_l2"),
        "peak_gib": peak / GIB if peak is not None else None,
        "step_ms": training["timing"]["median_s"] * 1e3,
        "step_iqr_ms": training["timing"]["iqr_s"] * 1e3,
        "noisy": training["timing"]["noisy"],
        "tokens_per_s": training["tokens_per_s"],
        "mfu": training["mfu"],
        "loss_first": training["losses"][0],
        "loss_last": training["losses"][-1],
        "ppl_heldout_before": _ppl(result, "before", "heldout"),
        "ppl_heldout_after": _ppl(result, "after", "heldout"),
        "ppl_eval_text_before": _ppl(result, "before", "eval_text"),
        "ppl_eval_text_after": _ppl(result, "after", "eval_text"),
    }


def results_frame(results: list[dict]) -> pd.DataFrame:
    """One row per cell, registry order within each model, with ``<column>_ratio`` to the baseline mode."""
    frame = pd.DataFrame([result_row(r) for r in results])
    order = {name: index for index, name in enumerate(MODES)}
    frame = frame.sort_values(["model", "mode"], key=lambda col: col.map(order) if col.name == "mode" else col)
    for column in RATIO_COLUMNS:
        if column not in frame:
            continue
        baseline = frame[frame["mode"] == BASELINE_MODE].set_index("model")[column]
        frame[f"{column}_ratio"] = frame[column] / frame["model"].map(baseline)
    return frame.reset_index(drop=True)


def _cell(row: pd.Series, column: str, fmt: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = fmt.format(value)
    ratio = row.get(f"{column}_ratio")
    if ratio is not None and not math.isnan(ratio) and row["mode"] != BASELINE_MODE:
        text += f" (x{ratio:.2f})"
    if column == "step_ms" and row.get("noisy"):
        text += " ~"
    return text


def table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells for the columns present in ``frame`` (used by every text renderer)."""
    columns = [(c, h, f) for c, h, f in COLUMNS if c in frame and frame[c].notna().any()]
    headers = ["model", "mode"] + [h for _, h, _ in columns]
    rows = []
    for _, row in frame.iterrows():
        if row["status"] != "ok":
            rows.append([row["model"], row["mode"], f"{row['status']}: {row.get('error', '')}"[:80]])
            continue
        rows.append([row["model"], row["mode"]] + [_cell(row, c, f) for c, _, f in columns])
    return headers, rows


def footnotes(results: list[dict]) -> list[str]:
    """What a reader must know to read the table: devices, memory kind, provenance, protocols."""
    notes = []
    ok = [r for r in results if r["status"] == "ok"]
    if any(r["memory"]["training_peak"]["kind"] == "cpu_rss" for r in ok):
        notes.append("CPU figures: 'peak GiB' is the process's peak resident memory (RSS), not GPU memory; "
                     "step times are CPU times.")
    for provenance in {repr(r["model"]["provenance"]): r["model"]["provenance"] for r in ok}.values():
        if "note" in provenance:
            notes.append(f"{provenance.get('name', 'model')}: {provenance['note']}.")
    for r in ok[:1]:
        ppl = next(iter(r["perplexity"]["before"].values()))
        notes.append(f"Perplexity: window {ppl['window']}, stride {ppl['stride']}, "
                     f"{ppl['n_tokens_scored']} tokens scored per text; ratios (xN) are to {BASELINE_MODE}.")
    notes.append("'~' marks a step time whose IQR exceeds 5% of its median: too noisy to rank.")
    return notes


def rich_table(results: list[dict], title: str = "qlora-bench"):
    """The terminal table: transposed (a column per mode, a row per figure) so seven modes fit 80 columns,
    with each ratio to the baseline on its own line under the value."""
    from rich import box
    from rich.table import Table

    headers, rows = table_rows(results_frame(results))
    table = Table(title=title, caption="\n".join(footnotes(results)), caption_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("figure")
    for row in rows:
        table.add_column(f"{row[1]}\n{row[0]}" if len({r[0] for r in rows}) > 1 else row[1], justify="right")
    for index, header in enumerate(headers[2:], start=2):
        cells = [row[index].replace(" (", "\n(") if index < len(row) else row[-1] for row in rows]
        table.add_row(header, *cells)
    return table


def markdown_table(results: list[dict]) -> str:
    headers, rows = table_rows(results_frame(results))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in footnotes(results)]) + "\n"


PLOTS = [
    ("peak_gib", "peak memory during training (GiB)"),
    ("step_ms", "median step time (ms)"),
    ("ppl_heldout_after", "perplexity on held-out quotes after LoRA"),
    ("ppl_eval_text_after", "perplexity on the evaluation text after LoRA"),
]


def plot(results: list[dict], path: str | Path) -> Path:
    """One PNG with a bar chart per figure, modes on the x axis, one bar colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = results_frame(results)
    frame = frame[frame["status"] == "ok"]
    plots = [(c, t) for c, t in PLOTS if c in frame and frame[c].notna().any()]
    figure, axes = plt.subplots(1, len(plots), figsize=(4.2 * len(plots), 3.6), squeeze=False)
    for axis, (column, title) in zip(axes[0], plots):
        table = frame.pivot(index="mode", columns="model", values=column).reindex([m for m in MODES if m in set(frame["mode"])])
        table.plot.bar(ax=axis, legend=len(table.columns) > 1, rot=45)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
