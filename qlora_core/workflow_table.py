"""The classic workflow's table, rendered from its JSON only: one row per ``finetune`` summary, with the ``merge``
report made from the same adapter beside it (``results.Reading.finetunes`` and ``.merges``)."""

from __future__ import annotations

import pandas as pd

from qlora_core.report import is_missing, markdown_rows, sort_by_model_and_mode
from qlora_core.result_model import MemorySnapshot
from qlora_core.units import GIB

#: Columns shown: (frame column, header, format).
COLUMNS = [
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("rows_by_micro_batches", "rows x micro-batches", "{}"),
    ("path", "path", "{}"),
    ("checkpointing", "checkpointing", "{}"),
    ("compile_first_step_s", "compiled: first step s", "{:.1f}"),
    ("torch_threads", "torch threads", "{:d}"),
    ("steps", "steps", "{:d}"),
    ("tokens_per_step", "tokens/step (mean)", "{:,.0f}"),
    ("step_s", "step s (median)", "{:.2f}"),
    ("step_iqr_s", "± IQR s", "{:.2f}"),
    ("train_wall_s", "train wall s", "{:.1f}"),
    ("profiled_device_busy", "device busy (profiled)", "{:.0%}"),
    ("peak_gib", "peak GiB", "{:.2f}"),
    ("loss_first", "loss first", "{:.3f}"),
    ("loss_last", "loss last", "{:.3f}"),
    ("ppl_base_plus_adapter", "ppl base+adapter", "{:.2f}"),
    ("ppl_merged", "ppl merged", "{:.2f}"),
    ("merge_delta", "merged vs base+adapter", "{:+.2%}"),
]


def _peak_gib(summary: dict) -> float | None:
    peak = MemorySnapshot.from_json(summary["memory"]["training_peak"]).peak_bytes
    return None if peak is None else peak / GIB


def _tokens_per_step(summary: dict) -> float | None:
    """Rows a step x the data's mean row length (``data.tokens / data.rows``): the tokens a step trains on, on
    average; micro-batches are padded to their longest row, so a step computes more."""
    settings, data = summary["settings"], summary.get("data") or {}
    if not data.get("rows"):
        return None
    rows_a_step = settings["batch_size"] * settings["grad_accum"]
    return rows_a_step * data["tokens"] / data["rows"]


def finetune_row(summary: dict, merge: dict | None) -> dict:
    """One row (plain numbers, units in the keys) from a ``finetune`` summary and its ``merge`` report."""
    training = summary["training"]
    step_time = training.get("step_time") or {}  # summaries written before step times were recorded have none
    row = {
        "model": summary["model"]["label"],
        "mode": summary["mode"]["name"],
        "status": summary["status"],
        "rows_by_micro_batches": f"{summary['settings']['batch_size']} x {summary['settings']['grad_accum']}",
        # summaries written before the workflow had a lean path trained on the reference one
        "path": summary["settings"].get("path", "reference"),
        "checkpointing": "yes" if summary["settings"]["gradient_checkpointing"] else "no",
        "compile_first_step_s": (training.get("compile") or {}).get("first_step_s"),
        # host-bound steps depend on the threads the host runs (OMP_NUM_THREADS)
        "torch_threads": (summary.get("environment") or {}).get("torch_threads"),
        "steps": training["global_step"],
        "tokens_per_step": _tokens_per_step(summary),
        "step_s": step_time.get("median_s"),
        "step_iqr_s": step_time.get("iqr_s"),
        "noisy": step_time.get("noisy"),
        "train_wall_s": training["wall_s"],
        "profiled_device_busy": (training.get("profile") or {}).get("device_busy_share"),
        "peak_gib": _peak_gib(summary),
        "loss_first": training["losses"][0] if training["losses"] else None,
        "loss_last": training["losses"][-1] if training["losses"] else None,
        "sample": (summary.get("sample") or {}).get("completion"),
        "summary": summary["path"],
    }
    if merge is not None:
        unmerged, merged = (merge[key]["perplexity"]["perplexity"] for key in ("base_plus_adapter", "merged"))
        row |= {
            "ppl_base_plus_adapter": unmerged,
            "ppl_merged": merged,
            "merge_delta": merged / unmerged - 1,  # signed: the report's relative_delta is its magnitude
            "merge_tolerance": merge["tolerance"]["relative_perplexity"],
            "merge_within": merge["tolerance"]["within"],
            "merge_report": merge["path"],
        }
    return row


def workflow_frame(finetunes: list[dict], merges: list[dict]) -> pd.DataFrame:
    """One row per summary, registry order; a merge report joins the summary that wrote its adapter
    (``adapter_dir``). A merge report with no summary among ``finetunes`` is left out: it names no training."""
    merge_of = {merge["adapter_dir"]: merge for merge in merges}
    return sort_by_model_and_mode(
        pd.DataFrame([finetune_row(summary, merge_of.get(summary["adapter_dir"])) for summary in finetunes]))


def _text(row: pd.Series, column: str, fmt: str) -> str:
    value = row.get(column)
    if is_missing(value):
        return "-"
    text = fmt.format(int(value) if fmt == "{:d}" else value)
    if column == "step_s" and row.get("noisy"):
        text += " ~"
    if column == "merge_delta" and row.get("merge_within") is False:
        text += " (over tolerance)"
    return text


def table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows; '-' where a figure was not recorded."""
    headers = [header for _, header, _ in COLUMNS]
    return headers, [[_text(row, column, fmt) for column, _, fmt in COLUMNS] for _, row in frame.iterrows()]


def notes(frame: pd.DataFrame) -> list[str]:
    """What the columns mean, the merge tolerances in force, and each mode's greedy sample."""
    lines = [
        "step s: median wall time of an optimizer step (the device synchronized at each step's end; the first "
        "dropped as warm-up), including its micro-batches' loading, logging and the checkpoint saved after the "
        "step before; '~' marks an IQR over 5 % of the median. rows x micro-batches: rows a micro-batch x "
        "micro-batches an optimizer step (gradient accumulation). tokens/step (mean): rows a step x the data's mean "
        "row length (micro-batches are padded to their longest row, so a step computes more). peak GiB: the "
        "allocator's peak over training.",
        "ppl: perplexity on the held-out check text of the merge report, of the base with the adapter and of "
        "the adapter merged into a bf16 copy of the base as the mode stores it; negative: the merged model scores "
        "better.",
        "device busy (profiled): the share of the profiled steps' wall time the device spent in kernels "
        "(finetune --profile-steps; low: the host bounds the step).",
        "compiled: the step through torch.compile (finetune --compile), with its first step's wall time, "
        "compilation included (the median leaves it out); '-': eager.",
    ]
    if "merge_tolerance" in frame:
        tolerances = ", ".join(f"{mode} {tol:.0%}" for mode, tol in zip(frame["mode"], frame["merge_tolerance"])
                               if not is_missing(tol))
        lines.append(f"merge tolerance (relative perplexity): {tolerances}.")
    samples = dict.fromkeys((row["mode"], row["sample"]) for _, row in frame.iterrows() if isinstance(row["sample"], str))
    lines += [f"{mode} sample: {sample!r}" for mode, sample in samples]
    return lines


def markdown(frame: pd.DataFrame) -> str:
    """The table and its notes as Markdown."""
    return "\n".join([*markdown_rows(*table_rows(frame)), "", *(f"- {note}" for note in notes(frame))]) + "\n"


def rich_table(frame: pd.DataFrame):
    """The terminal rendering, transposed so several modes fit 80 columns (a column per run, a row per figure),
    then the notes."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    headers, rows = table_rows(frame)
    several_models = frame["model"].nunique() > 1
    table = Table(title="classic workflow", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("figure")
    for row in rows:
        table.add_column(f"{row[0]} {row[1]}" if several_models else row[1], justify="right")
    for index, header in enumerate(headers[2:], start=2):
        table.add_row(header, *(row[index] for row in rows))
    return Group(table, Text("\n".join(notes(frame))))
