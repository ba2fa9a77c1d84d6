"""``qlora-bench``: the command line. The only module that reads options; the library takes plain arguments.

    qlora-bench                      sweep every mode on the embedded default model (the main job)
    qlora-bench sweep --modes nf4,nf4-dq --model PATH_OR_HUB_ID ...
    qlora-bench report runs/latest   render tables (terminal, Markdown, CSV) and plots from result JSON
    qlora-bench compare runs/old runs/new --threshold 0.05   flag regressions between two runs (exit 1 if any)
    qlora-bench finetune --mode nf4-dq --out runs/ft   the classic bitsandbytes + LoRA fine-tuning workflow
    qlora-bench generate --mode nf4-dq --adapter runs/ft/adapter          reload base + adapter, generate
    qlora-bench merge --mode nf4-dq --adapter runs/ft/adapter --out merged  standalone bf16 model, checked
    qlora-bench frontier --shapes Llama-3.1-8B --capacity-gib 24,48,80   predicted longest trainable sequence
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_core import settings
from qlora_core.backends.bitsandbytes import check_int8_matmul
from qlora_core.cell import CellSettings
from qlora_core.levers import Levers
from qlora_core.lora import LoraSettings
from qlora_core.modes import MODES, UnknownModeError, installed_modes, parse_modes
from qlora_core.noise import each_warning_once
from qlora_core.paths import PATHS
from qlora_core.profiles import PROFILES
from qlora_core.report import DEFAULT_THRESHOLD
from qlora_core.result_model import CellResult
from qlora_core.results import ALLOCATOR_CONF_VARIABLES
from qlora_core.shapes import SHAPES

if TYPE_CHECKING:  # for the annotations that name it; the functions import torch where they use it
    import torch

#: The CUDA allocator configuration frontier probes run under (``--allocator-conf``): segments that grow in place
#: instead of fragmenting, so a capacity holds close to what the memory floor predicts (H200, 2026-12-03: under
#: PyTorch's defaults the predicted lengths ran out of memory with a GiB or more reserved but unallocated).
FRONTIER_ALLOCATOR_CONF = "expandable_segments:True"
SUBCOMMANDS = ("sweep", "report", "compare", "finetune", "generate", "merge", "frontier")


def default_modes(profile: str) -> list:
    """Every mode this installation can run (``installed_modes``), but fp16-compute ones in the CPU profile (a CPU
    step took 44 s vs 3 s in bf16)."""
    import torch

    modes = installed_modes()
    return modes if profile == "gpu" else [m for m in modes if m.torch_compute_dtype != torch.float16]


def not_installed_line() -> str | None:
    """One line naming the registered modes that 'all' and the default leave out because their backend's package
    is missing, and what installs it; None when every mode can run."""
    from qlora_core import backends

    installed = installed_modes()
    missing = [mode for mode in MODES.values() if mode not in installed]
    if not missing:
        return None
    packages = sorted({backends.backend_of(mode).package for mode in missing})
    return (f"left out (not installed: {', '.join(packages)}): {', '.join(m.name for m in missing)}; "
            f"README.md says how to install them")


def _add_settings(surface: str, sections: dict) -> None:
    """The declared settings ``surface`` takes (``settings.SETTINGS``) whose help group is in ``sections``, each
    added to its section (a parser or an argument group)."""
    for setting in settings.on(surface):
        if setting.group in sections:
            sections[setting.group].add_argument(*setting.option_strings(surface), **setting.option_kwargs(surface))


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    mode_list = ", ".join(MODES)
    model = parser.add_argument_group("model and modes")
    _add_settings("sweep", {"source": model})
    model.add_argument("--shape", default=None, choices=list(SHAPES),
                       help="instead of --model: a named architecture built with random weights straight into each "
                            "mode (memory and time only, no perplexity; no download)")
    model.add_argument("--modes", default=None,
                       help=f"comma-separated modes, or 'all' ({mode_list}: those whose backend is installed); "
                            "default: all on a GPU, all but fp16-compute modes on a CPU (CPUs have no fast fp16 "
                            "matmul: a step took 15x longer)")
    model.add_argument("--profile", choices=sorted(PROFILES),
                       help="defaults for the options below that say 'from the profile': 'gpu' (full) or 'cpu' "
                            "(short); default: gpu when CUDA is available")
    train = parser.add_argument_group("training")
    data = parser.add_argument_group("data and evaluation")
    _add_settings("sweep", {"model": model, "training": train, "lora": train, "data": data})

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None,
                        help="folder for per-mode result JSON and logs (default runs/<UTC time>)")
    output.add_argument("--resume", action="store_true", help="skip modes whose result in --out finished")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-bench",
        description="What each weight quantization mode costs and loses when you fine-tune a causal LM with "
                    "LoRA: weights and peak memory, step time, tokens/s and perplexity before and after, "
                    "each mode measured in a fresh process. With no sub-command, runs 'sweep'.",
        epilog=f"modes (--modes): {', '.join(MODES)}; 'qlora-bench sweep --help' lists every sweep option",
    )
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sweep = commands.add_parser("sweep", help="measure modes and print the comparison table (default)")
    _add_sweep_arguments(sweep)
    report = commands.add_parser("report", help="render tables and plots from result JSON files or folders")
    report.add_argument("paths", nargs="+", type=Path,
                        help="result .json files (cell results, bench/'s pytest-benchmark JSON, the classic "
                             "workflow's records, frontier's frontier.json) or folders of them")
    report.add_argument("--out", type=Path, help="also write report.md, report.csv and report.png here (workflow.csv, "
                                                 "frontier.csv and frontier.png for workflows and frontiers)")
    compare = commands.add_parser("compare", help="compare two runs figure by figure; exit 1 when one regressed "
                                                  "beyond --threshold")
    compare.add_argument("baseline", type=Path, help="the reference run: a result .json file or a folder of them")
    compare.add_argument("candidate", type=Path, help="the run to judge: a result .json file or a folder of them")
    compare.add_argument("--threshold", type=settings.fraction, default=DEFAULT_THRESHOLD,
                         help=f"relative change that counts, as a fraction (default {DEFAULT_THRESHOLD})")
    compare.add_argument("--out", type=Path, help="also write comparison.md and comparison.csv here")
    compare.add_argument("--force", action="store_true",
                         help="compare runs whose device, model, modes, tokens a step or protocol differ (refused "
                              "otherwise), with a warning per difference")
    _add_workflow_commands(commands)
    _add_frontier_command(commands)
    return parser


def _capacities(text: str) -> list[float]:
    return [settings.positive_float(part) for part in text.split(",")]


def _add_frontier_command(commands) -> None:
    frontier = commands.add_parser(
        "frontier", help="predict the longest sequence a training step can take (batch 1) under memory capacities",
        description="For each shape, mode and path, the longest sequence (batch 1, gradient checkpointing, LoRA on "
                    "all linears) whose peak the memory floor predicts to fit each capacity, and what one more "
                    "token costs there. Predictions of allocated bytes: the allocator's slack comes on top. Nothing "
                    "is loaded; no GPU is needed.")
    frontier.add_argument("--shapes", required=True, type=lambda text: text.split(","),
                          help=f"comma-separated named shapes: {', '.join(SHAPES)}")
    frontier.add_argument("--modes", default="all",
                          help="comma-separated modes, or 'all' (those whose backend is installed)")
    frontier.add_argument("--paths", default=",".join(PATHS), type=lambda text: text.split(","),
                          help="comma-separated training paths (default: both)")
    frontier.add_argument("--capacity-gib", default="24,48,80", type=_capacities,
                          help="comma-separated memory capacities in GiB (default 24,48,80)")
    _add_settings("frontier", {"lora": frontier})  # the rank, then the lean path's levers, as the sweep takes them
    _add_settings("frontier", {"training": frontier})
    frontier.add_argument("--host-memory-gib", type=settings.positive_float,
                          help="with --offload-activations: host memory the offloaded activations may take, in GiB "
                               "(they bound the frontier there: 'host memory'); default: no bound. Leave a margin "
                               "below the machine's RAM for the process itself. With --offload-host-gib no such "
                               "bound: what does not fit the cap stays on the GPU")
    frontier.add_argument("--beyond-positions", action="store_true",
                          help="let memory alone bound the frontier, past the positions the model was trained for "
                               "(max_position_embeddings; RoPE computes any position): how published context "
                               "records are counted. Probe cells then run past them too")
    frontier.add_argument("--out", type=Path, help="also write frontier.json and frontier.png (tokens by capacity, "
                                                   "with others' published figures marked as claims) here")
    frontier.add_argument("--measure", action="store_true",
                          help="check each frontier on the device: shape cells at batch 1 under the capacity as a "
                               "hard cap on the CUDA allocator, at the predicted length (should run), 5 %% above "
                               "it (should run out of memory) and at half (for the measured cost of a token); "
                               "needs --out, where the cells go to probes/")
    _add_settings("frontier", {"model": frontier})  # --device, where the probe cells run
    frontier.add_argument("--resume", action="store_true",
                          help="with --measure: keep probe cells that finished; frontier.json then holds every "
                               "probe of these frontiers finished in --out, those of earlier calls too")
    frontier.add_argument("--probes", default="half,at,above", type=lambda text: text.split(","),
                          help="with --measure: which probes to run, of half, at and above (default all): a probe "
                               "at an 80 GiB frontier can take minutes, so long ones can go one command each, "
                               "the later ones with --resume; frontier.json says 'not run' for those not run yet")
    frontier.add_argument("--allocator-conf", default=FRONTIER_ALLOCATOR_CONF,
                          help="with --measure: PYTORCH_CUDA_ALLOC_CONF for the probe cells' processes (default "
                               f"'{FRONTIER_ALLOCATOR_CONF}': the cap holds what the allocator reserves, the "
                               "prediction what it allocates, and PyTorch's default allocator fragments by a GiB "
                               "or more at these lengths; '' measures under the default; recorded in each "
                               "probe's environment)")


def _add_workflow_model_arguments(parser: argparse.ArgumentParser, surface: str) -> None:
    """Options shared by finetune, generate and merge (``surface``): which base, stored how, on which device."""
    parser.add_argument("--mode", required=True, choices=list(MODES),
                        help="how the frozen base weights are stored (the benchmark's recommendation)")
    _add_settings(surface, {"source": parser, "model": parser})


def _add_workflow_commands(commands) -> None:
    """The fine-tuning workflow's sub-commands. Unset training and LoRA options take the library's defaults (the
    tutorial's profile: ``trainer.FinetuneSettings`` and ``lora.LoraSettings``), which their help shows."""
    finetune = commands.add_parser("finetune", help="fine-tune with LoRA on a base stored in a mode (the tutorial's "
                                                    "workflow), with resumable adapter-only checkpoints")
    _add_workflow_model_arguments(finetune, "finetune")
    finetune.add_argument("--out", type=Path, required=True,
                          help="folder for checkpoint-N/, the final adapter/ and summary.json")
    finetune.add_argument("--resume", action="store_true",
                          help="continue from the last complete checkpoint in --out (half-written ones are deleted)")
    train = finetune.add_argument_group("training (default: the tutorial's profile)")
    lora = finetune.add_argument_group("LoRA (default: the tutorial's)")
    _add_settings("finetune", {"training": train, "lora": lora, "data": finetune})
    _add_settings("finetune", {"generation": finetune})

    generate = commands.add_parser("generate", help="reload the base in a mode with an adapter and generate")
    _add_workflow_model_arguments(generate, "generate")
    generate.add_argument("--adapter", type=Path, required=True, help="an adapter folder or a checkpoint-N folder")
    _add_settings("generate", {"generation": generate})

    merge = commands.add_parser("merge", help="merge an adapter into a bf16 base, save a standalone model and "
                                              "check its perplexity against base + adapter")
    _add_workflow_model_arguments(merge, "merge")
    merge.add_argument("--adapter", type=Path, required=True, help="an adapter folder or a checkpoint-N folder")
    merge.add_argument("--out", type=Path, required=True, help="folder for the merged model (written atomically)")
    merge.add_argument("--original-base", action="store_true",
                       help="merge into the checkpoint's own weights instead of the mode's dequantized ones "
                            "(which the adapter was trained on)")
    merge.add_argument("--into-quantized", action="store_true",
                       help="also merge into the still-quantized base and report how much that loses")
    merge.add_argument("--check-data", default="quotes", help="rows whose tokens the perplexity check reads")
    _add_settings("merge", {"data": merge})  # --text-field, of the --check-data rows
    merge.add_argument("--check-tokens", type=settings.positive, help="tokens the perplexity check scores (default 1024)")


def cell_settings(args: argparse.Namespace, profile_name: str) -> CellSettings:
    """The parsed sweep options over profile ``profile_name``'s defaults, as the library's settings object."""
    values = settings.with_profile(settings.parsed_values(args, "sweep"), profile_name)
    return settings.cell_settings(values, mode="bf16", shape=args.shape)


def training_tokens(profile: dict) -> int:
    """Tokens one cell trains on under ``profile``'s defaults."""
    return profile["steps"] * profile["batch_size"] * profile["seq_len"]


def check_profile(profile_name: str, device) -> None:
    """Refuse the GPU profile off CUDA: on a CPU it silently ran for hours what the CPU profile does in minutes."""
    if profile_name == "gpu" and device.type != "cuda":
        ratio = training_tokens(PROFILES["gpu"]) / training_tokens(PROFILES["cpu"])
        raise ValueError(f"--profile gpu needs a CUDA device, not {device.type}: it trains on {ratio:.0f}x the "
                         f"tokens of the cpu profile (hours instead of minutes); use --profile cpu")


#: A compute dtype this many times slower than float32 on the CPU makes the CPU profile's minutes far longer.
SLOW_DTYPE_FACTOR = 10


def slow_compute_warning(device, modes, slowdown: Callable[[torch.dtype], float]) -> str | None:
    """A warning when the sweep runs on a CPU that emulates a compute dtype of its modes (``slowdown``: times
    slower than float32, ``measure.timing.cpu_matmul_slowdown``); None otherwise."""
    import torch

    if device.type != "cpu":
        return None
    for dtype in sorted({mode.torch_compute_dtype for mode in modes}, key=str):
        if dtype != torch.float32 and (factor := slowdown(dtype)) > SLOW_DTYPE_FACTOR:
            return (f"this CPU runs {str(dtype).removeprefix('torch.')} matmuls {factor:.0f}x slower than float32 "
                    f"(no native instructions for it): the modes computing in it will take far longer than the "
                    f"cpu profile's few minutes")
    return None


def failure_lines(results: list[dict]) -> list[str]:
    """One line per cell that did not finish: its mode, status and full reason (line breaks made spaces)."""
    return [f"{r['mode']['name']}: {r['status']}: {' '.join(str(r.get('error')).split())}"
            for r in results if r["status"] != "ok"]


def interrupted(out: Path, modes: list) -> int:
    """After Ctrl-C: say how far the sweep got and how to go on; the exit code of a SIGINT (130)."""
    from qlora_core.sweep import finished, result_path

    done = sum(finished(result_path(out, mode)) for mode in modes)
    print(f"interrupted: {done} of {len(modes)} cells finished in {out}; rerun with --resume", file=sys.stderr)
    return 130


def command_sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qlora_core.cell import preflight, resolve_device
    from qlora_core.measure.timing import cpu_matmul_slowdown
    from qlora_core.progress import SweepProgress
    from qlora_core.report import rich_table
    from qlora_core.results import check_writable
    from qlora_core.sweep import run_sweep

    console = Console()
    device = resolve_device(args.device)
    profile_name = args.profile or ("gpu" if device.type == "cuda" else "cpu")
    check_profile(profile_name, device)
    modes = parse_modes(args.modes) if args.modes is not None else default_modes(profile_name)
    base = cell_settings(args, profile_name)
    out = args.out or Path("runs") / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    check_writable(out)
    with console.status("checking model, data and settings"):
        inputs = preflight(base, modes)
    console.print(f"[bold]qlora-bench[/] profile [cyan]{profile_name}[/], {len(modes)} modes, results in {out}")
    if args.modes in (None, "all") and (line := not_installed_line()):
        console.print(line)
    if warning := slow_compute_warning(device, modes, cpu_matmul_slowdown):
        console.print(f"[yellow]warning:[/] {warning}")
    try:
        with SweepProgress(console, modes, base.train.max_steps) as progress:
            results = run_sweep(base, modes, out, resume=args.resume, on_event=progress.update, inputs=inputs,
                                command=args.command_line)
    except KeyboardInterrupt:
        return interrupted(out, modes)
    console.print(rich_table(results, title=f"qlora-bench: {out}"))
    _print_detail_tables(console, results)
    for line in failure_lines(results):
        print(line)  # plain print: rich would cut a long reason at the terminal's width
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _print_detail_tables(console, results: list[dict]) -> None:
    """The memory floor against the measurements and the step profiles, where results carry them."""
    from qlora_core.report import floor_rich_table, profile_rich_table

    for table in (floor_rich_table(results), profile_rich_table(results)):
        if table is not None:
            console.print(table)


def _read(paths: list[Path], records: bool = False):
    """Everything under ``paths`` (``results.Reading``), each unusable file warned about on stderr (path and
    reason, one line each) and a one-line summary of what was read; no cell at all (nor, with ``records``, any
    ``finetune`` summary or context frontier) is a user error."""
    from qlora_core.results import describe_reading, read_paths

    reading = read_paths(paths)
    for file, reason in reading.skipped:
        print(f"qlora-bench: warning: skipped {file}: {reason}", file=sys.stderr)
    if not reading.results and not (records and (reading.finetunes or reading.frontiers)):
        skipped = f" ({len(reading.skipped)} unusable files skipped)" if reading.skipped else ""
        raise ValueError(f"no qlora-bench results in {', '.join(map(str, paths))}{skipped}")
    print(describe_reading(reading, paths))
    return reading


def command_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qlora_core import frontier_table, workflow_table
    from qlora_core.report import rich_table, run_lines
    from qlora_core.results import check_writable

    if args.out:
        check_writable(args.out)
    reading = _read(args.paths, records=True)
    results = reading.results
    workflows = workflow_table.workflow_frame(reading.finetunes, reading.merges) if reading.finetunes else None
    frontiers = frontier_table.frontier_frame(reading.frontiers, results) if reading.frontiers else None
    console = Console()
    if results:
        console.print(rich_table(results))
        _print_detail_tables(console, results)
    for line in run_lines(reading.runs):
        print(line)  # plain print: rich would take a command's [brackets] for markup
    if workflows is not None:
        console.print(workflow_table.rich_table(workflows))
    if frontiers is not None:
        console.print(frontier_table.rich_table(frontiers))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        written = _write_cell_report(results, reading.runs, args.out) if results else []
        if workflows is not None:
            written += _write_workflow_report(workflows, args.out, after=bool(written))
        if frontiers is not None:
            written += _write_frontier_report(frontiers, reading.frontiers, args.out, after=bool(written))
        print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0


def _write_section(out: Path, title: str, body: str, *, after: bool) -> list[str]:
    """``body`` as the section ``title`` of ``out/report.md``: appended to the report written before it when
    ``after``, else a document of its own; returns ``["report.md"]`` when it started the document."""
    document = out / "report.md"
    opening = document.read_text() + "\n" if after else "# qlora-bench report\n\n"
    document.write_text(f"{opening}## {title}\n\n{body}")
    return [] if after else ["report.md"]


def _write_workflow_report(workflows, out: Path, *, after: bool) -> list[str]:
    """The classic workflow's table as a section of ``out/report.md`` (``_write_section``) and as
    ``out/workflow.csv``; returns the names written."""
    from qlora_core import workflow_table

    workflows.to_csv(out / "workflow.csv", index=False)
    return _write_section(out, "Classic workflow", workflow_table.markdown(workflows), after=after) + ["workflow.csv"]


def _write_frontier_report(frame, frontiers: list[dict], out: Path, *, after: bool) -> list[str]:
    """The context frontier's table (``frame``, of ``frontiers``) as a section of ``out/report.md``
    (``_write_section``), as ``out/frontier.csv``, and every frontier in one ``out/frontier.png``; returns the
    names written."""
    from qlora_core import frontier_table
    from qlora_core.report import frontier_plot

    plot = frontier_plot(frontiers, out / "frontier.png").name
    frame.to_csv(out / "frontier.csv", index=False)
    body = frontier_table.markdown(frame, plot_png=plot)
    return _write_section(out, "Context frontier", body, after=after) + ["frontier.csv", plot]


def _write_cell_report(results: list[CellResult], runs: list[dict], out: Path) -> list[str]:
    """report.md, report.csv, report.png (when a cell finished) and memory.png (when a cell carries a floor)
    into ``out``; returns the names written."""
    from qlora_core.report import markdown_report, memory_plot, plot, results_frame

    memory = memory_plot(results, out / "memory.png")  # None: no result carries a floor
    memory_png = memory.name if memory else None
    (out / "report.md").write_text(markdown_report(results, runs=runs, memory_png=memory_png))
    results_frame(results).to_csv(out / "report.csv", index=False)
    written = ["report.md", "report.csv"]
    if any(result.status == "ok" for result in results):  # failures alone have nothing to plot
        plot(results, out / "report.png")
        written.append("report.png")
    if memory_png:
        written.append(memory_png)
    return written


def command_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qlora_core.report import (comparison_markdown, comparison_rich, compare_frames, has_regression,
                                   results_frame, run_differences)
    from qlora_core.results import check_writable

    if args.out:
        check_writable(args.out)
    baseline, candidate = (_read([path]).results for path in (args.baseline, args.candidate))
    differences = run_differences(baseline, candidate)
    for line in differences:
        print(f"qlora-bench: {'warning' if args.force else 'error'}: {line}", file=sys.stderr)
    if differences and not args.force:
        print("qlora-bench: error: these runs are not comparable; --force compares them anyway", file=sys.stderr)
        return 2
    comparison = compare_frames(results_frame(baseline), results_frame(candidate), args.threshold)
    title = f"qlora-bench: {args.candidate} against {args.baseline}"
    Console().print(comparison_rich(comparison, args.threshold, title=title))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "comparison.md").write_text(comparison_markdown(comparison, args.threshold, title=title,
                                                                    differences=differences))
        comparison.to_csv(args.out / "comparison.csv", index=False)
        print(f"wrote {args.out}/comparison.md, comparison.csv")
    return 1 if has_regression(comparison) else 0


def _given(args: argparse.Namespace, names) -> dict:
    """The options among ``names`` the user set (the rest keep the library's defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _workflow_source(args: argparse.Namespace):
    from qlora_core.cell import resolve_device
    from qlora_core.models import resolve_model
    from qlora_core.modes import get_mode

    source = resolve_model(args.model, gguf_path=args.gguf, trust_remote_code=args.trust_remote_code)
    return source, get_mode(args.mode), resolve_device(args.device)


def command_finetune(args: argparse.Namespace) -> int:
    import json

    from qlora_core import workflow
    from qlora_core.results import check_writable

    check_writable(args.out)
    # settings first: an impossible one is refused before the model is resolved (a download for a hub id)
    train, lora, call = settings.finetune_arguments(settings.parsed_values(args, "finetune"))
    source, mode, device = _workflow_source(args)
    try:
        run = workflow.finetune(source, mode, args.out, device=device, settings=train, lora=lora, resume=args.resume,
                                **call)
    except workflow.RunAlreadyFinished as finished:
        print(finished)  # exit 0: resuming a finished run leaves it finished, as a retry loop expects
        return 0
    summary = run.summary
    counts = summary["parameters"]
    print(f"trainable params: {counts['trainable_params']:,} || all params: {counts['total_params']:,} || "
          f"trainable%: {100 * counts['trainable_params'] / counts['total_params']:.4f}")
    print(json.dumps({key: summary["training"][key] for key in ("losses", "wall_s", "resumed_from")}))
    print(summary["sample"]["prompt"] + summary["sample"]["completion"])
    print(f"wrote {args.out}/{workflow.SUMMARY_NAME}, adapter in {summary['adapter_dir']}")
    return 0


def command_generate(args: argparse.Namespace) -> int:
    from qlora_core import workflow

    source, mode, device = _workflow_source(args)
    options = _given(args, ["prompt", "max_new_tokens"])
    completion = workflow.generate_from_adapter(source, mode, args.adapter, device=device, **options)
    print(options.get("prompt", workflow.TUTORIAL_PROMPT) + completion)
    return 0


def command_merge(args: argparse.Namespace) -> int:
    import json

    from qlora_core import workflow
    from qlora_core.results import check_writable

    check_writable(args.out)
    source, mode, device = _workflow_source(args)
    report = workflow.merge_and_report(
        source, mode, args.adapter, args.out, device=device,
        base="original" if args.original_base else "dequantized",
        check_data=args.check_data, text_field=args.text_field, into_quantized=args.into_quantized,
        **_given(args, ["check_tokens"]),
    )
    summary = {"merged": report["merged"]["name_or_path"], "tolerance": report["tolerance"],
               "relative_delta": report["merged"]["relative_delta"],
               "merged_into_quantized": report["merged_into_quantized"]}
    print(json.dumps(summary, indent=2))
    return 0 if report["tolerance"]["within"] else 1


def command_frontier(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from qlora_core.frontier_probes import check_probes
    from qlora_core.measure.frontier import predicted_frontier
    from qlora_core.paths import check_path
    from qlora_core.report import frontier_plot
    from qlora_core.results import FRONTIER_SCHEMA, check_writable, environment, write_json_atomic
    from qlora_core.shapes import check_shape, random_weights_int8_outliers, shape_config
    from qlora_core.units import GIB, MIB

    if args.measure and not args.out:
        raise ValueError("--measure needs --out: its probe cells and frontier.json go there")
    if args.out:
        check_writable(args.out)
    check_probes(args.probes)
    modes, paths = parse_modes(args.modes), [check_path(path) for path in args.paths]
    lora = LoraSettings(r=args.lora_r)
    levers = Levers(args.offload_activations, args.mlp_tile_tokens, args.offload_host_gib, args.int8_matmul)
    for mode in modes:
        check_int8_matmul(levers.int8_matmul, mode)
    host_bytes = int(args.host_memory_gib * GIB) if args.host_memory_gib else None
    for path in paths:
        levers.check(path, gradient_checkpointing=True)
    table = Table(title="predicted context frontier (batch 1; allocated bytes, allocator slack not included)")
    for header in ("shape", "mode", "path", "cap GiB", "tokens", "bound", "peak GiB", "MiB/token"):
        table.add_column(header, justify="left" if header in ("shape", "mode", "path") else "right", no_wrap=True)
    frontiers = []
    for shape in args.shapes:
        config = shape_config(check_shape(shape))
        outliers = random_weights_int8_outliers(config)  # the probes run random weights
        for mode in modes:
            mode_outliers = outliers if mode.int8_threshold is not None else None  # LLM.int8's alone
            for path in paths:
                for gib in args.capacity_gib:
                    found = {"shape": shape, **predicted_frontier(
                        config, mode, lora, int(gib * GIB), path, levers=levers,
                        beyond_positions=args.beyond_positions, host_capacity_bytes=host_bytes,
                        int8_outlier_columns=mode_outliers)}
                    frontiers.append(found)
                    slope = found["bytes_per_token"]
                    cost = "-" if slope is None else f"{slope / MIB:.3f}"
                    table.add_row(shape, mode.name, path, f"{gib:g}", f"{found['tokens']:,}", found["limited_by"],
                                  f"{found['peak_bytes'] / GIB:.2f}", cost)
    Console().print(table)
    kind = "prediction (measure.floor), not a measurement"
    if args.measure:
        frontiers = _measure_frontiers(frontiers, lora, args)
        kind = "prediction (measure.floor), each checked by probe cells on the device (probes/)"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        document = {"schema": FRONTIER_SCHEMA, "kind": kind, "command": args.command_line, "lora": lora.describe(),
                    "probe_allocator_conf": args.allocator_conf or None if args.measure else None,
                    "frontiers": frontiers, "environment": environment()}
        print(f"wrote {write_json_atomic(document, args.out / 'frontier.json')}, "
              f"{frontier_plot(frontiers, args.out / 'frontier.png')}")
    return 0


def _measure_frontiers(frontiers: list[dict], lora: LoraSettings, args: argparse.Namespace) -> list[dict]:
    """Run every frontier's probe cells (``frontier_probes``) into ``--out/probes`` (checked to be given) and
    return the frontiers with what they measured, printed one line each."""
    from qlora_core.frontier_probes import (PROBE_OUTCOMES, finished_probes, measured_over_predicted, probe_cells,
                                            with_probes)
    from qlora_core.sweep import run_cells
    from qlora_core.units import GIB, MIB

    cells = {name: cell for found in frontiers
             for name, cell in probe_cells(found, lora, args.device, args.probes, args.trace_memory).items()}
    with allocator_conf_for_children(args.allocator_conf):
        done = run_cells(cells, args.out / "probes", resume=args.resume, command=args.command_line,
                         kept=PROBE_OUTCOMES)  # a probe out of memory is measured: not run again
    earlier = {} if not args.resume else finished_probes(frontiers, lora, args.out / "probes", args.device,
                                                         args.trace_memory)
    results = {**earlier, **dict(zip(cells, done))}
    measured = [with_probes(found, results) for found in frontiers]
    for found in measured:
        statuses = ", ".join(f"{probe} {p['tokens']:,}: {p['status']}" for probe, p in found["probes"].items())
        slope, ratio = found["measured_bytes_per_token"], measured_over_predicted(found)
        cost = "not measured" if slope is None else f"{slope / MIB:.3f} MiB/token measured"
        if ratio is not None:
            cost += f", {ratio:.3f} x predicted over the same span"
        print(f"{found['shape']} {found['mode']} {found['path']} {found['capacity_bytes'] / GIB:g} GiB: "
              f"{'confirmed' if found['confirmed'] else 'NOT confirmed'} ({statuses}; {cost})")
    return measured


@contextlib.contextmanager
def allocator_conf_for_children(conf: str):
    """``PYTORCH_CUDA_ALLOC_CONF`` set to ``conf`` (unset when empty) for the processes started inside, which read
    it when their CUDA allocator starts; this process's own variables are put back after."""
    saved = {name: os.environ.pop(name) for name in ALLOCATOR_CONF_VARIABLES if name in os.environ}
    if conf:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
    try:
        yield
    finally:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        os.environ.update(saved)


COMMANDS = {"sweep": command_sweep, "report": command_report, "compare": command_compare,
            "finetune": command_finetune, "generate": command_generate, "merge": command_merge,
            "frontier": command_frontier}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["sweep", *argv]
    args = build_parser().parse_args(argv)
    args.command_line = ["qlora-bench", *argv]  # what a run's manifest records
    try:
        with each_warning_once():
            return COMMANDS[args.command](args)
    except (UnknownModeError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"qlora-bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a sweep's cells (a sweep says more itself)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
