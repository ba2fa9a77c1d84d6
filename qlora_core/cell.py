"""One benchmark cell: one model in one mode, loaded, evaluated, fine-tuned and evaluated again.

``Cell`` runs the phases one at a time (a benchmark times ``step`` itself); ``run_cell`` runs them all. Either
runs in the calling process: ``qlora_core.worker`` puts a cell in a fresh process, so one mode's allocator
state never leaks into another's peak memory.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from qlora_core import backends
from qlora_core import data as datalib
from qlora_core.backends.bitsandbytes import LLM_INT8, check_int8_matmul
from qlora_core.kernels import apply_kernels, check_kernels
from qlora_core.levers import Levers
from qlora_core.lora import LoraSettings, merge_into_bf16, parameter_counts
from qlora_core.measure.floor import memory_floor, predicted_vs_measured
from qlora_core.measure.flops import (lora_training_flops_per_token, matmul_params, peak_flops,
                                      recompute_flops_per_token)
from qlora_core.measure.memory import (cap_memory, cuda_index, memory_snapshot, optimizer_state_bytes,
                                       reset_peak, weight_footprint)
from qlora_core.measure.perplexity import check_protocol, perplexity
from qlora_core.measure.profile import profile_calls
from qlora_core.measure.quant_error import weight_quant_error
from qlora_core.measure.timing import cuda_mallocs, device_state, synchronize, timing_stats
from qlora_core.models import (
    EAGER,
    check_attention,
    check_sequence_length,
    load_config,
    load_model,
    prepare_for_training,
    resolve_model,
    set_attention,
)
from qlora_core.modes import get_mode
from qlora_core.noise import warning_counts
from qlora_core.paths import attach_adapters, check_path, loss_function
from qlora_core.results import SCHEMA, environment, non_finite
from qlora_core.shapes import (
    RANDOM_WEIGHTS_NOTE,
    build_shape_model,
    check_shape,
    random_blocks,
    shape_config,
    shape_source,
)
from qlora_core.strategies import check_strategy, mode_for, whole_trainable
from qlora_core.trainer import LoraTrainer, StepRecord, TrainSettings, check_compile, compile_report

#: The dtype bitsandbytes' int8 matmul (MatMul8bitLt) really computes in: it casts its inputs to float16
#: whatever the mode's compute dtype (bitsandbytes 0.50 autograd/_functions.py; stack-facts.md).
INT8_MATMUL_DTYPE = "float16"
#: Random training blocks a shape cell draws, per block of its batch (enough for reshuffled batches).
SHAPE_BLOCKS_PER_BATCH_ROW = 4


class NonFiniteError(RuntimeError):
    """A training loss, perplexity or other figure of a cell that is NaN or infinite (e.g. corrupt weights or a
    diverged run): the cell fails rather than put it in a table."""


@dataclass(frozen=True)
class CellSettings:
    """Everything one cell needs; saved verbatim with its result.

    Attributes (units in names where they have one):
        model: ``"smollm2"`` (embedded default), a local folder or a hub id. gguf: local copy of the default's GGUF.
        seq_len: tokens per training block. batch_size: blocks per micro-batch.
        timing_warmup: first steps excluded from step-time statistics. A cell of zero steps (``train.max_steps``
            0: load, evaluations and set-up only) times none, whatever its warm-up: its result's step figures
            are None, and the report, which needs a step time, leaves it out.
        data / text_field / heldout_fraction: fine-tuning rows and the share held out for evaluation.
        eval_text: path of an extra evaluation text (e.g. WikiText-2 test), or ``"wikitext"``, or None.
        eval_window / eval_stride / eval_max_tokens: perplexity protocol and the tokens evaluated per text.
        eval_merged: also evaluate the adapters merged into a dequantized bf16 base (the deployable model).
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
        shape: a named shape (``qlora_core.shapes``) built with random weights instead of ``model``: memory and
            time only, no perplexity. path: ``"reference"`` or ``"lean"`` (``qlora_core.paths``).
        memory_cap_bytes: a hard cap on this cell's CUDA allocator (``measure.memory.cap_memory``), to measure a
            smaller GPU on a larger one; None: the device's own memory.
        compile: step through ``torch.compile`` (``--path lean`` with it is issue 14's compiled path); the first
            step compiles: its time is reported apart (the result's ``compile``) and warm-up keeps it out of the
            step-time statistics.
        compile_mode: torch.compile's mode (``trainer.COMPILE_MODES``; ``reduce-overhead``: CUDA graphs), with
            ``compile`` only.
        compile_scope: what is compiled (``trainer.COMPILE_SCOPES``): the step, or each decoder layer (a compile
            that does not grow with the depth), with ``compile`` only.
        num_processes: train on this many processes of one host (``qlora_core.cell_ranks``: ``batch_size`` rows a
            step shared between them; each evaluation computed once and recorded by rank 0, ``Cell.evaluate``).
        strategy: how those processes share the training (``qlora_core.strategies``): ``ddp``, every rank holding
            the whole quantized model, or ``fsdp``, every parameter sharded (modes whose weights FSDP can shard).
            The memory floor predicts one rank's: its shards and the units it gathers
            (``measure.floor.fsdp_terms``).
        trace_memory: on CUDA, record the allocator's history over the last training step and put what was alive
            at its peak, by block size in bytes a token, in the result (``measure.memory_trace``): where a
            prediction misses, this says what it missed. Off CUDA: nothing to record, and nothing is.
        beyond_positions: a shape cell may train past the positions its model was trained for (RoPE computes
            any position; ``qlora-bench frontier --beyond-positions``' probes): memory and time only.
        offload_activations / mlp_tile_tokens / offload_host_gib: the lean path's memory levers
            (``qlora_core.levers``): saved activations kept in host memory between forward and backward, at most
            ``offload_host_gib`` of them (None: all); the MLP recomputed in tiles of this many tokens (None:
            untiled).
        int8_matmul: how the int8 mode's linears compute on the lean path (``levers``, ``INT8_MATMULS``):
            LLM.int8's kernel (the default), or their weight dequantized to the compute dtype; other modes have
            no int8 linears and take the default only.
        attention: the attention implementation to train and evaluate with (``models.ATTENTIONS``: ``sdpa``,
            fused kernels, or ``eager``, the whole attention matrix); None: as the model loads. The floor assumes
            fused attention: an ``eager`` cell records no prediction.
        kernels: fused kernels of the lean path (``qlora_core.kernels``: Liger-Kernel's RMSNorm, SwiGLU and fused
            linear cross-entropy), by name; none by default. The floor does not model them: no prediction.
        profile_steps: after the timed steps (and the peak's reading), this many more steps under
            ``torch.profiler`` (``Cell.profile``), then the adapters and optimizer put back as they were: where a
            step's time goes, at no cost to the other figures. 0: none.
    """

    mode: str
    model: str | None = None
    gguf: str | None = None
    trust_remote_code: bool = False
    seq_len: int = 512
    batch_size: int = 8
    timing_warmup: int = 5
    gradient_checkpointing: bool = True
    data: str = datalib.QUOTES
    text_field: str = "quote"
    heldout_fraction: float = 0.1
    eval_text: str | None = None
    eval_window: int = 1024
    eval_stride: int = 512
    eval_max_tokens: int | None = None
    eval_batch_size: int = 8
    eval_merged: bool = True
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    shape: str | None = None
    path: str = "reference"
    memory_cap_bytes: int | None = None
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "step"
    num_processes: int = 1
    strategy: str = "ddp"
    profile_steps: int = 0
    offload_activations: bool = False
    mlp_tile_tokens: int | None = None
    offload_host_gib: float | None = None
    int8_matmul: str = LLM_INT8
    beyond_positions: bool = False
    trace_memory: bool = False
    kernels: tuple[str, ...] = ()
    attention: str | None = None

    def __post_init__(self) -> None:
        check_path(self.path)
        if self.beyond_positions and self.shape is None:
            raise ValueError("beyond_positions is for shape cells (random weights): a real model's perplexity means "
                             "nothing past the positions it was trained for")
        self.levers.check(self.path, self.gradient_checkpointing)
        check_int8_matmul(self.int8_matmul, get_mode(self.mode))
        check_kernels(self.kernels, self.path, self.strategy)
        check_attention(self.attention)
        if self.profile_steps < 0:
            raise ValueError(f"profile_steps must be >= 0, got {self.profile_steps}")
        self._check_processes()
        if self.memory_cap_bytes is not None and self.memory_cap_bytes < 1:
            raise ValueError(f"memory_cap_bytes must be >= 1 (or None: no cap), got {self.memory_cap_bytes}")
        if self.shape is not None:
            check_shape(self.shape)
        check_protocol(self.eval_window, self.eval_stride)
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_size} and {self.eval_batch_size}")
        if self.compile and self.timing_warmup < 1:
            raise ValueError("a compiled cell needs a timing warm-up of at least 1 step: its first step compiles")
        check_compile(self.compile, self.compile_mode, self.compile_scope)
        self._check_steps()

    def _check_steps(self) -> None:
        steps, warmup = self.train.max_steps, self.timing_warmup
        # zero steps is a cell that does not train; a cell that trains must leave a step to time
        if warmup < 0 or (steps and warmup >= steps):
            raise ValueError(f"steps ({steps}) must exceed the timing warm-up ({warmup}, >= 0): else no step is "
                             f"left to time")

    def _check_processes(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        mode_for(get_mode(self.mode), check_strategy(self.strategy))  # refuses a mode FSDP cannot shard, naming it
        if self.batch_size % self.num_processes:
            raise ValueError(f"batch_size ({self.batch_size}) must divide by num_processes ({self.num_processes}): "
                             f"each process trains on an equal share of every step's rows")

    @property
    def levers(self) -> Levers:
        return Levers(self.offload_activations, self.mlp_tile_tokens, self.offload_host_gib, self.int8_matmul)

    @property
    def rows_per_process(self) -> int:
        """Rows of each step's batch one process trains on."""
        return self.batch_size // self.num_processes

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on: every process's rows of each of its micro-batches."""
        return self.batch_size * self.seq_len * self.train.grad_accum

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "lora": self.lora.describe(), "train": self.train.describe(),
                "kernels": list(self.kernels)}  # as JSON holds it

    @classmethod
    def from_dict(cls, values: dict) -> CellSettings:
        values = dict(values)
        lora = dict(values.pop("lora", {}))
        train = TrainSettings(**values.pop("train", {}))
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        values["kernels"] = tuple(values.get("kernels", ()))
        return cls(**values, lora=LoraSettings(**lora), train=train)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available on this machine")
    return torch.device(name)


def rank_device(device: torch.device, num_processes: int) -> torch.device:
    """``device``, or for one of several CUDA processes its own GPU (``LOCAL_RANK``, as torchrun numbers them),
    made the current one."""
    if device.type != "cuda" or num_processes == 1:
        return device
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    return device


def _report_nothing(event: dict) -> None:
    pass


def eval_token_sets(tokenizer, heldout: list[str], settings: CellSettings) -> dict[str, torch.Tensor]:
    """Token streams [n_tokens] to evaluate: held-out rows, and the extra evaluation text when given."""
    sets = {"heldout": datalib.token_stream(tokenizer, heldout)}
    if settings.eval_text:
        text = datalib.load_eval_text(settings.eval_text)
        sets["eval_text"] = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return {name: ids[: settings.eval_max_tokens] for name, ids in sets.items()}


def evaluate(model, token_sets: dict[str, torch.Tensor], settings: CellSettings, dtype: torch.dtype) -> dict:
    return {
        name: perplexity(
            model, ids, window=settings.eval_window, stride=settings.eval_stride,
            batch_size=settings.eval_batch_size, autocast_dtype=dtype,
        )
        for name, ids in token_sets.items()
    }


@dataclass(frozen=True)
class CellInputs:
    """What a cell reads before any model weights load: checked model source and tokenized data."""

    source: object
    config: object
    train_blocks: torch.Tensor
    token_sets: dict[str, torch.Tensor]


def prepare_inputs(settings: CellSettings) -> CellInputs:
    """Resolve the model, check the lengths against it, and tokenize training and evaluation data.

    Every bad input (missing model, bad checksum, empty dataset, missing text field, sequence too long, batch
    larger than the data) fails here, before any weights load or any result is written.
    """
    from transformers import AutoTokenizer

    if settings.shape:
        return shape_inputs(settings)
    source = resolve_model(settings.model, gguf_path=settings.gguf, trust_remote_code=settings.trust_remote_code)
    config = load_config(source)
    check_sequence_length(config, max(settings.seq_len, settings.eval_window))
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path)
    texts = datalib.load_texts(settings.data, settings.text_field)
    train_texts, heldout = datalib.split_heldout(texts, settings.heldout_fraction, settings.train.seed)
    train_blocks = datalib.pack(tokenizer, train_texts, settings.seq_len)
    datalib.check_batch_size(train_blocks, settings.batch_size)
    return CellInputs(source, config, train_blocks, eval_token_sets(tokenizer, heldout, settings))


def shape_inputs(settings: CellSettings) -> CellInputs:
    """A shape's inputs: its config, random training blocks, nothing to evaluate (random weights)."""
    config = shape_config(settings.shape)
    check_sequence_length(config, settings.seq_len, settings.beyond_positions)
    n_blocks = SHAPE_BLOCKS_PER_BATCH_ROW * settings.batch_size
    blocks = random_blocks(config.vocab_size, n_blocks, settings.seq_len, settings.train.seed)
    return CellInputs(shape_source(settings.shape), config, blocks, {})


def predicted_floor(settings: CellSettings, config, device_type: str,
                    int8_outlier_columns: dict[str, float] | None = None,
                    embeddings_output_held: bool = False) -> dict | None:
    """The memory floor of the cell's set-up on its path (``measure.floor``), with int8's outlier columns where
    measured (and ``embeddings_output_held`` for a cell run before ``paths.drop_input_gradients``): one
    process's, on its rows (under DDP each holds the whole model; under FSDP its shards, beside the units it
    gathers); None for an architecture the floor has no activation accounting for (NotImplementedError)
    or that transformers cannot build from its config alone (ValueError: e.g. remote code), and for a set-up with
    fused kernels or eager attention, whose saved tensors and transients it does not model."""
    if settings.kernels or settings.attention == EAGER:
        return None
    try:
        return memory_floor(
            config, get_mode(settings.mode), settings.lora, settings.seq_len, settings.rows_per_process,
            settings.gradient_checkpointing, path=settings.path, optimizer=settings.train.optimizer,
            device_type=device_type, int8_outlier_columns=int8_outlier_columns, levers=settings.levers,
            optimizer_state_upfront=settings.train.optimizer_state_upfront, strategy=settings.strategy,
            num_processes=settings.num_processes, embeddings_output_held=embeddings_output_held,
        )
    except (NotImplementedError, ValueError):
        return None


def does_not_fit_result(settings: CellSettings, capacity_bytes: int) -> dict | None:
    """For a shape whose predicted peak exceeds the device's ``capacity_bytes``: the cell's result, status
    ``does_not_fit``, with the prediction (nothing is loaded). None when it is predicted to fit."""
    if not settings.shape:
        return None
    floor = predicted_floor(settings, shape_config(settings.shape), "cuda")
    if floor is None or floor["peak_bytes"] <= capacity_bytes:
        return None
    message = (f"predicted peak {floor['peak_bytes'] / 2**30:.1f} GiB exceeds the device's "
               f"{capacity_bytes / 2**30:.1f} GiB: not attempted")
    result = failure_result(settings, "does_not_fit", message)
    return {**result, "floor": floor, "capacity_bytes": capacity_bytes, "note": RANDOM_WEIGHTS_NOTE}


def preflight(settings: CellSettings, modes) -> CellInputs:
    """Check everything a sweep needs once, in the parent, before any cell process starts, and return the
    inputs every cell shares; the default model is fetched and converted here so the cells never race to do
    it."""
    for mode in modes:
        backends.require(mode)
    device = resolve_device(settings.device)
    if device.type == "cuda" and settings.num_processes > torch.cuda.device_count():
        raise ValueError(f"num_processes {settings.num_processes} needs as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    return prepare_inputs(settings)


@dataclass
class CellState:
    """What a cell's phases have produced so far, each field under the phase that sets it (``Cell.result`` reads
    them all). A field whose phase has not run keeps its empty default: a cell of zero steps has no records."""

    # load
    model: torch.nn.Module | None = None  #: the base in the cell's mode; from setup_training on, with adapters
    weights: dict | None = None  #: ``weight_footprint`` as loaded (bytes as stored)
    quant_error: dict | None = None  #: ``weight_quant_error``; None for a shape and on a rank but the first
    matmul_weights: int | None = None  #: ``matmul_params`` of the base: weights taking part in a matmul
    attention: str | None = None  #: the attention implementation the model runs (``models.set_attention``)
    # setup_training
    trainer: LoraTrainer | None = None
    tensors_after_setup_bytes: int | None = None  #: the model's tensors and the optimizer's state after set-up
    # step, one entry a step
    records: list[StepRecord] = field(default_factory=list)
    device_states: list[dict | None] = field(default_factory=list)  #: NVML after each step; None where unread
    step_cuda_mallocs: list[int] = field(default_factory=list)  #: the allocator's driver calls (CUDA only)
    memory_at_peak: dict | None = None  #: ``measure.memory_trace.alive_at_peak`` of a traced step; None untraced
    # end_training
    int8_outliers: dict | None = None  #: ``backends.outliers`` as the last step left them; None without any
    # profile
    profile_summary: dict | None = None
    # several phases: memory by point (load: before_load, after_load; setup_training: after_setup;
    # end_training: training_peak), perplexity by evaluation (evaluate: its ``when``; evaluate_merged:
    # "merged"), and every reported phase's synchronized wall time (s)
    memory: dict[str, dict] = field(default_factory=dict)
    perplexity: dict[str, dict] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # result: the predicted floor, computed once (a cell's result may be asked for twice, as bench/ does)
    floor: dict | None = None


class Cell:
    """One (model, mode) measurement as a sequence of phases over a ``CellState``, so a benchmark can time steps
    one by one: ``load`` -> ``evaluate("before")`` -> ``setup_training`` -> ``step``... -> ``end_training`` ->
    [``profile``] -> ``evaluate("after")`` -> ``evaluate_merged`` -> ``result``. ``run_all`` runs them in order.

    What a cell is given never changes after construction (``settings``, ``mode``, ``device``, ``rank``,
    ``inputs``); what its phases produce is in ``state``.
    """

    def __init__(self, settings: CellSettings, report=_report_nothing, inputs: CellInputs | None = None):
        """``inputs``: the cell's tokenized data when the caller already prepared it (a sweep tokenizes once
        for all its cells); by default the cell prepares its own."""
        from transformers import set_seed

        self.settings = settings
        self.report = report
        self.mode = mode_for(get_mode(settings.mode), settings.strategy)  # as the strategy stores its weights
        # a rank started by ``cell_ranks``: its number, and its own GPU; evaluations are recorded by rank 0 alone
        self.rank = int(os.environ.get("RANK", "0")) if settings.num_processes > 1 else 0
        self.device = rank_device(resolve_device(settings.device), settings.num_processes)
        # a shape's random weights have no perplexity or quantization error worth computing
        self.evaluates = not settings.shape and self.rank == 0
        set_seed(settings.train.seed)
        self.inputs = inputs or prepare_inputs(settings)
        self.state = CellState()

    @contextmanager
    def _phase(self, name: str):
        """Report a phase and record its synchronized wall time (s) in ``state.phase_seconds``."""
        self.report({"phase": name})
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.state.phase_seconds[name] = time.perf_counter() - start

    def load(self) -> dict:
        """Load the base in the mode; returns the weight footprint (bytes as stored)."""
        state = self.state
        with self._phase("loading"):
            cap_memory(self.device, self.settings.memory_cap_bytes)
            reset_peak(self.device)
            # what the process held before this model (a CUDA context, or an earlier test's leftovers in a
            # shared process): the floor is compared with the growth from here
            state.memory["before_load"] = memory_snapshot(self.device)
            state.model = self._build_model()
            state.attention = set_attention(state.model, self.settings.attention)
            state.memory["after_load"] = memory_snapshot(self.device)
        state.weights = weight_footprint(state.model)
        if self.evaluates:
            state.quant_error = weight_quant_error(state.model, self.inputs.source.name_or_path)
        state.matmul_weights = matmul_params(state.model)
        return state.weights

    def _build_model(self) -> torch.nn.Module:
        """A shape's random model, else the model's checkpoint, in the cell's mode on its device."""
        if self.settings.shape:
            return build_shape_model(self.inputs.config, self.mode, self.device, self.settings.train.seed)
        return load_model(self.inputs.source, self.mode, self.device)

    def evaluate(self, when: str) -> dict:
        """Perplexity of the model as it is now on every evaluation text, saved under ``when`` (nothing for a
        shape: its weights are random; nothing on a rank but the first: it is computed once, recorded once).

        While every rank holds the whole model (DDP; FSDP before ``setup_training`` shards it) rank 0 computes
        it alone. A sharded model's forwards gather each unit's shards from every rank, so then every rank runs
        the same windows in lock-step (``LoraTrainer.evaluating``): the one process's figures, computed alike on
        each rank, recorded by rank 0."""
        if self.settings.shape or not (self.rank == 0 or self._sharded()):
            return {}
        forwards = self.state.trainer.evaluating() if self.state.trainer else nullcontext()
        with self._phase(f"evaluating {when}"), forwards:
            figures = evaluate(self.state.model, self.inputs.token_sets, self.settings, self.mode.torch_compute_dtype)
        return self._keep_perplexity(when, figures) if self.evaluates else {}

    def _sharded(self) -> bool:
        """Whether the model's parameters are FSDP's shards now: from ``setup_training`` on, under FSDP."""
        return self.settings.strategy == "fsdp" and self.state.trainer is not None

    def _keep_perplexity(self, when: str, figures: dict[str, dict]) -> dict:
        """Save an evaluation's perplexities under ``when`` and return them; ``NonFiniteError`` when one is not
        finite."""
        _check_perplexity(figures, when)
        self.state.perplexity[when] = figures
        return figures

    def setup_training(self) -> None:
        """Prepare the base, attach adapters, build the optimizer; then start a new peak-memory window."""
        state, settings = self.state, self.settings
        with self._phase("setting up LoRA"):
            checkpointing, path = settings.gradient_checkpointing, settings.path
            model = prepare_for_training(state.model, self.mode, gradient_checkpointing=checkpointing, path=path)
            model = attach_adapters(model, settings.lora, path)
            model, loss_fn = apply_kernels(model, settings.kernels, loss_function(path))
            state.model, loss_fn = settings.levers.apply(model, loss_fn)
            batches = datalib.batches(self.inputs.train_blocks, settings.batch_size, settings.train.seed)
            state.trainer = LoraTrainer(state.model, batches, settings.train, self.mode.torch_compute_dtype,
                                        loss_fn=loss_fn, compile=settings.compile, strategy=settings.strategy,
                                        compile_mode=settings.compile_mode, compile_scope=settings.compile_scope)
        state.memory["after_setup"] = memory_snapshot(self.device)
        state.tensors_after_setup_bytes = (weight_footprint(state.model)["weights_bytes"]
                                           + optimizer_state_bytes(state.trainer.optimizer))
        reset_peak(self.device)

    def step(self) -> float:
        """One optimizer step; returns its synchronized wall time in seconds.

        Everything alive before the step is kept out of the garbage collector during it: a generation-2
        collection over the ~0.5 M objects of torch, transformers and the model otherwise lands in one step
        (0.2-0.4 s at a fixed step, seen on the H200 and on CPU) and dominates the spread of the step times.
        Collections of what the step itself creates still run.

        Beside each step, ``state.step_cuda_mallocs``: how many times the allocator went to the driver during it
        (a step time that drifts while these go on is the allocator's, not the mode's)."""
        state = self.state
        gc.freeze()
        mallocs_before = cuda_mallocs(self.device)
        try:
            record = state.trainer.step()
        finally:
            gc.unfreeze()
        if mallocs_before is not None:
            state.step_cuda_mallocs.append(cuda_mallocs(self.device) - mallocs_before)
        if not math.isfinite(record.loss):  # fail now: every later step and evaluation would be wasted
            raise NonFiniteError(f"training loss at step {record.step} is {record.loss}: not finite")
        state.records.append(record)
        state.device_states.append(device_state(self.device))  # after the step's clock stopped
        self.report({"step": record.step, "of": self.settings.train.max_steps, "loss": record.loss})
        return record.seconds

    def traced_step(self) -> float:
        """``step`` with the CUDA allocator's history recorded, replayed to the step's peak into
        ``state.memory_at_peak`` (``measure.memory_trace``); a plain step off CUDA."""
        if self.device.type != "cuda":
            return self.step()
        from qlora_core.measure.memory_trace import alive_at_peak, recorded

        with recorded(self.device) as recording:
            seconds = self.step()
        self.state.memory_at_peak = alive_at_peak(recording, self.settings.tokens_per_step, cuda_index(self.device))
        return seconds

    def memory_readings(self) -> dict:
        """The allocator (or RSS) readings taken so far, by point (``memory_snapshot``'s bytes)."""
        return dict(self.state.memory)

    def end_training(self) -> dict:
        """Read the peak memory of the training steps (before evaluation allocates anything), and int8's
        outlier columns as the last step found them (they decide part of its memory)."""
        state = self.state
        self.report({"phase": "training done"})
        state.memory["training_peak"] = memory_snapshot(self.device)
        # the dequantized matmul finds no outliers: what the layers hold then is an evaluation's, not a step's
        state.int8_outliers = None if self.settings.levers.int8_dequantized else backends.outliers(state.model)
        return state.memory["training_peak"]

    def profile(self, steps: int) -> dict:
        """``steps`` more training steps under ``torch.profiler`` (``measure.profile.profile_calls``), then the
        trainer put back as it was (``LoraTrainer.snapshot``), so the evaluation after training sees the
        adapters of the timed steps only. Call after ``end_training``: the peak is read before. Returns the
        summary (also in the result as ``profile``); the profiler's table goes to stderr (the cell's log)."""
        trainer = self.state.trainer
        with self._phase("profiling"):
            saved = trainer.snapshot()
            gc.freeze()  # as in ``step``
            try:
                summary, table = profile_calls(trainer.step, steps, self.device)
            finally:
                gc.unfreeze()
                trainer.restore(saved)
        print(f"profile of {steps} training steps, operators by self host time:\n{table}", file=sys.stderr)
        self.state.profile_summary = summary
        return summary

    def evaluate_merged(self) -> dict:
        """Perplexity after merging the adapters into a bf16 copy of the base as stored in this mode
        (dequantized for 8-/4-bit modes), i.e. the deployable model; saved under ``"merged"`` (nothing for a
        shape, nor on a rank but the first).

        Every rank gathers the adapters whole first (under FSDP a collective; else they are whole already);
        rank 0 alone then merges and evaluates: the merged model is a plain one, no rank's shards."""
        if self.settings.shape:
            return {}
        adapters = whole_trainable(self.state.model)
        if not self.evaluates:
            return {}
        with self._phase("evaluating merged"):
            merged = merge_into_bf16(self.inputs.source, self.mode, self.state.model, self.device,
                                     adapter_state=adapters)
            figures = evaluate(merged, self.inputs.token_sets, self.settings, torch.bfloat16)
            del merged
        return self._keep_perplexity("merged", figures)

    def result(self) -> dict:
        """The self-describing result of the phases run so far (plain JSON, every float finite: else
        ``NonFiniteError`` naming the figures). Each section is one helper's; the keys' order is the published
        results'."""
        state, settings = self.state, self.settings
        counts = parameter_counts(state.model)
        result = {
            **self._description(),
            "parameters": counts,
            "weights": state.weights,
            "quant_error": state.quant_error,
            "memory": state.memory,
            "training": self._training_section(counts["trainable_params"]),
            "perplexity": state.perplexity,
            "phase_seconds": state.phase_seconds,
            "profile": state.profile_summary,
            **({"memory_at_peak": state.memory_at_peak} if state.memory_at_peak else {}),  # traced cells only
            **self._floor_section(),
            "compile": self._compile_section(),
            "note": RANDOM_WEIGHTS_NOTE if settings.shape else None,
            **self._int8_section(),
            "warnings": warning_counts(),  # in a worker process, the library warnings of this cell and count
            "environment": environment(),
        }
        if bad := non_finite(result):
            raise NonFiniteError(f"not finite: {', '.join(bad)}")
        return result

    def _description(self) -> dict:
        """What was measured: schema, status, mode, model (with its architecture and matmul weights), settings
        and device."""
        config = self.inputs.config
        model = {**self.inputs.source.describe(), "model_type": config.model_type,
                 "matmul_params": self.state.matmul_weights, "attn_implementation": self.state.attention}
        return {"schema": SCHEMA, "status": "ok", "mode": self.mode.describe(), "model": model,
                "settings": self.settings.describe(), "device": self.device.type}

    def _training_section(self, trainable_params: int) -> dict:
        """Each step's loss, seconds, device state and driver calls, then the step timing and the FLOPs figures
        (``step_timing``, ``_flops``)."""
        state = self.state
        records = state.records
        timing = step_timing(records, self.settings)
        return {
            "losses": [record.loss for record in records],
            "step_seconds": [record.seconds for record in records],
            # the GPU as NVML saw it after each step (clock, temperature, power); None where it cannot be read
            "device_states": state.device_states if any(state.device_states) else None,
            "step_cuda_mallocs": state.step_cuda_mallocs or None,
            **timing,
            **self._flops(trainable_params, timing["tokens_per_s"]),
        }

    def _flops(self, trainable_params: int, tokens_per_s: float | None) -> dict:
        """``flops_per_token`` (the model's, a trained token), ``peak_flops`` (the devices', or None),
        ``hardware_flops_per_token`` (with checkpointing's recompute), and the shares of the peak the steps
        reach: ``mfu`` and ``hfu`` (None without a peak or without a timed step)."""
        settings, config, weights = self.settings, self.inputs.config, self.state.matmul_weights
        model_flops = lora_training_flops_per_token(config, weights, trainable_params, settings.seq_len)
        hardware_flops = model_flops + recompute_flops_per_token(
            config, weights, trainable_params, settings.seq_len,
            gradient_checkpointing=settings.gradient_checkpointing, path=settings.path,
            mlp_tiled=settings.mlp_tile_tokens is not None,
        )
        peak = devices_peak_flops(self.device, self.mode.torch_compute_dtype, settings.num_processes)
        return {
            "flops_per_token": model_flops,
            "peak_flops": peak,
            "hardware_flops_per_token": hardware_flops,
            "mfu": utilisation(tokens_per_s, model_flops, peak),
            "hfu": utilisation(tokens_per_s, hardware_flops, peak),
        }

    def _floor_section(self) -> dict:
        """``floor``: the memory floor predicted for the set-up (None where it cannot be), with int8's outlier
        columns as measured; ``predicted_vs_measured``: it beside the readings."""
        state = self.state
        outlier_columns = state.int8_outliers["columns"] if state.int8_outliers else None
        state.floor = state.floor or predicted_floor(self.settings, self.inputs.config, self.device.type,
                                                     outlier_columns)
        if not state.floor:
            return {"floor": state.floor, "predicted_vs_measured": None}
        compared = predicted_vs_measured(state.floor, state.memory, state.weights["weights_bytes"],
                                         state.tensors_after_setup_bytes)
        return {"floor": state.floor, "predicted_vs_measured": compared}

    def _compile_section(self) -> dict | None:
        """For a compiled cell, what torch.compile made of the step and the first step's time (s: compilation
        included; None with no step); None for an eager one."""
        if not self.settings.compile:
            return None
        records = self.state.records
        return {**compile_report(), "first_step_s": records[0].seconds if records else None}

    def _int8_section(self) -> dict:
        """The dtype int8's matmul computes in (bitsandbytes' kernel casts to fp16; dequantized, the compute
        dtype) and its outlier columns (None for other modes)."""
        if self.mode.weight_format != "int8":
            return {"int8_matmul_dtype": None, "int8_outliers": None}
        dtype = self.mode.compute_dtype if self.settings.levers.int8_dequantized else INT8_MATMUL_DTYPE
        return {"int8_matmul_dtype": dtype, "int8_outliers": self.state.int8_outliers}

    def run_all(self) -> dict:
        """Every phase in order; returns ``result()``. With several processes, and not already one of them, the
        phases run in those processes instead (``cell_ranks.run_on_ranks``)."""
        if self.settings.num_processes > 1 and "RANK" not in os.environ:
            from qlora_core.cell_ranks import run_on_ranks

            return run_on_ranks(self.settings, self.inputs)
        self.load()
        self.evaluate("before")
        self.setup_training()
        steps = self.settings.train.max_steps
        traced = steps > 0 and self.settings.trace_memory  # the last step, which holds all a step holds
        for _ in range(steps - 1 if traced else steps):
            self.step()
        if traced:
            self.traced_step()
        self.end_training()
        if self.settings.profile_steps:
            self.profile(self.settings.profile_steps)
        self.evaluate("after")
        if self.settings.eval_merged:
            self.evaluate_merged()
        return self.result()


def step_timing(records: list[StepRecord], settings: CellSettings) -> dict:
    """``timing`` (``timing_stats`` of the steps after the warm-up, s), ``tokens_per_step`` and ``tokens_per_s``
    (tokens a step / the median step time). A cell of zero steps timed none: its timing and rate are None, its
    tokens a step those its settings would have fed one."""
    if not records:
        return {"timing": None, "tokens_per_step": settings.tokens_per_step, "tokens_per_s": None}
    timing = timing_stats([record.seconds for record in records], settings.timing_warmup)
    tokens = records[0].tokens
    return {"timing": timing, "tokens_per_step": tokens, "tokens_per_s": tokens / timing["median_s"]}


def devices_peak_flops(device: torch.device, dtype: torch.dtype, num_processes: int) -> dict | None:
    """The stated peak FLOP/s of all the cell's devices in ``dtype`` (``peak_flops`` of one, times the processes,
    each on its own device), or None (CPU or an unlisted GPU)."""
    peak = peak_flops(device, dtype)
    if peak is None:
        return None
    # every process's device works on the step's tokens
    return {**peak, "flops_per_s": peak["flops_per_s"] * num_processes, "devices": num_processes}


def utilisation(tokens_per_s: float | None, flops_per_token: float, peak: dict | None) -> float | None:
    """The share of ``peak`` FLOP/s reached by ``tokens_per_s`` tokens a second of ``flops_per_token`` FLOPs
    each; None without a peak or without a timed step."""
    if peak is None or tokens_per_s is None:
        return None
    return tokens_per_s * flops_per_token / peak["flops_per_s"]


def _check_perplexity(perplexities: dict[str, dict], when: str) -> None:
    """Raise ``NonFiniteError`` naming the text whose perplexity ``when`` is NaN or infinite."""
    for text, figures in perplexities.items():
        if not math.isfinite(figures["perplexity"]):
            raise NonFiniteError(f"perplexity {when} on {text} is {figures['perplexity']}: not finite")


#: The progress phases beside which another process may start without disturbing a measurement: evaluations
#: (their wall time is not a reported figure) and the end of the timed steps. Not the load (a process starting
#: beside it made a SmolLM2 load ~10x slower on the H200), nor the steps: a shape, which has no evaluation, had
#: its next cells' processes importing through its first timed steps, and at 4 x 1,024 tokens a Llama-3.1-8B
#: step, still host-bound, took up to 1.5x its median there.
PHASES_TO_START_PROCESSES_IN = ("evaluating before", "training done", "evaluating after", "evaluating merged")


def run_cell(settings: CellSettings, report=_report_nothing) -> dict:
    """Measure one (model, mode) cell in this process and return its self-describing result (plain JSON).

    ``report`` receives progress events: ``{"phase": str}`` and ``{"step": i, "of": n, "loss": float}``.
    To keep modes apart, run each in a fresh process (``qlora_core.worker``).
    """
    report({"phase": "data"})
    return Cell(settings, report).run_all()


def failure_result(settings: CellSettings, status: str, error: str) -> dict:
    """The result of a cell that did not finish: which settings, its status (``oom``, ``error``,
    ``crashed``), what failed, and the environment."""
    return {
        "schema": SCHEMA,
        "status": status,
        "mode": get_mode(settings.mode).describe(),
        "settings": settings.describe(),
        "error": error,
        "environment": environment(),
    }
