"""One LoRA trainer for every mode, driven step by step so a benchmark can time each step.

The mode enters only through ``compute_dtype`` (autocast) and the model it was loaded into; nothing here
branches on a mode's name. The step runs through ``accelerate.Accelerator`` (``distributed.make_accelerator``):
in one process that changes nothing (the same losses and weights, bit for bit); in several processes of one
host (``distributed.launch``) each rank trains on its share of every global batch (``data.rank_rows``), the
ranks sharing the training as a ``strategies`` strategy says (DDP: the adapters' gradients all-reduced; FSDP:
every parameter sharded).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_core.backends.bitsandbytes import LLM_INT8
from qlora_core.data import rank_rows
from qlora_core.distributed import make_accelerator
from qlora_core.levers import Levers
from qlora_core.measure.timing import timed
from qlora_core.optimizers import OPTIMIZERS, check_optimizer
from qlora_core.paths import check_path
from qlora_core.strategies import check_strategy, decoder_layers, forwards_outside_training, gradient_sync, wrap

if TYPE_CHECKING:
    from qlora_core.modes import Mode

#: torch.compile's modes (``torch.compile(mode=...)``): ``reduce-overhead`` replays each compiled graph as a CUDA
#: graph, one launch for its kernels, which a small model's launch-bound step needs (the GPU idles between
#: kernels otherwise); ``max-autotune`` benchmarks kernel choices too, and with CUDA graphs unless
#: ``-no-cudagraphs``. On a CPU there are no CUDA graphs: inductor skips them.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes that capture CUDA graphs: their outputs live in the graph's memory pool, overwritten by the next
#: replay, so a loss kept past the next micro-batch must be copied out.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


#: What torch.compile compiles (``compiled_if``): ``step``, the micro-batch's whole loss, forward and backward, as
#: few graphs as it can (fewest launches, and under CUDA graphs a replay or two a step, but its compile grows
#: with the depth: dynamo traces every layer); ``layers``, each decoder layer on its own (PyTorch's "regional
#: compilation"), the layers sharing their compiled graphs (two: the first layer's, whose input needs no
#: gradient, and the others'), so the compile is a layer's whatever the depth, and the embeddings, head and loss
#: stay eager. Not under CUDA graphs: torch's CUDA graph trees fail on checkpointed layers captured one by one
#: (an H100 with torch 2.11, 2026-12-07: "graph recording observed an input tensor deallocate during graph
#: recording that did not occur during replay"), and the large models the scope is for are not launch-bound.
COMPILE_SCOPES = ("step", "layers")


def check_compile(compile: bool, mode: str, scope: str) -> str | None:
    """What ``torch.compile(mode=...)`` takes for ``mode`` (None: its default); ValueError for a mode it does not
    have (``COMPILE_MODES``), a scope not in ``COMPILE_SCOPES``, either asked for without ``compile``, or the
    ``layers`` scope with CUDA graphs."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"unknown compile scope {scope!r}; choose from {', '.join(COMPILE_SCOPES)}")
    if mode != "default" and not compile:
        raise ValueError(f"compile mode {mode!r} needs compile (--compile)")
    if scope != "step" and not compile:
        raise ValueError(f"compile scope {scope!r} needs compile (--compile)")
    if scope == "layers" and mode in CUDA_GRAPH_MODES:
        raise ValueError(f"compile scope 'layers' cannot take compile mode {mode!r}: CUDA graphs of checkpointed "
                         f"layers fail in torch's CUDA graph trees; use mode default or "
                         f"max-autotune-no-cudagraphs, or scope step")
    return None if mode == "default" else mode


SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; one optimizer step consumes ``grad_accum`` micro-batches.

    ``optimizer_state_upfront``: make the optimizer's state when the trainer is built
    (``LoraTrainer.make_optimizer_state``) rather than in the first step, so the first step holds everything a
    later one does: a probe of one step then measures a whole step's peak memory (``frontier_probes``).
    """

    learning_rate: float = 2e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    max_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0
    optimizer_state_upfront: bool = False

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.max_steps < 0:  # 0: a cell that loads, evaluates and sets up without training
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")

    def describe(self) -> dict:
        return asdict(self)


#: The shortest row that trains anything: one token to read, one to predict.
MIN_ROW_TOKENS = 2


@dataclass(frozen=True)
class FinetuneSettings:
    """The classic workflow's (``workflow.finetune``) settings: the tutorial's ``TrainingArguments`` as the default
    profile. Kept here beside ``TrainSettings`` (not in ``workflow``, which imports transformers' ``Trainer``), so
    the command line shows these defaults in its help without that import.

    Attributes:
        batch_size: rows per device per micro-batch. grad_accum: micro-batches per optimizer step.
        warmup_steps / max_steps: optimizer steps. learning_rate: peak of the linear schedule.
        logging_steps: log (and record) the loss every this many steps. save_steps: checkpoint interval (steps).
        max_length: tokens per row; longer rows are truncated (the tutorial tokenizes each quote whole).
        optim: a name of ``optimizers.OPTIMIZERS`` (the sweep's vocabulary: ``adamw``, ``paged_adamw8bit``...),
            given to the Trainer as transformers' name for the same optimizer.
        gradient_checkpointing: recompute activations in the backward pass (the tutorial's k-bit recipe).
        seed: model init, data order and dropout.
        profile_steps: run the last this many steps under ``torch.profiler`` (``ProfiledSteps``) and leave them
            out of the step-time statistics (the profiler slows them); 0: none. Not in the tutorial.
        path: ``"reference"`` (the tutorial's: peft's k-bit preparation, the model's own loss) or ``"lean"``
            (``qlora_core.paths``: no upcasts, compute-dtype adapters, the loss in chunks), mixed precision on
            every device (the lean adapters take their input as autocast gives it).
        compile: each micro-batch's loss, forward and backward, through torch.compile (``workflow.WorkflowTrainer``):
            the first step compiles, and a micro-batch of a padded length not seen before compiles again. Not in
            the tutorial.
        compile_mode: torch.compile's mode (``COMPILE_MODES``; ``reduce-overhead``: CUDA graphs), with ``compile``
            only.
        compile_scope: what is compiled (``COMPILE_SCOPES``: the step, or each decoder layer), with ``compile``
            only.
        int8_matmul: on the lean path, how the int8 mode's linears compute (``levers``: LLM.int8's kernel, or their
            weight dequantized). Not in the tutorial.
    """

    batch_size: int = 2
    grad_accum: int = 4
    warmup_steps: int = 5
    max_steps: int = 20
    learning_rate: float = 2e-4
    logging_steps: int = 1
    save_steps: int = 10
    max_length: int = 256
    optim: str = "adamw"
    gradient_checkpointing: bool = True
    seed: int = 0
    profile_steps: int = 0
    path: str = "reference"
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "step"
    int8_matmul: str = LLM_INT8

    def __post_init__(self) -> None:
        check_path(self.path)
        check_compile(self.compile, self.compile_mode, self.compile_scope)
        self.levers.check(self.path, self.gradient_checkpointing)
        for name in ("batch_size", "grad_accum", "max_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < MIN_ROW_TOKENS:
            # A causal LM predicts each token from those before it: a one-token row has no target, so training
            # would report loss 0 and grad-norm 0 and change nothing.
            raise ValueError(f"max_length must be >= {MIN_ROW_TOKENS} (a row of one token has nothing to predict "
                             f"and trains nothing), got {self.max_length}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.profile_steps < self.max_steps:
            raise ValueError(f"profile_steps must be >= 0 and leave a step unprofiled (max_steps {self.max_steps}), "
                             f"got {self.profile_steps}")
        check_optimizer(self.optim)

    @property
    def levers(self) -> Levers:
        """The lean path's levers the workflow takes: the int8 matmul."""
        return Levers(int8_matmul=self.int8_matmul)

    def describe(self) -> dict:
        return asdict(self)

    def training_arguments(self, output_dir: Path, mode: Mode, device: torch.device):
        """``TrainingArguments`` for ``mode`` on ``device``: mixed precision in the mode's compute dtype on CUDA,
        and on the CPU for the lean path only (the reference path there trains in fp32 around bitsandbytes' own
        compute dtype). Gradient checkpointing is left off here: ``prepare_for_training`` already enabled it on
        the model."""
        from transformers import TrainingArguments

        mixed = device.type == "cuda" or self.path == "lean"
        return TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            logging_steps=self.logging_steps,
            save_strategy="steps",
            save_steps=self.save_steps,
            optim=OPTIMIZERS[self.optim].trainer_name,
            seed=self.seed,
            data_seed=self.seed,
            bf16=mixed and mode.torch_compute_dtype == torch.bfloat16,
            fp16=mixed and mode.torch_compute_dtype == torch.float16,
            use_cpu=device.type != "cuda",
            remove_unused_columns=False,
            # The filter tests every micro-batch's loss for NaN/inf on the host: two device syncs a micro-batch, and
            # a non-finite loss logged as the running mean instead of as what it is.
            logging_nan_inf_filter=False,
            report_to="none",
        )


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: mean loss over its micro-batches, synchronized wall time (s), tokens consumed.

    With several processes: ``loss`` is the mean over the ranks (the global batch's mean loss), ``seconds`` the
    slowest rank's time, ``rank_seconds`` every rank's own (s, by rank), ``tokens`` the global batch's.
    """

    step: int
    loss: float
    seconds: float
    tokens: int
    rank_seconds: tuple[float, ...] = ()


def build_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    return OPTIMIZERS[settings.optimizer].build(params, lr=settings.learning_rate,
                                                weight_decay=settings.weight_decay)


#: torch.compile's log of graph breaks (the ``graph_breaks`` logging artifact, ``TORCH_LOGS=graph_breaks``): each
#: record names a break's source line, then its reason (where torch's counters keep the reason without the line).
GRAPH_BREAK_LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
_BREAK_RECORD = re.compile(r"in user code at (?P<file>.+?):(?P<line>\d+)\s*\nGraph Break Reason: "
                           r"(?P<reason>.*?)(?:\nUser code traceback:|$)", re.DOTALL)


def import_path(file: str) -> str:
    """``file`` as Python imports it: from its package on, under the longest ``sys.path`` entry holding it, so a
    site reads the same wherever the package is installed (site-packages, a staged folder); as given otherwise."""
    roots = [root for root in (os.path.join(entry, "") for entry in sys.path if entry) if file.startswith(root)]
    return file[len(max(roots, key=len)):] if roots else file


class GraphBreakSites(logging.Handler):
    """Collects where torch.compile broke the graph, from its graph-break log: (source line as
    ``package/module.py:line``, the reason's text) for each break logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.breaks: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if found := _BREAK_RECORD.search(record.getMessage()):
            self.breaks.append((f"{import_path(found['file'])}:{found['line']}", found["reason"]))

    def sites(self, reason: str) -> list[str]:
        """The source lines of the breaks whose reason's text holds ``reason``, each once, in order seen."""
        return list(dict.fromkeys(site for site, text in self.breaks if reason in text))


def _graph_break_sites() -> GraphBreakSites:
    """The one ``GraphBreakSites`` of this process, installed on torch's graph-break log at the first call. The log
    is enabled for it, and kept from torch's handlers unless ``TORCH_LOGS`` asked for it (then it prints too)."""
    logger = logging.getLogger(GRAPH_BREAK_LOGGER)
    installed = next((handler for handler in logger.handlers if isinstance(handler, GraphBreakSites)), None)
    if installed is None:
        installed = GraphBreakSites()
        if not logger.isEnabledFor(logging.DEBUG):
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
        logger.addHandler(installed)
    return installed


def reset_compile_counters() -> None:
    """Forget what torch.compile compiled, counted and logged in this process, so ``compile_report`` covers one
    model."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _graph_break_sites().breaks.clear()


def compiled_if(module: torch.nn.Module, compile: bool, mode: str,
                scope: str = "step") -> tuple[torch.nn.Module | None, bool]:
    """(``module`` compiled in ``mode`` when ``compile``, else None; whether its replays are CUDA graphs, whose
    outputs the next replay overwrites). ``scope`` (``COMPILE_SCOPES``): ``step`` returns ``module`` through
    torch.compile; ``layers`` compiles each of its decoder layers in place (``Module.compile``) and returns
    ``module`` itself. Compiling restarts the counts ``compile_report`` reads, so they cover this module."""
    torch_mode = check_compile(compile, mode, scope)
    if not compile:
        return None, False
    layers = decoder_layers(module) if scope == "layers" else []
    if scope == "layers" and not layers:
        raise ValueError(f"compile scope 'layers': {type(module).__name__} has no decoder layers to compile "
                         f"(none of the classes its transformers model names in _no_split_modules)")
    reset_compile_counters()
    # transformers' hub-kernel wrappers (with the ``kernels`` package it requires since 5.2x) set a global around
    # each attention's forward and restore it after; inside a checkpointed layer torch.compile refuses such a
    # mutation unless told it need not replay it in the backward's recompute, which a set-and-restore needs not
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if scope == "step":
        return torch.compile(module, mode=torch_mode), mode in CUDA_GRAPH_MODES
    for layer in layers:
        layer.compile(mode=torch_mode)
    return module, mode in CUDA_GRAPH_MODES


#: What inductor's cache of compiled code did with each forward or backward graph it was asked for (torch's
#: counters ``fxgraph_cache_<outcome>``): its code loaded from the cache (``hit``: compiled before, in this or an
#: earlier process on this machine), compiled and stored (``miss``), or compiled and not storable (``bypass``).
INDUCTOR_CACHE_OUTCOMES = ("hit", "miss", "bypass")


def compile_report() -> dict:
    """What torch.compile made of the training step in this process: graphs compiled, each distinct graph
    break (its reason's first line) with how many times it split the step, and where: the source lines each
    reason broke at (``GraphBreakSites``). Graph breaks are where the step left the compiled graph for eager
    Python (a quantized layer, a ``requires_grad_`` call...). ``inductor_cache``: how many forward and backward
    graphs' code came from torch's compile cache (``INDUCTOR_CACHE_OUTCOMES``): from a warm cache
    (``TORCHINDUCTOR_CACHE_DIR``, kept between runs) the first step skips inductor's compilation, so a compile time
    says which kind it was."""
    from torch._dynamo.utils import counters

    breaks: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        first_line = reason.strip().splitlines()[0]
        breaks[first_line] = breaks.get(first_line, 0) + count
    logged = _graph_break_sites()
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": breaks,
            "graph_break_sites": {reason: logged.sites(reason) for reason in breaks},
            "inductor_cache": {outcome: counters["inductor"][f"fxgraph_cache_{outcome}"]
                               for outcome in INDUCTOR_CACHE_OUTCOMES}}


class LossModule(torch.nn.Module):
    """``loss_fn(model, input_ids)`` as the forward of a module holding ``model``: what DDP wraps, so its
    forward, where DDP prepares the gradients' all-reduce, is the forward that builds the loss whichever way
    ``loss_fn`` reaches into the model."""

    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, input_ids)


class LoraTrainer:
    """Trains the adapters of a peft model on an endless iterator of token batches [batch, seq_len].

    Labels are the inputs (the model shifts them); the loss is the mean token NLL under autocast in the mode's
    compute dtype, computed by ``loss_fn(model, input_ids)`` (default: the model's own; ``qlora_core.paths``).
    fp16 compute uses a gradient scaler (fp16 gradients underflow otherwise).

    In a process started by ``distributed.launch`` (or torchrun) every rank draws the same global batches from
    ``batches`` (the same seed) and trains on its rows of each (``data.rank_rows``); ``batch`` must divide by the
    number of processes. The loss is computed in the forward of a module around the model (``LossModule``), the
    module DDP wraps, so both paths' losses run under DDP: the lean path's reaches the decoder and head directly,
    around the model's own forward, which DDP would otherwise never see. ``strategy`` (``strategies``): how the
    ranks share the training, ``ddp`` or ``fsdp``; under FSDP the model must have been loaded as
    ``strategies.mode_for`` says, and its parameters are sharded in place.
    """

    def __init__(self, model, batches: Iterator[torch.Tensor], settings: TrainSettings, compute_dtype: torch.dtype,
                 loss_fn=None, compile: bool = False, strategy: str = "ddp", compile_mode: str = "default",
                 compile_scope: str = "step"):
        from transformers import get_scheduler

        from qlora_core.paths import causal_lm_loss

        self.model = model
        self.loss_fn = loss_fn or causal_lm_loss
        self.batches = batches
        self.settings = settings
        self.compute_dtype = compute_dtype
        self.device = next(model.parameters()).device
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters: attach LoRA adapters first")
        self.strategy = check_strategy(strategy)
        self.accelerator = make_accelerator(self.device)
        # The loss as trained (``LossModule``), as the strategy shares it between processes (DDP: in
        # DistributedDataParallel, every rank holding the whole quantized model, as it is with one process).
        # The optimizer and the schedule stay unprepared: accelerate's optimizer wrapper only adds its own
        # scaler and gradient-accumulation bookkeeping, neither used here, and its scheduler wrapper advances
        # the schedule once per process each step (it assumes each process saw 1/N of an epoch's batches) and
        # not at all after a step the scaler skipped, which would change today's fp16 schedule.
        # ``wrapped``: the strategy's wrapper, uncompiled (under FSDP the root, which ``evaluating`` gathers)
        self.wrapped = wrap(self.accelerator, LossModule(model, self.loss_fn), self.strategy)
        # taken after wrapping: FSDP replaces the parameters with their shards, which the optimizer must step
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        # forward and backward through torch.compile when asked; the first step compiles (``compile_report``)
        compiled, self.cuda_graphs = compiled_if(self.wrapped, compile, compile_mode, compile_scope)
        self.training_model = self.wrapped if compiled is None else compiled
        self.optimizer = build_optimizer(self.trainable, settings)
        self.scheduler = get_scheduler(
            settings.schedule, self.optimizer, num_warmup_steps=settings.warmup_steps,
            num_training_steps=settings.max_steps,
        )
        use_scaler = compute_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.steps_done = 0
        if settings.optimizer_state_upfront:
            self.make_optimizer_state()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """A context for forwards of ``model`` called on their own between steps (an evaluation): under FSDP
        every rank must run the same ones in it (``strategies.forwards_outside_training``). They run eager, as
        the model is evaluated before training: layers compiled in place (compile scope ``layers``) would
        otherwise compile again for forwards without gradients and the evaluation's lengths."""
        with forwards_outside_training(self.wrapped, self.strategy), torch.compiler.set_stance("force_eager"):
            yield

    def make_optimizer_state(self) -> None:
        """Make the optimizer's state now, as a first step would, and leave every parameter as it is: one
        optimizer step on zero gradients at learning rate 0. An Adam update and its decoupled weight decay are
        then both multiplied by 0 (every optimizer of ``OPTIMIZERS``: parameters unchanged bit for bit), the
        moments stay zero, and the state's step count reads 1 (the bias correction of the next step is that of
        a second step: within a step's numerics, not its memory). The schedule does not move."""
        learning_rates = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for param in self.trainable:
            param.grad = torch.zeros_like(param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for group, learning_rate in zip(self.optimizer.param_groups, learning_rates, strict=True):
            group["lr"] = learning_rate

    def _micro_step(self, sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of this rank's share of the next global batch; returns its loss and the global
        batch's token count. Only a ``sync`` micro-batch all-reduces the gradients: the earlier ones of a step
        accumulate locally (``strategies.gradient_sync``), so a step reduces once whatever ``grad_accum``."""
        batch = next(self.batches)
        accelerator = self.accelerator
        shard = rank_rows(batch, accelerator.process_index, accelerator.num_processes).to(self.device)
        if self.cuda_graphs:  # a new replay: the previous micro-batch's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        with gradient_sync(accelerator, self.training_model, self.strategy, sync):
            # torch's autocast rather than accelerate's mixed precision: see distributed.make_accelerator.
            with torch.autocast(self.device.type, dtype=self.compute_dtype):
                loss = self.training_model(shard)
            accelerator.backward(self.scaler.scale(loss / self.settings.grad_accum))
        # a copy: a CUDA graph's output is overwritten by its next replay, and the step averages every loss
        return (loss.detach().clone() if self.cuda_graphs else loss.detach()), batch.numel()

    def _optimizer_step(self) -> tuple[float, int]:
        self.training_model.train()
        losses, tokens = [], 0
        for index in range(self.settings.grad_accum):
            loss, n = self._micro_step(sync=index == self.settings.grad_accum - 1)
            losses.append(loss)
            tokens += n
        # Our own scaler, not accelerate's (mixed precision is off there): unscale before the clipping reads
        # the norm. accelerate's clipping computes torch's norm (the same bits: tests/test_trainer.py), over
        # the whole gradient for FSDP's sharded ones too (torch's norm of DTensors reduces across the ranks).
        self.scaler.unscale_(self.optimizer)
        self.accelerator.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).float().mean().item(), tokens

    def step(self) -> StepRecord:
        """One optimizer step, timed with the device synchronized before and after (the loss's ``.item()``
        inside also synchronizes, so the time covers all of the step's GPU work).

        With several processes the ranks pass a barrier before their clocks start, so they start together, and
        the step's time is the slowest rank's (max over ranks): a global step is done when its last rank is.
        The barrier and the exchange of figures lie outside the timed window; with one process neither does
        anything.
        """
        self.accelerator.wait_for_everyone()
        (loss, tokens), seconds = timed(self._optimizer_step, self.device)
        self.steps_done += 1
        loss, rank_seconds = self._across_ranks(loss, seconds)
        return StepRecord(self.steps_done, loss, max(rank_seconds), tokens, rank_seconds)

    def _across_ranks(self, loss: float, seconds: float) -> tuple[float, tuple[float, ...]]:
        """The mean of the ranks' losses (each the mean over an equal share of the global batch's tokens, so
        together the global batch's mean) and every rank's step seconds, by rank; one gather."""
        if self.accelerator.num_processes == 1:
            return loss, (seconds,)
        mine = torch.tensor([[loss, seconds]], dtype=torch.float64, device=self.device)
        gathered = self.accelerator.gather(mine)  # [num_processes, 2], rank order
        return gathered[:, 0].mean().item(), tuple(gathered[:, 1].tolist())

    def snapshot(self) -> dict:
        """A copy of everything a step changes (adapters, optimizer, schedule, scaler, step count, random
        generators), for ``restore``: steps taken in between (a profile) then leave no trace."""
        return {
            "trainable": [param.detach().clone() for param in self.trainable],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "steps_done": self.steps_done,
            "rng": torch.random.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }

    def restore(self, snapshot: dict) -> None:
        """Put back the state ``snapshot`` copied (the batches drawn since are not put back)."""
        with torch.no_grad():
            for param, saved in zip(self.trainable, snapshot["trainable"], strict=True):
                param.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.scheduler.load_state_dict(snapshot["scheduler"])
        self.scaler.load_state_dict(snapshot["scaler"])
        self.steps_done = snapshot["steps_done"]
        torch.random.set_rng_state(snapshot["rng"])
        if snapshot["device_rng"] is not None:
            torch.cuda.set_rng_state(snapshot["device_rng"], self.device)

    def train(self, n_steps: int | None = None, on_step=None) -> list[StepRecord]:
        """Run ``n_steps`` (default: up to ``max_steps``) steps, calling ``on_step(record)`` after each."""
        records = []
        for _ in range(n_steps or self.settings.max_steps - self.steps_done):
            records.append(self.step())
            if on_step:
                on_step(records[-1])
        return records

    def save_adapter(self, folder: str | os.PathLike) -> Path:
        """Save the adapter weights and config only (no base weights), atomically: written to a sibling
        temporary folder and renamed, so a crash never leaves a half-written adapter under ``folder``."""
        return save_adapter(self.model, Path(folder))


def save_adapter(model, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s adapters to ``folder`` atomically (see ``LoraTrainer.save_adapter``): its own, or those of
    ``state_dict`` (keys as in ``model.state_dict()``; e.g. FSDP's shards gathered whole,
    ``strategies.whole_trainable``)."""
    from qlora_core.results import publish_folder

    return publish_folder(folder, functools.partial(model.save_pretrained, state_dict=state_dict))
