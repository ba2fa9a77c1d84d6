"""Tables, plots and run comparisons, rendered from result JSON only.

``results_frame`` flattens cell results into one row per (model, mode) with units in the column names; every
renderer (rich, Markdown, CSV, PNG) starts from that frame, so the figures agree across formats. Ratios are
to the baseline mode (``BASELINE_MODE``) of the same model and run. The memory picture (``memory_plot``) is
drawn from each cell's memory floor and its comparison with the allocator instead. ``compare_frames`` sets two
such frames side by side and flags the figures that got worse by more than a threshold.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import textwrap
from pathlib import Path

import pandas as pd

from qlora_core.backends.bitsandbytes import DEQUANTIZED
from qlora_core.measure.floor import MEASURED_BY_ALLOCATOR, PHASE_COMPONENTS, phase_components
from qlora_core.measure.timing import NOISY_RELATIVE_IQR
from qlora_core.models import EAGER
from qlora_core.modes import BASELINE_MODE, MODES
from qlora_core.result_model import (TEXTS, CellResult, Environment, Floor, MemorySnapshot, Settings, as_cells,
                                     table_columns, training_peak)
from qlora_core.results import flatten_settings, model_label
from qlora_core.units import GIB, MIB

#: The frame's measurement columns, each with its reader, as the result model declares them on their fields
#: (``result_model.Column``): a new measurement's columns are declared there, and the tables, CSV, ratios and
#: ``compare`` take them from here.
FRAME_COLUMNS = table_columns()
#: Columns shown in tables: (frame column, header, format). Ratio columns are added beside the starred ones.
COLUMNS = [(column.name, column.header, column.fmt) for column, _ in FRAME_COLUMNS if column.header]
#: Columns also shown as a ratio to the baseline mode.
RATIO_COLUMNS = tuple(column.name for column, _ in FRAME_COLUMNS if column.ratio)
#: Where a row's peak memory was read: the separate memory pass, or the cell's own (evaluating) process.
PEAK_FROM_MEMORY_PASS, PEAK_FROM_CELL = "memory pass", "cell process"
#: Appended to a peak read in the cell's own process when other rows' peaks come from a memory pass.
CELL_PEAK_MARK = " †"


def _training_peak(result: CellResult) -> tuple[MemorySnapshot, str]:
    """The training-peak snapshot to report (``result_model.training_peak``) and where it was read."""
    peak, from_memory_pass = training_peak(result)
    return peak, PEAK_FROM_MEMORY_PASS if from_memory_pass else PEAK_FROM_CELL


def sort_by_model_and_mode(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame``'s rows by model label, then modes in registry order (``MODES``), renumbered from 0."""
    order = {name: index for index, name in enumerate(MODES)}
    return frame.sort_values(["model", "mode"], key=lambda col: col.map(order) if col.name == "mode" else col,
                             ignore_index=True)


def result_row(result: CellResult) -> dict:
    """One table row (plain numbers, units in the keys) from one cell result: what the row is, then every
    ``FRAME_COLUMNS`` figure."""
    row = {"model": model_label(result), "mode": result.mode.name, "status": result.status, "device": result.device}
    if result.status != "ok":
        return {**row, "error": result.error}
    peak, peak_source = _training_peak(result)
    return {**row, "memory_kind": peak.kind, "peak_source": peak_source,
            **{column.name: read(result) for column, read in FRAME_COLUMNS}}


def results_frame(results: list[CellResult | dict]) -> pd.DataFrame:
    """One row per cell (``results`` typed, or as their JSON), registry order within each model, with
    ``<column>_ratio`` to the baseline mode."""
    frame = sort_by_model_and_mode(pd.DataFrame([result_row(r) for r in as_cells(results)]))
    for column in RATIO_COLUMNS:
        if column not in frame:
            continue
        baseline = frame[frame["mode"] == BASELINE_MODE].set_index("model")[column]
        frame[f"{column}_ratio"] = frame[column] / frame["model"].map(baseline)
    return frame


def is_missing(value) -> bool:
    """A figure not recorded: None, or NaN where pandas filled a gap."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(row: pd.Series, column: str, fmt: str) -> str:
    value = row.get(column)
    if is_missing(value):
        return "-"
    text = fmt.format(value)
    ratio = row.get(f"{column}_ratio")
    if not is_missing(ratio) and row["mode"] != BASELINE_MODE:
        text += f" (x{ratio:.2f})"
    if column == "step_ms" and row.get("noisy"):
        text += " ~"
    return text


def _mixed_peak_sources(frame: pd.DataFrame) -> bool:
    return "peak_source" in frame and frame["peak_source"].dropna().nunique() > 1


def table_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells for the columns present in ``frame`` (used by every text renderer)."""
    columns = [(c, h, f) for c, h, f in COLUMNS if c in frame and frame[c].notna().any()]
    headers = ["model", "mode"] + [h for _, h, _ in columns]
    mark_cell_peaks = _mixed_peak_sources(frame)
    rows = []
    for _, row in frame.iterrows():
        if row["status"] != "ok":
            rows.append([row["model"], row["mode"], f"{row['status']}: {row.get('error', '')}"[:80]])
            continue
        cells = [_cell(row, c, f) for c, _, f in columns]
        if mark_cell_peaks and row["peak_source"] == PEAK_FROM_CELL and "peak_gib" in frame:
            index = [c for c, _, _ in columns].index("peak_gib")
            cells[index] += CELL_PEAK_MARK
        rows.append([row["model"], row["mode"]] + cells)
    return headers, rows


def _per_model(results: list[CellResult]) -> list[tuple[str, list[CellResult]]]:
    """Results grouped by model label, labels sorted (as ``results_frame`` sorts its rows)."""
    groups: dict[str, list[CellResult]] = {}
    for result in results:
        groups.setdefault(model_label(result), []).append(result)
    return sorted(groups.items(), key=lambda group: group[0])


def _names(cells: list[tuple[str, str]], several_models: bool) -> str:
    return ", ".join(f"{model}/{mode}" if several_models else mode for model, mode in cells)


def _peak_note(ok: list[CellResult]) -> str | None:
    """Which process each 'peak GiB' was read in, and what it measures."""
    if not any(_training_peak(r)[1] == PEAK_FROM_MEMORY_PASS for r in ok):
        return None  # the sweep's results: one process per cell, nothing to tell apart
    several_models = len({model_label(r) for r in ok}) > 1
    sources: dict[str, list[tuple[str, str]]] = {PEAK_FROM_MEMORY_PASS: [], PEAK_FROM_CELL: []}
    order = {name: index for index, name in enumerate(MODES)}
    for r in sorted(ok, key=lambda r: (model_label(r), order.get(r.mode.name, len(order)))):
        sources[_training_peak(r)[1]].append((model_label(r), r.mode.name))
    kinds = {_training_peak(r)[0].kind for r in ok}
    cuda = kinds == {"cuda"}
    what = "the CUDA allocator's peak allocated bytes" if cuda else "the peak memory"
    reset = " (peak counters reset after set-up, so also the training steps only)" if cuda else ""
    steps = {r.memory_pass.settings.train.max_steps if r.memory_pass.settings and r.memory_pass.settings.train
             else None for r in ok if _training_peak(r)[1] == PEAK_FROM_MEMORY_PASS}
    pass_steps = f"{steps.pop()} training steps" if len(steps) == 1 and None not in steps else "a few training steps"
    note = (f"peak GiB: {what} while training, read in the separate memory pass (its own process: load, LoRA "
            f"set-up, {pass_steps}, no evaluation)")
    if not sources[PEAK_FROM_CELL]:
        return note + " for every mode."
    return (note + f" for {_names(sources[PEAK_FROM_MEMORY_PASS], several_models)}; {CELL_PEAK_MARK.strip()} "
            f"read in the cell's own process{reset} for {_names(sources[PEAK_FROM_CELL], several_models)}, "
            f"which have no memory pass.")


def _timing_notes(ok: list[CellResult]) -> list[str]:
    """How step times were taken, and where pytest-benchmark's own timing of them went."""
    protocols = {(r.training.timing.rounds, r.training.timing.warmup) for r in ok}
    if not protocols:
        return []
    steps = (f"{next(iter(protocols))[0]} timed training steps after {next(iter(protocols))[1]} warm-up"
             if len(protocols) == 1 else "the timed training steps (after warm-up)")
    note = (f"step ms: median wall time of {steps}, timed in the cell's worker with the device synchronized "
            f"around each step; ± IQR ms: their interquartile range; tokens/s: tokens a step / that median.")
    if any(r.training.benchmark_stats for r in ok):
        note += (" pytest-benchmark's own timing of the same steps (round trip to the worker included) is in "
                 "the CSV as bench_step_ms and bench_step_iqr_ms.")
    return [note]


def _device_state_note(ok: list[CellResult]) -> str | None:
    """The GPU's SM clock, temperature and power over each cell's timed steps (NVML, read after each step): a
    step that slows as the clock falls was throttled, not slowed by its mode."""
    several_models = len({model_label(r) for r in ok}) > 1
    parts = []
    for r in ok:
        states = [s for s in (r.training.device_states or [])[r.training.timing.warmup:] if s]
        if not states:
            continue
        clocks, power = [s.sm_clock_mhz for s in states], [s.power_w for s in states]
        name = f"{model_label(r)} {r.mode.name}" if several_models else r.mode.name
        parts.append(f"{name} {min(clocks)}-{max(clocks)} MHz, up to {max(s.temperature_c for s in states)} C, "
                     f"{min(power):.0f}-{max(power):.0f} W")
    if not parts:
        return None
    return "GPU during the timed steps (NVML after each step: SM clock, temperature, power): " + "; ".join(parts) + "."


def _allocator_note(ok: list[CellResult]) -> str | None:
    """Cells whose timed steps (after warm-up) still went to the driver for memory: cudaMalloc synchronizes the
    device, so those steps' times carry the allocator's growth as well as the mode's work."""
    several_models = len({model_label(r) for r in ok}) > 1
    parts = []
    for r in ok:
        mallocs = (r.training.step_cuda_mallocs or [])[r.training.timing.warmup:]
        if any(mallocs):
            name = f"{model_label(r)} {r.mode.name}" if several_models else r.mode.name
            parts.append(f"{name} in {sum(1 for count in mallocs if count)} of {len(mallocs)} steps "
                         f"({sum(mallocs)} calls)")
    if not parts:
        return None
    return "Timed steps that still asked the driver for memory (cudaMalloc, which synchronizes): " + "; ".join(parts) + "."


def _processes_note(result: CellResult) -> str:
    """Each process's training peak for a cell trained on several (``cell_ranks``): the table shows rank 0's."""
    peaks = [rank.memory.training_peak.peak_bytes for rank in result.ranks]
    shown = ", ".join("-" if peak is None else f"{peak / GIB:.2f}" for peak in peaks)
    largest = max((peak for peak in peaks if peak is not None), default=None)
    most = "" if largest is None else f" (largest {largest / GIB:.2f})"
    sharing = {"fsdp": "FSDP: each held its shard of every parameter", "ddp": "DDP: each held the whole model"}
    strategy = sharing[result.settings.extra.get("strategy", "ddp")]  # results before strategies were DDP's
    return (f"{model_label(result)} {result.mode.name}: trained on {len(peaks)} processes; peak GiB by "
            f"process {shown}{most} ({strategy}); the table shows process 0's, which also evaluated.")


def _scaling_notes(ok: list[CellResult]) -> list[str]:
    """For each cell trained on N processes beside the same cell on one (the same mode and settings but the
    process count): its tokens/s against one process's, and that over N: the scaling efficiency (1: linear)."""
    def without_processes(result: CellResult) -> str:
        flat = flatten_settings(result.settings.to_json())
        flat.pop("num_processes", None)
        flat.pop("strategy", None)  # one process shares nothing, whatever its strategy
        return json.dumps(flat, sort_keys=True, default=str)

    def processes(result: CellResult) -> int:
        return 1 if result.settings.num_processes is None else result.settings.num_processes

    single = {without_processes(r): r for r in ok if processes(r) == 1}
    notes = []
    for r in ok:
        if processes(r) > 1 and (one := single.get(without_processes(r))):
            speedup = r.training.tokens_per_s / one.training.tokens_per_s
            notes.append(f"{model_label(r)} {r.mode.name}: {processes(r)} processes train {speedup:.2f}x the "
                         f"tokens a second of one process: scaling efficiency {speedup / processes(r):.0%}.")
    return notes


#: Source lines a graph break's reason lists before the rest are counted: a break in every layer is one line.
SHOWN_SITES = 3


def _sites(sites: list[str] | None) -> str:
    """`` at`` the first ``SHOWN_SITES`` source lines of a graph break, and how many more; nothing when none."""
    if not sites:
        return ""
    more = f" and {len(sites) - SHOWN_SITES} more" if len(sites) > SHOWN_SITES else ""
    return f" at {', '.join(sites[:SHOWN_SITES])}{more}"


def _compile_note(result: CellResult) -> str:
    """How torch.compile handled a compiled cell: its first step (compilation included), graphs, graph breaks and
    where they broke."""
    compiled = result.compile
    breaks = "; ".join(f"{reason} (x{count}){_sites(compiled.graph_break_sites.get(reason))}"
                       for reason, count in compiled.graph_breaks.items()) or "none"
    mode = result.settings.extra.get("compile_mode", "default")
    how = "torch.compile" if mode == "default" else f"torch.compile, mode {mode}"
    if result.settings.extra.get("compile_scope", "step") == "layers":
        how += ", each decoder layer"
    return (f"{model_label(result)} {result.mode.name}: compiled ({how}): first step "
            f"{compiled.first_step_s:.1f} s with compilation{_cache_note(compiled.inductor_cache)}, "
            f"{_counted(compiled.unique_graphs, 'graph')}; graph breaks: {breaks}.")


def _counted(count: int, noun: str) -> str:
    """'1 graph', '3 graphs'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cache_note(inductor_cache: dict[str, int] | None) -> str:
    """' (inductor's code for N forward and backward graphs, H from torch's compile cache)'; nothing for results
    that do not say."""
    if inductor_cache is None:
        return ""
    graphs = _counted(sum(inductor_cache.values()), "forward and backward graph")
    return f" (inductor's code for {graphs}, {inductor_cache['hit']} from torch's compile cache)"


def _kernels_note(result: CellResult) -> str:
    """Which fused kernels a cell ran (``qlora_core.kernels``) and why it has no predicted peak."""
    kernels = ", ".join(result.settings.extra["kernels"])
    return (f"{model_label(result)} {result.mode.name}: fused kernels (Liger-Kernel): {kernels}; the memory floor "
            f"does not model them (no prediction).")


def _eager_attention_note(result: CellResult) -> str:
    """That a cell ran transformers' eager attention (``models.ATTENTIONS``) and why it has no predicted peak."""
    return (f"{model_label(result)} {result.mode.name}: eager attention (transformers' matmul, softmax and matmul: "
            f"the attention matrix is made); the memory floor assumes fused attention (no prediction).")


def _text_name(result: CellResult, name: str) -> str:
    """'held-out quotes', or 'evaluation text (wiki.test.raw)' with the file the cell read."""
    eval_text = result.settings.eval_text
    file = f" ({Path(eval_text).name})" if name == "eval_text" and eval_text else ""
    return TEXTS.get(name, name) + file


def _perplexity_notes(ok: list[CellResult]) -> list[str]:
    """The perplexity protocol and the tokens scored on each text, once per distinct protocol."""
    several_models = len({model_label(r) for r in ok}) > 1
    protocols: dict[str, list[str]] = {}
    for r in ok:
        before = r.perplexity.get("before")
        if not before:  # shape-only models (random weights) have no perplexity
            continue
        first = next(iter(before.values()))
        counts = [(f"{entry.n_tokens_scored:,}", _text_name(r, name)) for name, entry in before.items()]
        text = (f"window {first.window}, stride {first.stride}, {counts[0][0]} tokens scored on the "
                f"{counts[0][1]}" + "".join(f", {n} on the {name}" for n, name in counts[1:]))
        protocols.setdefault(text, []).append(model_label(r))
    notes = []
    for text, models in protocols.items():
        scope = f" ({', '.join(dict.fromkeys(models))})" if several_models and len(protocols) > 1 else ""
        notes.append(f"Perplexity{scope}: {text}. Windows start every stride tokens and score only tokens no "
                     f"earlier window scored, so each token after the first is scored once, with at least "
                     f"window - stride tokens of context where the text allows; perplexity = exp(mean NLL). "
                     f"'before'/'after' = before/after the LoRA training steps.")
    return notes


def footnotes(results: list[CellResult | dict]) -> list[str]:
    """What a reader must know to read the table: devices, memory kind and source, provenance, protocols."""
    notes = []
    ok = [r for r in as_cells(results) if r.status == "ok"]
    if any(_training_peak(r)[0].kind == "cpu_rss" for r in ok):
        notes.append("CPU figures: 'peak GiB' is the process's peak resident memory (RSS), not GPU memory; "
                     "step times are CPU times.")
    for provenance in {repr(r.model.provenance): r.model.provenance for r in ok}.values():
        if "note" in provenance:
            notes.append(f"{provenance.get('name', 'model')}: {provenance['note']}.")
    peak = _peak_note(ok)
    if peak:
        notes.append(peak)
    notes += _timing_notes(ok)
    if device_states := _device_state_note(ok):
        notes.append(device_states)
    if allocator := _allocator_note(ok):
        notes.append(allocator)
    for model, note in {model_label(r): r.note for r in ok if r.note}.items():
        notes.append(f"{model}: {note}.")
    notes += _perplexity_notes(ok)
    notes += _int8_matmul_notes(ok)
    notes += [_int8_outlier_note(r) for r in ok if r.int8_outliers]
    notes += [_processes_note(r) for r in ok if r.ranks]
    notes += _scaling_notes(ok)
    notes += [_compile_note(r) for r in ok if r.compile]
    notes += [_kernels_note(r) for r in ok if r.settings.extra.get("kernels")]
    notes += [_eager_attention_note(r) for r in ok if r.settings.extra.get("attention") == EAGER]
    notes.append(f"(xN): ratio to {BASELINE_MODE} of the same model and run.")
    notes.append(f"'~' marks a step time whose IQR exceeds {NOISY_RELATIVE_IQR:.0%} of its median: too noisy to "
                 f"rank.")
    return notes


def _int8_dequantized(result: CellResult) -> bool:
    return result.settings.extra.get("int8_matmul") == DEQUANTIZED


def _int8_matmul_notes(results: list[CellResult]) -> list[str]:
    """How the int8 cells' matmuls computed: in bitsandbytes' kernel, whose dtype is not the mode's, or with
    the weight dequantized (``levers.Levers.int8_matmul``)."""
    kernel_dtypes = {r.int8_matmul_dtype for r in results if r.int8_matmul_dtype and not _int8_dequantized(r)}
    notes = [f"int8: bitsandbytes casts the int8 matmuls' inputs to {dtype} whatever the mode's compute dtype."
             for dtype in sorted(kernel_dtypes)]
    if any(r.int8_matmul_dtype and _int8_dequantized(r) for r in results):
        notes.append("int8 [int8_matmul=dequantized]: each int8 weight dequantized to the compute dtype for one "
                     "matmul (bitsandbytes' own training path on a CPU), so its inputs are not rounded to int8 "
                     "and no outlier columns are found.")
    return notes


def _int8_outlier_note(result: CellResult) -> str:
    """Which share of each int8 linear's input columns were outliers (multiplied in 16 bits and kept until
    backward: the memory model counts them)."""
    shares = ", ".join(f"{name} {share:.1%}" for name, share in result.int8_outliers.share.items())
    return f"{model_label(result)} int8: outlier columns (last step, share of each linear's inputs): {shares}."


def _stacked(cell: str) -> str:
    """'2.85 (x1.03) †' as '2.85 †' over '(x1.03)': the ratio on a line of its own, under its value."""
    match = re.fullmatch(r"(.*?) \((x[0-9.]+)\)(.*)", cell)
    return f"{match[1]}{match[3]}\n({match[2]})" if match else cell


def _one_rich_table(results: list[CellResult], title: str):
    """The terminal table of one model: transposed (a column per mode, a row per figure) so seven modes fit 80
    columns, with each ratio to the baseline on its own line under the value."""
    from rich import box
    from rich.table import Table

    headers, rows = table_rows(results_frame(results))
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("figure", min_width=10)
    for row in rows:
        table.add_column(row[1], justify="right")
    for index, header in enumerate(headers[2:], start=2):
        cells = [_stacked(row[index]) if index < len(row) else row[-1] for row in rows]
        table.add_row(header, *cells)
    return table


def rich_table(results: list[CellResult | dict], title: str = "qlora-bench"):
    """The terminal rendering: one table per model, then the footnotes (as text: a table's caption is clipped
    to the table's width)."""
    from rich.console import Group
    from rich.text import Text

    results = as_cells(results)
    groups = _per_model(results)
    tables = [_one_rich_table(part, f"{title}: {model}" if len(groups) > 1 else title) for model, part in groups]
    return Group(*tables, Text("\n".join(footnotes(results))))


def markdown_rows(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(results: list[CellResult | dict]) -> str:
    """The table(s) as Markdown, one per model (under a heading when there are several), then the footnotes."""
    results = as_cells(results)
    groups = _per_model(results)
    lines: list[str] = []
    for model, part in groups:
        if len(groups) > 1:
            lines += [f"### {model}", ""]
        lines += markdown_rows(*table_rows(results_frame(part))) + [""]
    return "\n".join(lines + [f"- {note}" for note in footnotes(results)]) + "\n"


def _describe_environment(env: Environment | None) -> str:
    if not env:
        return "environment not recorded"
    gpu = env.gpu
    device = f"{gpu.name} (driver {gpu.driver}, CUDA {gpu.cuda})" if gpu else f"CPU {env.cpu} x{env.cpu_count}"
    libraries = ", ".join(f"{name} {version}" for name, version in (env.libraries or {}).items()
                          if version and name != "qlora-bench")
    return f"{device}; {libraries}; commit {env.commit}"


def _describe_settings(settings: Settings, seq_len: str | None = None) -> str:
    """The set-up in words; ``seq_len``: the sequence length as written instead of the settings' own."""
    train, lora = settings.train, settings.lora
    timed = train.max_steps - settings.timing_warmup
    checkpointing = "gradient checkpointing" if settings.gradient_checkpointing else "no checkpointing"
    return (f"{settings.batch_size} x {seq_len or settings.seq_len} tokens a step, {timed} timed steps after "
            f"{settings.timing_warmup} warm-up; LoRA r={lora.r}, alpha={lora.alpha} on "
            f"{lora.target_modules}; {train.optimizer} lr {train.learning_rate:g}; {checkpointing}")


#: Where a summary line's sequence length goes while lines that differ in it alone are gathered.
_LENGTHS = "\0lengths\0"


def _lengths(seq_lens: set[int]) -> str:
    """'4,096' or, for a frontier's probes, '1,536 to 131,072 (40 lengths)'."""
    if len(seq_lens) == 1:
        return f"{next(iter(seq_lens)):,}"
    return f"{min(seq_lens):,} to {max(seq_lens):,} ({len(seq_lens)} lengths)"


def run_summary(results: list[CellResult | dict]) -> list[str]:
    """Where and how the results were measured: each distinct machine and set-up once, with its dates. Set-ups
    that differ in their sequence length alone (a frontier's probes, one length each) share a line naming the
    lengths."""
    lines: dict[str, tuple[set[str], set[int]]] = {}
    for r in as_cells(results):
        env = r.environment
        line = _describe_environment(env)
        if r.settings.train:
            # label_setups names the length where it alone tells set-ups apart: the line names the lengths
            label = model_label(r).replace(f" [seq_len={r.settings.seq_len}]", "")
            line = f"{label}: {_describe_settings(r.settings, _LENGTHS)}; {line}"
        dates, seq_lens = lines.setdefault(line, (set(), set()))
        dates.add(((env and env.timestamp) or "")[:10])
        seq_lens.add(r.settings.seq_len)
    return [f"{line.replace(_LENGTHS, _lengths(seq_lens))}; "
            f"{', '.join(sorted(d for d in dates if d)) or 'date not recorded'}"
            for line, (dates, seq_lens) in lines.items()]


def _seconds(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:,.0f} s"


def _cell_statuses(cells: list[dict]) -> str:
    """'5 ok, 1 oom (m-nf4)': a count per status, the cells named where they did not finish."""
    by_status: dict[str, list[str]] = {}
    for entry in cells:
        by_status.setdefault(entry["status"], []).append(entry["name"])
    return ", ".join(f"{len(names)} {status}" + ("" if status == "ok" else f" ({', '.join(names)})")
                     for status, names in by_status.items()) or "none"


def run_lines(runs: list[dict]) -> list[str]:
    """Per run manifest (``results.read_runs``): its command and commit, then its wall time and the share of it
    spent in measured phases (load, evaluations, LoRA set-up, training steps), then its cells' statuses."""
    lines = []
    for run in runs:
        command = shlex.join(map(str, run["command"])) if isinstance(run["command"], list) else str(run["command"])
        lines.append(f"run {run.get('path', '')}: {command} (commit {run.get('commit') or 'not recorded'})")
        share = run.get("measured_share")
        measured = ("measured share not recorded" if share is None
                    else f"measured {_seconds(run.get('measured_seconds'))} = {share:.0%} of wall")
        ended = f"ended {run['ended']}" if run.get("ended") else "NOT FINISHED (no end time)"
        lines.append(f"  started {run['started']}, {ended}; wall {_seconds(run.get('wall_seconds'))}, {measured}")
        lines.append(f"  cells: {_cell_statuses(run['cells'])}")
        activities = _seconds_by_activity(run["cells"])
        if activities:
            lines.append("  cells' wall by activity: " + ", ".join(
                f"{activity} {_seconds(seconds)}" for activity, seconds in activities.items()))
    return lines


def _seconds_by_activity(cells: list[dict]) -> dict[str, float]:
    """The cells' ``seconds_in`` (worker calls as the run's process saw them, waiting for processes) summed over
    cells, largest first."""
    totals: dict[str, float] = {}
    for cell in cells:
        for activity, seconds in (cell.get("seconds_in") or {}).items():
            totals[activity] = totals.get(activity, 0.0) + seconds
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def floor_frame(results: list[CellResult | dict]) -> pd.DataFrame:
    """Predicted (analytic floor) vs measured memory, one row per (model, mode, point), in MiB; empty when no
    result carries a floor. The remainder is what the floor does not explain (measured minus predicted)."""
    rows = []
    for r in as_cells(results):
        for point, entry in (r.predicted_vs_measured or {}).items():
            measured = entry.measured_bytes
            rows.append({
                "model": model_label(r), "mode": r.mode.name, "point": point,
                "predicted_mib": entry.predicted_bytes / MIB,
                "measured_mib": None if measured is None else measured / MIB,
                "remainder_mib": None if measured is None else entry.remainder_bytes / MIB,
                "measured_over_predicted": entry.ratio, "measured_by": entry.measured_by,
            })
    return pd.DataFrame(rows)


FLOOR_HEADERS = ["model", "mode", "point", "predicted MiB", "measured MiB", "remainder MiB", "measured/predicted"]


def floor_rows(results: list[CellResult | dict]) -> list[list[str]]:
    """``floor_frame`` formatted for the text renderers ("-" where the allocator cannot observe the point)."""
    number = lambda value, fmt: "-" if is_missing(value) else fmt.format(value)  # noqa: E731
    return [
        [row.model, row.mode, row.point, number(row.predicted_mib, "{:.1f}"), number(row.measured_mib, "{:.1f}"),
         number(row.remainder_mib, "{:+.1f}"), number(row.measured_over_predicted, "x{:.3f}")]
        for row in floor_frame(results).itertuples()
    ]


def floor_rich_table(results: list[CellResult | dict]):
    """The terminal table of predicted vs measured memory, or None when no result has a floor."""
    from rich.table import Table

    rows = floor_rows(results)
    if not rows:
        return None
    table = Table(title="memory: analytic floor vs measured")
    for header in FLOOR_HEADERS:
        table.add_column(header, justify="left" if header in ("model", "mode", "point") else "right")
    for row in rows:
        table.add_row(*row)
    return table


PROFILE_HEADERS = ["model", "mode", "steps profiled", "wall ms/step", "kernel ms/step", "device busy", "kernels/step",
                   "host ops/step", "top host operators (self ms/step)"]
#: How many of a profile's top host operators the table names.
PROFILE_TOP_OPS = 3


def profile_rows(results: list[CellResult | dict]) -> list[list[str]]:
    """One row per result carrying a profile (``measure.profile.summarize``); '-' for device figures on CPU."""
    number = lambda value, fmt: "-" if value is None else fmt.format(value)  # noqa: E731
    rows = []
    for r in as_cells(results):
        if not (profile := r.profile):
            continue
        top = ", ".join(f"{op.name} {op.self_ms_per_call:.1f}" for op in profile.top_host_ops[:PROFILE_TOP_OPS])
        rows.append([
            model_label(r), r.mode.name, str(profile.calls), f"{profile.wall_s_per_call * 1e3:.0f}",
            number(profile.kernel_s_per_call and profile.kernel_s_per_call * 1e3, "{:.0f}"),
            number(profile.device_busy_share, "{:.0%}"), number(profile.kernels_per_call, "{:,.0f}"),
            f"{profile.host_ops_per_call:,.0f}", top,
        ])
    return rows


PROFILE_NOTE = ("Profiled steps ran after the timed ones under torch.profiler and were undone before the "
                "evaluation; the profiler slows them, so their wall time explains and the step-time column "
                "measures. device busy: the kernels' time over the wall time (low: the host bounds the step).")


def profile_rich_table(results: list[CellResult | dict]):
    """The terminal table of the profiles, or None when no result carries one."""
    from rich.table import Table

    rows = profile_rows(results)
    if not rows:
        return None
    table = Table(title="where a step's time goes (torch.profiler)", caption=PROFILE_NOTE)
    for header in PROFILE_HEADERS:
        table.add_column(header, justify="left" if header in ("model", "mode", PROFILE_HEADERS[-1]) else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_report(results: list[CellResult | dict], title: str = "qlora-bench report", runs: list[dict] = (),
                    memory_png: str | None = None) -> str:
    """A Markdown document: title, where and how it was measured, the runs that made the results (``runs``:
    their manifests, see ``run_lines``), the table(s) and their footnotes, the memory picture (``memory_png``:
    its path relative to the document, when ``memory_plot`` wrote one) and the analytic floor against the
    measurements where results carry one."""
    results = as_cells(results)
    header = [f"# {title}", ""] + [f"Measured: {line}." for line in run_summary(results)] + [""]
    if runs:
        header += ["## Runs", "", "```", *run_lines(runs), "```", ""]
    document = "\n".join(header) + "\n" + markdown_table(results)
    if memory_png:
        document += f"\n## Memory: predicted by component beside measured\n\n![memory by component]({memory_png})\n"
    rows = floor_rows(results)
    if rows:
        document += "\n## Memory: analytic floor vs measured\n\n" + "\n".join(markdown_rows(FLOOR_HEADERS, rows))
        document += "\n"
    if rows := profile_rows(results):
        document += ("\n## Where a step's time goes\n\n" + "\n".join(markdown_rows(PROFILE_HEADERS, rows))
                     + f"\n\n{PROFILE_NOTE}\n")
    return document


# --- plots ----------------------------------------------------------------------------------------------------

BASELINE_COLOR, MODE_COLOR = "#404040", "#4878d0"
TEXT_COLORS = {"heldout": "#4878d0", "eval_text": "#ee854a"}
PLOT_SIZE_IN = (11.0, 8.0)  # per model: a 2 x 2 grid of panels
PLOT_DPI = 120


def _mark_baseline(axis, modes: list[str], marks: list[str]) -> None:
    """Mode names (with their marks) under the bars, the baseline's slot shaded so every panel shows where the
    unquantized reference is."""
    if BASELINE_MODE in modes:
        index = modes.index(BASELINE_MODE)
        axis.axvspan(index - 0.5, index + 0.5, color="#e8e8e8", zorder=0)
    axis.set_xticks(range(len(modes)))
    labels = [f"{mode}{mark}" + ("\n(baseline)" if mode == BASELINE_MODE else "") for mode, mark in zip(modes, marks)]
    axis.set_xticklabels(labels, fontsize=8)
    axis.set_xlim(-0.5, len(modes) - 0.5)
    axis.tick_params(axis="y", labelsize=8)
    axis.grid(axis="y", alpha=0.3)
    axis.set_axisbelow(True)


def _bar_panel(axis, part: pd.DataFrame, column: str, title: str, fmt: str, *, error: str | None = None,
               marks: list[str] | None = None) -> None:
    """One figure by mode: bars (the baseline's dark), value labels, and a dashed line at the baseline's value;
    ``error`` names a column of IQRs drawn as bars spanning one IQR around the median."""
    modes = part["mode"].tolist()
    values = part[column].astype(float)
    colors = [BASELINE_COLOR if m == BASELINE_MODE else MODE_COLOR for m in modes]
    yerr = part[error].astype(float) / 2 if error else 0 * values
    bars = axis.bar(range(len(modes)), values, color=colors, yerr=yerr if error else None, capsize=3,
                    ecolor="#202020", zorder=2)
    axis.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=2)
    if BASELINE_MODE in modes:
        axis.axhline(values[modes.index(BASELINE_MODE)], color=BASELINE_COLOR, linestyle="--", linewidth=0.8,
                     zorder=1)
    axis.set_title(title, fontsize=10)
    axis.set_ylim(0, 1.15 * float((values + yerr).max()))
    _mark_baseline(axis, modes, marks or [""] * len(modes))


def _perplexity_panel(axis, part: pd.DataFrame, text_names: dict[str, str]) -> None:
    """Perplexity after LoRA on each text side by side, each text's value before LoRA as a black tick."""
    modes = part["mode"].tolist()
    texts = [name for name in TEXTS if part[f"ppl_{name}_after"].notna().any()]
    if not texts:  # shape-only models: random weights have no meaningful perplexity
        axis.set_axis_off()
        axis.text(0.5, 0.5, "no perplexity:\nrandom weights, memory and time only", ha="center", va="center")
        return
    width = 0.8 / len(texts)
    top = 0.0
    for index, name in enumerate(texts):
        x = [i - 0.4 + width * (index + 0.5) for i in range(len(modes))]
        after = part[f"ppl_{name}_after"].astype(float)
        before = part[f"ppl_{name}_before"].astype(float)
        bars = axis.bar(x, after, width=width, color=TEXT_COLORS[name], label=f"{text_names[name]}, after",
                        zorder=2)
        # inside the bars: above them the before-ticks would collide with the labels
        axis.bar_label(bars, labels=[f"{v:.1f}" for v in after], fontsize=7, label_type="center", color="white")
        axis.scatter(x, before, marker="_", s=120, color="black", zorder=3,
                     label="before LoRA" if index == 0 else None)
        top = max(top, float(after.max()), float(before.max()))
    axis.set_ylim(0, 1.3 * top)
    axis.set_title("perplexity after LoRA (lower is better)", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", frameon=False)
    _mark_baseline(axis, modes, [""] * len(modes))


def _model_panel(panel, part: pd.DataFrame, results: list[CellResult]) -> None:
    """The 2 x 2 grid of one model, its set-up and machine in small print under it."""
    axes = panel.subplots(2, 2).ravel()
    cpu = set(part["memory_kind"]) == {"cpu_rss"}
    mixed = _mixed_peak_sources(part)
    where = f"{PEAK_FROM_MEMORY_PASS};{CELL_PEAK_MARK} {PEAK_FROM_CELL}" if mixed else part["peak_source"].iloc[0]
    _bar_panel(axes[0], part, "peak_gib", f"peak {'CPU RSS' if cpu else 'GPU'} memory in training, GiB ({where})",
               "{:.2f}", marks=[CELL_PEAK_MARK if mixed and s == PEAK_FROM_CELL else "" for s in part["peak_source"]])
    _bar_panel(axes[1], part, "step_ms", "median step time, ms (error bars: IQR; ~ noisy)", "{:.0f}",
               error="step_iqr_ms", marks=[" ~" if noisy else "" for noisy in part["noisy"]])
    _bar_panel(axes[2], part, "tokens_per_s", "training throughput, tokens/s (higher is better)", "{:.0f}")
    _perplexity_panel(axes[3], part, {name: _text_name(results[0], name) for name in TEXTS})
    panel.suptitle(f"qlora-bench: {part['model'].iloc[0]}, LoRA over weight quantization modes", fontsize=12)
    lines = [wrapped for line in run_summary(results) for wrapped in textwrap.wrap(line, 190, subsequent_indent="    ")]
    panel.text(0.01, 0.01, "\n".join(lines), ha="left", va="bottom", fontsize=7)
    panel.subplots_adjust(left=0.06, right=0.98, top=0.91, bottom=0.15, hspace=0.5, wspace=0.15)


def plot(results: list[CellResult | dict], path: str | Path) -> Path:
    """One PNG: per model a 2 x 2 grid (peak memory in GiB, median step time in ms with IQR bars, tokens/s,
    perplexity after LoRA on each text with the value before as a tick), modes on the x axis in registry
    order, the baseline's slot shaded and its value dashed across the single-figure panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = as_cells(results)
    frame = results_frame(results)
    frame = frame[frame["status"] == "ok"]
    models = list(dict.fromkeys(frame["model"]))
    if not models:
        raise ValueError("nothing to plot: no cell finished")
    width, height = PLOT_SIZE_IN
    figure = plt.figure(figsize=(width, height * len(models)))
    panels = figure.subfigures(len(models), 1, squeeze=False)[:, 0]
    for panel, model in zip(panels, models):
        finished = [r for r in results if r.status == "ok" and model_label(r) == model]
        _model_panel(panel, frame[frame["model"] == model].reset_index(drop=True), finished)
    path = Path(path)
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return path


# --- the memory picture -------------------------------------------------------------------------------------------

#: Fill colours of ``PHASE_COMPONENTS``: blues for the weights as stored (darkest the quantized data), purple for
#: the reference path's upcasts, green for what LoRA trains, warm colours for what the step holds briefly.
COMPONENT_COLORS = {
    "quantized_bytes": "#08306b",
    "quant_constants_bytes": "#4292c6",
    "unquantized_bytes": "#9ecae1",
    "upcast_bytes": "#807dba",
    "lora_bytes": "#41ab5d",
    "saved_activations_bytes": "#fd8d3c",
    "int8_held_inputs_bytes": "#d94801",
    "fsdp_gathered_bytes": "#e7298a",
    "logits_loss_bytes": "#8c510a",
    "layer_backward_bytes": "#fee391",
    "optimizer_step_bytes": "#c7e9c0",
}
MEASURED_COLOR, REMAINDER_COLOR, SLACK_COLOR, OVER_COLOR = "#525252", "#e41a1c", "#f0f0f0", "#c51b7d"
TRUE_FLOOR_COLOR = "#006d2c"
MEMORY_PANEL_SIZE_IN = (13.0, 5.0)  # per model: one row of (predicted, measured) pairs
MEMORY_TOP_IN, MEMORY_BOTTOM_IN = 0.9, 0.9  # the figure's title above the panels; the last mode names below
BAR_WIDTH = 0.38


def measured_peak(result: CellResult) -> dict | None:
    """The training peak the CUDA allocator saw (bytes allocated, grown since before the load, as the floor's
    comparison reads it) and the allocator's slack at that peak (peak reserved minus peak allocated: cached
    blocks the process holds but no tensor uses); None where the allocator was not read (CPU runs, cells that
    did not run)."""
    row = (result.predicted_vs_measured or {}).get("training_peak")
    if row is None or row.measured_by != MEASURED_BY_ALLOCATOR or row.measured_bytes is None:
        return None
    peak = result.memory.training_peak
    return {"allocated_bytes": row.measured_bytes,
            "slack_bytes": peak.peak_reserved_bytes - peak.peak_allocated_bytes}


def _with_floor(results: list[CellResult]) -> list[tuple[str, list[CellResult]]]:
    """The results that carry a floor, by model label (sorted), registry order within each."""
    order = {name: index for index, name in enumerate(MODES)}
    groups = _per_model([r for r in results if r.floor])
    return [(model, sorted(part, key=lambda r: order.get(r.mode.name, len(order)))) for model, part in groups]


def _components(floor: Floor) -> dict[str, int]:
    """The floor's peak phase by component (``measure.floor.phase_components``, which reads the floor's JSON)."""
    return phase_components(floor.to_json(), floor.peak_phase)


def _predicted_bar(axis, x: float, floor: Floor) -> None:
    """The peak phase's predicted bytes stacked by component (GiB), bottom to top in ``PHASE_COMPONENTS`` order."""
    bottom = 0.0
    for key, part_bytes in _components(floor).items():
        axis.bar(x, part_bytes / GIB, BAR_WIDTH, bottom=bottom, color=COMPONENT_COLORS[key], edgecolor="white",
                 linewidth=0.3, zorder=2)
        bottom += part_bytes / GIB
    axis.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=7)


def _measured_bar(axis, x: float, predicted_gib: float, measured: dict | None, reason: str) -> float:
    """The measured peak beside its prediction: grey up to the prediction, red above it (the unexplained
    remainder), a magenta outline up to the prediction where it is below (over-predicted), the allocator's
    slack hatched on top. Where nothing was measured, ``reason`` in its place. Returns the bar's top (GiB)."""
    if measured is None:
        axis.text(x, 0, f" not measured:\n {reason}", ha="center", va="bottom", rotation=90, fontsize=7,
                  color=MEASURED_COLOR)
        return 0.0
    allocated_gib = measured["allocated_bytes"] / GIB
    explained_gib = min(allocated_gib, predicted_gib)
    slack_gib = measured["slack_bytes"] / GIB
    axis.bar(x, explained_gib, BAR_WIDTH, color=MEASURED_COLOR, zorder=2)
    axis.bar(x, allocated_gib - explained_gib, BAR_WIDTH, bottom=explained_gib, color=REMAINDER_COLOR, zorder=2)
    axis.bar(x, slack_gib, BAR_WIDTH, bottom=allocated_gib, color=SLACK_COLOR, edgecolor="#969696", hatch="///",
             linewidth=0.5, zorder=2)
    if allocated_gib < predicted_gib:  # outlined over the slack, which starts at the measured peak
        axis.bar(x, predicted_gib - allocated_gib, BAR_WIDTH, bottom=allocated_gib, fill=False,
                 edgecolor=OVER_COLOR, linewidth=1.5, zorder=3)
    ratio = allocated_gib / predicted_gib if predicted_gib else math.nan
    axis.text(x, allocated_gib, f"{allocated_gib:.1f}\nx{ratio:.3f}", ha="center", va="top", fontsize=7,
              color="white", zorder=4)
    return allocated_gib + slack_gib


def _not_measured_reason(result: CellResult) -> str:
    """Why a cell with a floor has no measured peak: it did not run, or ran where the allocator is not read."""
    if result.status != "ok":
        return result.status.replace("_", " ")
    return "no CUDA allocator"


def _label_pairs(axis, part: list[CellResult]) -> None:
    """Mode names under each pair of bars, 'predicted (its peak phase)' and 'measured' under each bar."""
    modes = [r.mode.name for r in part]
    phases = [r.floor.peak_phase.replace("_", " ") for r in part]
    axis.set_xticks(range(len(modes)))
    axis.set_xticklabels(modes, fontsize=9, fontweight="bold")
    axis.set_xticks([i + side * BAR_WIDTH / 2 for i in range(len(modes)) for side in (-1, 1)], minor=True)
    axis.set_xticklabels([label for phase in phases for label in (f"predicted\n({phase})", "measured")],
                         minor=True, fontsize=6)
    axis.tick_params(axis="x", which="major", length=0, pad=22)  # below the two-line minor labels
    axis.tick_params(axis="x", which="minor", length=0)
    axis.set_xlim(-0.6, len(modes) - 0.4)


def _memory_title(model: str, part: list[CellResult]) -> str:
    """The panel's model, path, tokens a micro-batch and device; 'predicted only' when nothing was measured."""
    floor = part[0].floor
    path = "" if f"({floor.path} path)" in model else f", {floor.path} path"  # lean labels name theirs
    scope = "" if any(measured_peak(r) for r in part) else " (predicted only: nothing measured)"
    return (f"{model}{path}, {floor.tokens_per_micro_batch:,} tokens a micro-batch, "
            f"{_device_name(part[0]) or 'device not recorded'}{scope}")


def _memory_panel(axis, model: str, part: list[CellResult]) -> None:
    """One model: a (predicted, measured) pair of bars per mode, the prediction's level dashed across each."""
    top_gib = 0.0
    for index, result in enumerate(part):
        predicted_gib = result.floor.peak_bytes / GIB
        _predicted_bar(axis, index - BAR_WIDTH / 2, result.floor)
        measured_top_gib = _measured_bar(axis, index + BAR_WIDTH / 2, predicted_gib, measured_peak(result),
                                         _not_measured_reason(result))
        axis.hlines(predicted_gib, index - BAR_WIDTH, index + BAR_WIDTH, colors="black", linestyles="--",
                    linewidth=0.9, zorder=3)
        if result.floor.true_floor_bytes is not None:  # floors saved before it existed have none
            axis.hlines(result.floor.true_floor_bytes / GIB, index - BAR_WIDTH, index + BAR_WIDTH,
                        colors=TRUE_FLOOR_COLOR, linestyles=":", linewidth=1.6, zorder=3)
        top_gib = max(top_gib, predicted_gib, measured_top_gib)
    _label_pairs(axis, part)
    axis.set_ylim(0, 1.18 * top_gib)  # room for the value labels above the bars
    axis.set_ylabel("peak memory, GiB")
    axis.grid(axis="y", alpha=0.3)
    axis.set_axisbelow(True)
    axis.set_title(_memory_title(model, part), fontsize=10, loc="left")


def _memory_legend(figure, groups: list[tuple[str, list[CellResult]]]) -> None:
    """One legend right of the panels: the predicted components some bar shows (in stacking order, top first),
    then, where some cell was measured, the parts of a measured bar under a heading of their own (a legend has
    one title; a second figure legend could not be placed under the first without measuring it)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = {key for _, part in groups for r in part for key, value in _components(r.floor).items() if value}
    handles = [Patch(color=COMPONENT_COLORS[key], label=label) for key, label in reversed(PHASE_COMPONENTS.items())
               if key in shown]
    handles.append(Line2D([], [], color="black", linestyle="--", label="predicted peak"))
    if any(r.floor.true_floor_bytes is not None for _, part in groups for r in part):
        handles.append(Line2D([], [], color=TRUE_FLOOR_COLOR, linestyle=":", linewidth=1.6,
                              label="true floor (the least any path holds)"))
    heading = None
    if any(measured_peak(r) for _, part in groups for r in part):
        heading = len(handles) + 1
        handles += [
            Patch(visible=False, label=""),
            Patch(visible=False, label="measured (x measured / predicted)"),
            Patch(facecolor=SLACK_COLOR, edgecolor="#969696", hatch="///", label="allocator slack (reserved, unused)"),
            Patch(color=REMAINDER_COLOR, label="unexplained remainder (above predicted)"),
            Patch(fill=False, edgecolor=OVER_COLOR, linewidth=1.5, label="over-predicted (measured below)"),
            Patch(color=MEASURED_COLOR, label="peak allocated (CUDA allocator)"),
        ]
    top = 1 - MEMORY_TOP_IN / figure.get_figheight()
    legend = figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.73, top), fontsize=8, frameon=False,
                           title="predicted (peak phase in brackets)", title_fontsize=9, alignment="left")
    if heading is not None:
        legend.get_texts()[heading].set_fontsize(9)


def memory_plot(results: list[CellResult | dict], path: str | Path) -> Path | None:
    """One PNG of where training memory goes: per model a panel with, per mode in registry order, the predicted
    peak (GiB) stacked by component (``phase_components`` of the floor's peak phase) beside the measured peak
    allocated (the remainder above the prediction in red, the allocator's slack hatched on top), the prediction
    dashed across each pair. Cells without a floor are left out; where no cell has one, nothing is written and
    None is returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _with_floor(as_cells(results))
    if not groups:
        return None
    width, height = MEMORY_PANEL_SIZE_IN
    figure, axes = plt.subplots(len(groups), 1, figsize=(width, height * len(groups)), squeeze=False)
    for axis, (model, part) in zip(axes[:, 0], groups):
        _memory_panel(axis, model, part)
    _memory_legend(figure, groups)
    figure.suptitle("qlora-bench: where the peak memory of a LoRA training step goes, predicted beside measured",
                    fontsize=12, x=0.02, ha="left", y=1 - 0.25 / figure.get_figheight())
    figure.subplots_adjust(left=0.06, right=0.72, top=1 - MEMORY_TOP_IN / figure.get_figheight(), hspace=0.45,
                           bottom=MEMORY_BOTTOM_IN / figure.get_figheight())
    path = Path(path)
    figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)
    return path


# --- the context frontier ---------------------------------------------------------------------------------------

#: Published context lengths of others, drawn as claims, not measurements: (shape, capacity GiB, tokens, label).
#: Unsloth's figures for QLoRA at batch 1 in an 80 GB GPU (theirs, and Hugging Face + FlashAttention 2 as they
#: measured it), Llama-3.3-70B standing for the Llama-3.1-70B shape (the same architecture).
CONTEXT_CLAIMS = [
    ("Llama-3.1-8B", 80, 342_733, "Unsloth (claim)"),
    ("Llama-3.1-8B", 80, 28_454, "HF + FA2 (Unsloth's figure)"),
    ("Llama-3.1-70B", 80, 89_389, "Unsloth (claim)"),
    ("Llama-3.1-70B", 80, 6_916, "HF + FA2 (Unsloth's figure)"),
]
CLAIM_MARKERS = {"Unsloth (claim)": "*", "HF + FA2 (Unsloth's figure)": "X"}


def lever_parts(frontier: dict) -> list[str]:
    """The lean-path levers a frontier was predicted with, in words (``["offload", "MLP tiles of 4,096"]``); none
    for a frontier without ``levers`` (saved before they existed) or with none pulled."""
    levers = frontier.get("levers") or {}
    parts = ["offload"] if levers.get("offload_activations") else []
    if levers.get("offload_host_gib") is not None:
        parts[-1] += f" (at most {levers['offload_host_gib']:g} GiB)"
    if levers.get("mlp_tile_tokens") is not None:
        parts.append(f"MLP tiles of {levers['mlp_tile_tokens']:,}")
    if levers.get("int8_matmul") == DEQUANTIZED:
        parts.append("int8 dequantized")
    return parts


#: How a checked frontier is marked, by what its probes found: (marker, fill).
CHECK_MARKERS = {
    "confirmed (the predicted length ran, the one above ran out of memory)": ("o", "full"),
    "ran, not confirmed (the probe above ran too, or has not run)": ("o", "none"),
    "the predicted length did not run": ("v", "none"),
}


def _check_state(frontier: dict) -> str:
    """Which of ``CHECK_MARKERS`` a checked frontier is."""
    confirmed, ran, failed = CHECK_MARKERS
    if frontier["confirmed"]:
        return confirmed
    return ran if frontier["probes"]["at"]["status"] == "ok" else failed


def frontier_plot(frontiers: list[dict], path: str | Path) -> Path:
    """One PNG of ``qlora-bench frontier`` frontiers (one document's, or all a report read): per shape a panel of
    the longest sequence (tokens, log scale) by memory capacity (GiB), a line per mode, path and levers
    (``lever_parts``), each its own colour (lean solid, lean with levers dash-dotted, reference dashed); a frontier
    checked on the device is marked by what its probes found (``CHECK_MARKERS``); others' published figures
    (``CONTEXT_CLAIMS``) are marked as claims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    shapes = list(dict.fromkeys(f["shape"] for f in frontiers))
    figure, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 5.0), squeeze=False)
    palette = plt.get_cmap("tab10")
    order = {name: index for index, name in enumerate(MODES)}  # lines in the registry's order of modes
    for axis, shape in zip(axes[0], shapes):
        lines = {}
        for found in (f for f in frontiers if f["shape"] == shape and f["tokens"]):
            lines.setdefault((found["mode"], found["path"], tuple(lever_parts(found))), []).append(found)
        for index, ((mode, path_name, levers), points) in enumerate(
                sorted(lines.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0][1:]))):
            color = palette(index % palette.N)
            points.sort(key=lambda f: f["capacity_bytes"])
            gib = [f["capacity_bytes"] / GIB for f in points]
            style = "--" if path_name != "lean" else "-." if levers else "-"
            axis.plot(gib, [f["tokens"] for f in points], color=color, marker="o", markersize=4,
                      linestyle=style, label=f"{mode}, " + " + ".join([path_name, *levers]))
            for f in (f for f in points if "confirmed" in f):
                marker, fill = CHECK_MARKERS[_check_state(f)]
                axis.plot(f["capacity_bytes"] / GIB, f["tokens"], marker=marker, markersize=10, color=color,
                          fillstyle=fill, alpha=0.6 if fill == "full" else 1)
        states = {_check_state(f) for points in lines.values() for f in points if "confirmed" in f}
        for state in (state for state in CHECK_MARKERS if state in states):
            marker, fill = CHECK_MARKERS[state]
            axis.add_line(Line2D([], [], marker=marker, markersize=8, color="grey", linestyle="none",
                                 fillstyle=fill, label=f"checked: {state}"))
        for claim_shape, gib, tokens, label in CONTEXT_CLAIMS:
            if claim_shape == shape:
                axis.plot(gib, tokens, marker=CLAIM_MARKERS[label], markersize=11, color="black", linestyle="none",
                          label=label)
        axis.set_yscale("log")
        axis.set_xlabel("memory capacity, GiB")
        axis.set_ylabel("longest trainable sequence, tokens (batch 1)")
        axis.set_title(f"{shape}: predicted context frontier", fontsize=10, loc="left")
        axis.grid(alpha=0.3, which="both")
        # under the panel, off every line and point: with the reference path's lines a panel has no empty corner
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(figure)
    return path


# --- comparison of two runs ------------------------------------------------------------------------------------

#: Relative change beyond which a figure counts as changed (``compare --threshold``).
DEFAULT_THRESHOLD = 0.05
#: Figures compared between runs: (frame column, label, +1 when higher is worse or -1 when lower is worse,
#: whether it derives from the step time, so a noisy timing makes its change unrankable), from the columns the
#: result model declares ``compared``.
COMPARED = [(column.name, column.compared, column.worse, column.timing) for column, _ in FRAME_COLUMNS
            if column.compared]
#: Verdicts of a compared figure; only ``regression`` fails a comparison.
REGRESSION, IMPROVEMENT, UNCHANGED, NOISY = "regression", "improvement", "ok", "noisy"


def _by_cell(frame: pd.DataFrame, side: str) -> dict[tuple[str, str], pd.Series]:
    cells = {}
    for _, row in frame.iterrows():
        key = (row["model"], row["mode"])
        if key in cells:
            raise ValueError(f"{side} holds several results for {key[0]}/{key[1]}: give one run per side")
        cells[key] = row
    return cells


def _flag(value) -> bool:
    """A boolean frame cell that may be missing (NaN in a failed cell's row)."""
    return not is_missing(value) and bool(value)


def _verdict(change: float, worse: int, timing: bool, noisy: bool, threshold: float) -> str:
    if abs(change) <= threshold:
        return UNCHANGED
    if timing and noisy:
        return NOISY
    return REGRESSION if worse * change > 0 else IMPROVEMENT


def _status_row(model: str, mode: str, baseline: pd.Series | None, candidate: pd.Series | None) -> dict | None:
    """A row for a cell that is missing or failed on either side; None when both sides finished."""
    row = {"model": model, "mode": mode, "figure": "status", "column": "status", "baseline": math.nan,
           "candidate": math.nan, "change": math.nan, "noisy": False}
    if candidate is None:
        return {**row, "verdict": "missing", "note": "only in the baseline"}
    if baseline is None:
        return {**row, "verdict": "new", "note": "only in the candidate"}
    before, after = baseline["status"], candidate["status"]
    if before == after == "ok":
        return None
    if before == "ok":
        return {**row, "verdict": REGRESSION, "note": f"candidate {after}: {candidate.get('error')}"[:120]}
    if after == "ok":
        return {**row, "verdict": IMPROVEMENT, "note": f"baseline {before}, candidate ok"}
    return {**row, "verdict": "failed", "note": f"baseline {before}, candidate {after}"}


def compare_frames(baseline: pd.DataFrame, candidate: pd.DataFrame,
                   threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Two runs' ``results_frame``s side by side: one row per (model, mode, compared figure).

    Columns: ``model``, ``mode``, ``figure`` (label), ``column`` (frame column), ``baseline``, ``candidate``,
    ``change`` (candidate / baseline - 1), ``noisy`` (a step time of either run is marked noisy), ``verdict``
    and ``note``. A change beyond ``threshold`` (a fraction: 0.05 = 5 %) in the worse direction (higher peak
    memory, step time or perplexity, lower tokens/s) is a ``regression``; in the other an ``improvement``; a
    timing change is ``noisy`` instead when either run's step time is noisy. A cell that finished in the
    baseline and failed in the candidate is a regression; cells on one side only are ``missing`` or ``new``.
    """
    before, after = _by_cell(baseline, "the baseline"), _by_cell(candidate, "the candidate")
    order = {name: index for index, name in enumerate(MODES)}
    keys = sorted(set(before) | set(after), key=lambda key: (key[0], order.get(key[1], len(order)), key[1]))
    rows = []
    for model, mode in keys:
        status = _status_row(model, mode, before.get((model, mode)), after.get((model, mode)))
        if status is not None:
            rows.append(status)
            continue
        b, c = before[(model, mode)], after[(model, mode)]
        noisy = _flag(b.get("noisy")) or _flag(c.get("noisy"))
        for column, label, worse, timing in COMPARED:
            old, new = b.get(column), c.get(column)
            if is_missing(old) or is_missing(new):
                continue
            change = new / old - 1 if old else (0.0 if new == old else math.inf)
            verdict = _verdict(change, worse, timing, noisy, threshold)
            note = ""
            if column == "peak_gib" and b.get("peak_source") != c.get("peak_source"):
                note = f"read in the {b.get('peak_source')} vs the {c.get('peak_source')}"
            rows.append({"model": model, "mode": mode, "figure": label, "column": column, "baseline": old,
                         "candidate": new, "change": change, "noisy": noisy and timing, "verdict": verdict,
                         "note": note})
    return pd.DataFrame(rows, columns=["model", "mode", "figure", "column", "baseline", "candidate", "change",
                                       "noisy", "verdict", "note"])


def _device_name(result: CellResult) -> str | None:
    """The GPU's name, 'CPU' for a run without one, None when the result does not say."""
    if result.environment:
        return result.environment.gpu.name if result.environment.gpu else "CPU"
    return {"cpu": "CPU"}.get(result.device, result.device)


def _setting(*keys: str, missing_means: str | None = None):
    """A reader of one setting of a result (``missing_means`` stands in for a null, as 'all' for no token cap);
    None when the result does not record it (a declared setting absent from its JSON, or one it lacks)."""
    def read(result: CellResult):
        section = result.settings
        for key in keys[:-1]:
            section = getattr(section, key)
            if section is None:
                return None
        if keys[-1] in section.absent:
            return None
        value = getattr(section, keys[-1])
        return missing_means if value is None else value
    return read


def _tokens_a_step(result: CellResult) -> str | None:
    settings = result.settings
    if settings.batch_size is None or settings.seq_len is None:
        return None
    return f"{settings.batch_size} x {settings.seq_len}"


#: What must match for two runs' figures to be comparable (``compare`` refuses otherwise): label, reader of one
#: result (None: not recorded, left out of the check).
COMPARABLE = [
    ("device", _device_name),
    ("model", model_label),
    ("tokens a step (batch x sequence)", _tokens_a_step),
    ("eval window", _setting("eval_window")),
    ("eval stride", _setting("eval_stride")),
    ("eval max tokens", _setting("eval_max_tokens", missing_means="all")),
    ("training steps", _setting("train", "max_steps")),
    ("timing warm-up steps", _setting("timing_warmup")),
]


def _values(results: list[CellResult], read) -> str:
    return ", ".join(sorted({str(value) for value in map(read, results) if value is not None}))


def run_differences(baseline: list[CellResult | dict], candidate: list[CellResult | dict]) -> list[str]:
    """Why two runs' results cannot be compared figure by figure, one line per difference (empty when they can):
    a different device, model, mode set, tokens a step or protocol (evaluation window, stride and token cap,
    training steps, timing warm-up) changes the figures by itself, and would be reported as a regression."""
    baseline, candidate = as_cells(baseline), as_cells(candidate)
    differences = []
    for label, read in COMPARABLE:
        before, after = _values(baseline, read), _values(candidate, read)
        if before and after and before != after:
            differences.append(f"{label} differs: baseline {before}, candidate {after}")
    order = {name: index for index, name in enumerate(MODES)}
    modes = [sorted({r.mode.name for r in side}, key=lambda m: (order.get(m, len(order)), m))
             for side in (baseline, candidate)]
    if modes[0] != modes[1]:
        differences.append(f"mode set differs: baseline {', '.join(modes[0])}, candidate {', '.join(modes[1])}")
    return differences


def has_regression(comparison: pd.DataFrame) -> bool:
    """True when any compared figure or cell regressed (``compare`` then exits with status 1)."""
    return bool((comparison["verdict"] == REGRESSION).any())


def _comparison_cells(row: pd.Series) -> list[str]:
    formats = {column: fmt for column, _, fmt in COLUMNS}
    fmt = formats.get(row["column"], "{}")
    value = lambda v: "-" if is_missing(v) else fmt.format(v)  # noqa: E731
    change = "-" if is_missing(row["change"]) else f"{row['change']:+.1%}"
    verdict = row["verdict"].upper() if row["verdict"] == REGRESSION else row["verdict"]
    return [row["mode"], row["figure"], value(row["baseline"]), value(row["candidate"]), change,
            verdict + (f" ({row['note']})" if row["note"] else "")]


COMPARISON_HEADERS = ["mode", "figure", "baseline", "candidate", "change", "verdict"]


def comparison_notes(threshold: float) -> list[str]:
    return [f"threshold {threshold:.1%}: a larger change in the worse direction (higher peak memory, step time "
            f"or perplexity; lower tokens/s) is a REGRESSION, in the other direction an improvement.",
            f"noisy: a step time whose IQR exceeds {NOISY_RELATIVE_IQR:.0%} of its median in either run; a "
            f"timing change beyond the threshold is then reported, not ranked."]


def comparison_markdown(comparison: pd.DataFrame, threshold: float, title: str = "qlora-bench comparison",
                        differences: list[str] = ()) -> str:
    """The comparison as Markdown: one table per model, rows grouped by mode, then how to read it; the runs'
    ``differences`` (``run_differences``, when compared anyway) as warnings under the title."""
    lines = [f"# {title}", ""] + [f"**WARNING: {line}; figures may differ for that reason alone.**" for line in
                                  differences] + ([""] if differences else [])
    for model, part in comparison.groupby("model", sort=False):
        lines += [f"## {model}", ""]
        lines += markdown_rows(COMPARISON_HEADERS, [_comparison_cells(row) for _, row in part.iterrows()])
        lines.append("")
    verdict = "regressions flagged" if has_regression(comparison) else "no regression"
    return "\n".join(lines + [f"- {note}" for note in comparison_notes(threshold)] + [f"- Result: {verdict}."]) + "\n"


VERDICT_STYLES = {REGRESSION: "bold red", IMPROVEMENT: "green", NOISY: "yellow", "missing": "yellow",
                  "failed": "red"}


def comparison_rich(comparison: pd.DataFrame, threshold: float, title: str = "qlora-bench comparison"):
    """The comparison for the terminal: one table per model, a section per mode, verdicts in colour."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    tables = []
    for model, part in comparison.groupby("model", sort=False):
        table = Table(title=f"{title}: {model}", box=box.SIMPLE_HEAD)
        for header in COMPARISON_HEADERS:
            table.add_column(header, justify="right" if header in ("baseline", "candidate", "change") else "left")
        rows = list(part.iterrows())
        for index, (_, row) in enumerate(rows):
            cells = _comparison_cells(row)
            last_of_mode = index == len(rows) - 1 or rows[index + 1][1]["mode"] != row["mode"]
            first_of_mode = index == 0 or rows[index - 1][1]["mode"] != row["mode"]
            table.add_row(cells[0] if first_of_mode else "", *cells[1:-1],
                          Text(cells[-1], style=VERDICT_STYLES.get(row["verdict"], "")), end_section=last_of_mode)
        tables.append(table)
    notes = comparison_notes(threshold)
    notes.append("Result: " + ("REGRESSION flagged" if has_regression(comparison) else "no regression"))
    return Group(*tables, Text("\n".join(notes)))
