"""The classic INT8/FP4/NF4 + LoRA fine-tuning workflow, end to end, on today's APIs.

The tutorial this harness grew out of fine-tunes a BLOOM model on English quotes with bitsandbytes and LoRA. Its
steps, each a function here (the CLI's ``finetune``, ``generate`` and ``merge`` and the bench suites call them):

1. load the base in a registry mode (``models.load_model``: INT8, FP4 or NF4, double quant, bf16 compute);
2. prepare it for k-bit training (``models.prepare_for_training``; ``--path lean``: the lean path's preparation
   instead, ``qlora_core.paths``, with its adapters and chunked loss);
3. attach LoRA (``lora.attach_lora``: r=16, alpha=32, dropout 0.05, every linear layer by default);
4. train with transformers' ``Trainer`` and a causal-LM collator (``finetune``), saving adapter-only checkpoints
   that an interrupted run resumes from (``AdapterOnlyCheckpointCallback``, ``last_complete_checkpoint``);
5. reload the base in the mode with the adapter and generate (``load_for_inference``, ``generate``);
6. merge for deployment into a bf16 base and check it against base-plus-adapter (``merge_to_bf16``,
   ``merge_report``); merging into the still-quantized base is reported as lossy.

Checkpoints: ``Trainer`` writes a checkpoint folder file by file, so a crash can leave a folder that looks like a
checkpoint and is not one. The callback writes a marker file last, listing every file with its size; only a
folder whose marker matches its contents counts as a checkpoint. Checkpoints keep the optimizer, scheduler and
RNG state (adapter-sized for LoRA) because resuming needs them; they never hold full model weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from qlora_core import data as datalib
from qlora_core.backends.bitsandbytes import check_int8_matmul
from qlora_core.lora import LoraSettings, merge_into_bf16, parameter_counts
from qlora_core.measure.memory import memory_snapshot, reset_peak
from qlora_core.measure.perplexity import perplexity
from qlora_core.measure.profile import Profiling
from qlora_core.measure.timing import synchronize, timed, timing_stats
from qlora_core.models import ModelSource, load_model, prepare_for_training, resolve_model
from qlora_core.modes import BASELINE_MODE, Mode, get_mode
from qlora_core.paths import attach_adapters, check_path, chunked_causal_lm_nll
from qlora_core.results import (FINETUNE_SCHEMA, MERGE_SCHEMA, environment, publish_folder, share_as_umask_allows,
                                write_json_atomic)
from qlora_core.trainer import FinetuneSettings, compile_report, compiled_if, save_adapter

#: The tutorial's prompt.
TUTORIAL_PROMPT = "Two things are infinite: "
#: Written last into a checkpoint folder; a folder without a matching one is not a checkpoint.
COMPLETE_MARKER = "qlora-bench-checkpoint.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINER_STATE = "trainer_state.json"
#: Full-model weight files (single or sharded, safetensors or pickle) that an adapter checkpoint never keeps.
FULL_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                        "pytorch_model*.bin", "pytorch_model.bin.index.json")
SUMMARY_NAME = "summary.json"
MERGE_REPORT_NAME = "merge-report.json"
ADAPTER_DIR_NAME = "adapter"
#: Relative perplexity difference allowed between the merged bf16 model and base-plus-adapter (base in the mode).
#: Measured on CPU (Nov 2026; 1024 quote tokens, window 128, stride 64, after 6 steps at lr 1e-3):
#: - 4-bit and unquantized modes: the unmerged model dequantizes each weight before its matmul, so both compute
#:   the same products and differ by bf16 rounding of W + BA only. SmolLM2-135M nf4-dq: 0.07 %; tiny random
#:   Llama: < 0.01 %. 1 % leaves a 10x margin and still catches a merge into other weights (nf4-dq adapter merged
#:   into SmolLM2's original weights: 21 %).
#: - int8: LLM.int8 also quantizes the activations (per row, outliers above the threshold kept in 16-bit), which
#:   the merged bf16 model does not. SmolLM2-135M int8: base alone vs its dequantized copy 2.5 %, merged vs
#:   base-plus-adapter 1.6 % (the merged model is the better one). 5 % leaves a 2x margin over that gap.
MERGE_PERPLEXITY_RTOL = 0.01
INT8_MERGE_PERPLEXITY_RTOL = 0.05


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token (its eos, as the tutorial does) when it has none; returns it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(source: ModelSource):
    """The source's tokenizer, with a pad token for the collator and for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path, trust_remote_code=source.trust_remote_code)
    return ensure_pad_token(tokenizer)


#: Tokens a micro-batch's length is padded up to a multiple of. Rows vary in length and the collator pads each
#: micro-batch to its longest row, so nearly every micro-batch had a new length; on the H200 each new length makes
#: cuDNN's attention plan its kernels again (``scaled_dot_product_attention`` took 12 s of host time over the
#: 80 micro-batches of an nf4-dq run, cProfile). 64 leaves at most four lengths at the tutorial's 256 tokens; the
#: padding is masked out of attention and labels, so the loss does not change.
PAD_TO_MULTIPLE_OF = 64


def training_collator(tokenizer):
    """transformers' causal-LM collator: pads a micro-batch (to a multiple of ``PAD_TO_MULTIPLE_OF``) and
    masks the padding out of the labels."""
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=PAD_TO_MULTIPLE_OF)


def tokenize_rows(tokenizer, texts: list[str], max_length: int) -> list[dict[str, list[int]]]:
    """One training row per text, tokenized as the tutorial does (truncated to ``max_length`` tokens); the
    collator pads each batch and masks the padding out of the labels."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask}
            for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]


# ---- checkpoints ----

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The step in a ``checkpoint-N`` folder's name, or None for any other name."""
    match = _CHECKPOINT_NAME.match(folder.name)
    return int(match.group(1)) if match else None


def _adapter_file(folder: Path) -> Path | None:
    return next((folder / name for name in ADAPTER_FILES if (folder / name).is_file()), None)


def remove_full_weights(folder: Path) -> list[str]:
    """Delete full-model weight files from ``folder``; returns the names removed."""
    removed = []
    for pattern in FULL_WEIGHT_PATTERNS:
        for path in sorted(folder.glob(pattern)):
            path.unlink()
            removed.append(path.name)
    return removed


def _fsync_files(folder: Path) -> None:
    """Flush the folder's files to disk, so the marker written after them never outlives their data."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def mark_complete(folder: Path, step: int) -> Path:
    """Write the completion marker (atomically, last): the step and the size of every file in ``folder``."""
    _fsync_files(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER}
    return write_json_atomic({"step": step, "files": files}, folder / COMPLETE_MARKER)


def checkpoint_is_complete(folder: Path) -> bool:
    """True when ``folder`` holds an adapter and the trainer state, and a marker whose step and file sizes match
    what is there (a crash during or after the save, or a later partial overwrite, fails this)."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file() or _adapter_file(folder) is None or not (folder / TRAINER_STATE).is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if record.get("step") != checkpoint_step(folder):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size
               for name, size in record.get("files", {}).items())


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders in ``output_dir``, complete or not, by step."""
    if not output_dir.is_dir():
        return []
    folders = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(folders, key=checkpoint_step)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir`` (incomplete ones ignored), or None.

    transformers' ``get_last_checkpoint`` picks the highest step whatever its state; this skips half-written ones.
    """
    complete = [folder for folder in list_checkpoints(output_dir) if checkpoint_is_complete(folder)]
    return complete[-1] if complete else None


def discard_incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Delete checkpoint folders that are not complete (left by an interrupted save); returns their names.

    Without this the Trainer would later save into such a folder, mixing stale files with new ones."""
    removed = []
    for folder in list_checkpoints(output_dir):
        if not checkpoint_is_complete(folder):
            shutil.rmtree(folder)
            removed.append(folder.name)
    return removed


class AdapterOnlyCheckpointCallback(TrainerCallback):
    """After each checkpoint save: keep the adapter, remove any full-model weights, then mark it complete.

    peft's ``PeftModel.save_pretrained`` (what the Trainer calls) writes only the adapter; this enforces it (a
    model that is not a ``PeftModel`` would be saved whole) and writes the adapter itself when it is missing.
    ``removed`` lists every file it had to delete, for the run's summary.
    """

    def __init__(self) -> None:
        self.removed: list[str] = []

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.removed += [f"{folder.name}/{name}" for name in remove_full_weights(folder)]
        if _adapter_file(folder) is None:
            if not hasattr(model, "peft_config"):
                raise RuntimeError(f"{folder}: no adapter saved and the model has no LoRA adapters to save")
            model.save_pretrained(folder)
        share_as_umask_allows(folder)  # the Trainer's safetensors file is 0600
        mark_complete(folder, state.global_step)
        return control


# ---- training ----


class LeanLoss(torch.nn.Module):
    """The lean path's loss of a micro-batch (``paths.chunked_causal_lm_nll``: summed NLL and scored tokens) as
    the forward of a module holding the model: what torch.compile takes whole, forward and backward, since the
    chunked loss reaches the decoder and head around the model's own forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked_causal_lm_nll(self.model, input_ids, labels=labels, attention_mask=attention_mask)


class WorkflowTrainer(Trainer):
    """transformers' ``Trainer``, counting FLOPs (``trainer_state.json``'s ``total_flos``) as it does, with the
    model's parameter count taken once, and the loss of the training ``path``; with ``compile``, that loss through
    torch.compile (the model's forward on the reference path, ``LeanLoss`` on the lean path).

    The base class recounts the parameters every micro-batch by walking every module (18 ms on SmolLM2-135M with
    LoRA on all linears, measured on one CPU core: 70 ms of each 4-micro-batch step); the count never changes.
    """

    _non_embedding_parameters: int | None = None

    def __init__(self, *args, path: str = "reference", compile: bool = False, compile_mode: str = "default",
                 compile_scope: str = "step", **kwargs):
        super().__init__(*args, **kwargs)
        self.path = check_path(path)
        if self.path == "lean":
            # ``compute_loss`` divides by the tokens of the whole optimizer step when the Trainer counts them, as
            # the model's own loss does; this tells the Trainer (of every version) not to divide again
            self.model_accepts_loss_kwargs = True
        # the first micro-batch compiles (``compile_report``); the eager model trains the same weights
        self.compiled, self.cuda_graphs = compiled_if(self.model if self.path == "reference" else LeanLoss(self.model),
                                                      compile, compile_mode, compile_scope)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The reference path's loss is the model's own; the lean path's ``paths.chunked_causal_lm_nll`` over the
        micro-batch, divided by the step's scored tokens (``num_items_in_batch``) or, without them, its own."""
        if self.cuda_graphs:  # a new replay: the previous micro-batch's graph outputs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        if self.path == "reference":
            loss = super().compute_loss(model if self.compiled is None else self.compiled, inputs,
                                        return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            # a copy out of the CUDA graph's memory, which its next replay overwrites (the lean path's division
            # below makes one)
            return loss.clone() if self.cuda_graphs and not return_outputs else loss
        if return_outputs:  # the Trainer asks for outputs when it evaluates, which the workflow never has it do
            raise ValueError("the lean path's loss keeps no logits to return")
        loss = LeanLoss(model) if self.compiled is None else self.compiled
        # accelerate autocasts the model's forward, which the chunked loss goes around (body, then head)
        with self.accelerator.autocast():
            total, scored = loss(inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"))
        return total / (scored if num_items_in_batch is None else num_items_in_batch)

    def floating_point_ops(self, inputs: dict) -> int:
        """6 FLOPs per non-embedding parameter per input token, as the base class counts them."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return super().floating_point_ops(inputs)
        if self._non_embedding_parameters is None:
            self._non_embedding_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._non_embedding_parameters


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (s), the device synchronized before each reading.

    A step runs from the end of the previous one (the start of training for the first) to its own end, so it
    includes loading its micro-batches, logging, and the checkpoint saved after the previous step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: list[float] = []
        self._last: float | None = None

    def _now(self) -> float:
        synchronize(self.device)  # queued kernels belong to the step that launched them
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.seconds.append(now - self._last)
        self._last = now
        return control

    def stats(self, leave_out_last: int = 0) -> dict | None:
        """``timing_stats`` of the steps (``median_s`` etc.) but the last ``leave_out_last`` (profiled), the first
        dropped as warm-up when there are others; None when no step is left."""
        seconds = self.seconds[:len(self.seconds) - leave_out_last]
        if not seconds:
            return None
        return timing_stats(seconds, warmup=min(1, len(seconds) - 1))


class ProfiledSteps(TrainerCallback):
    """Runs the optimizer steps ``first``..``last`` (global step numbers, from 1) under ``torch.profiler``
    (``measure.profile.Profiling``); ``summary`` holds the result after ``last`` (None if those steps did not
    run here, e.g. a resumed run past them) and the profiler's table goes to stderr."""

    def __init__(self, device: torch.device, first: int, last: int) -> None:
        self.device, self.first, self.last = device, first, last
        self.profiling: Profiling | None = None
        self.summary: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            self.profiling = Profiling(self.device)
            self.profiling.start()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiling is not None and state.global_step == self.last:
            self.summary, table = self.profiling.stop(self.last - self.first + 1)
            self.profiling = None
            print(f"profile of steps {self.first}-{self.last}, operators by self host time:\n{table}",
                  file=sys.stderr)
        return control


@dataclass
class FinetuneRun:
    """What ``finetune`` leaves: the self-describing summary (also saved as ``summary.json``), and the trained
    model and tokenizer for callers that continue in-process (drop them to free the memory)."""

    summary: dict
    model: object
    tokenizer: object


def step_losses(log_history: list[dict]) -> list[dict]:
    """Per-step training records ``{"step", "loss", "learning_rate", "grad_norm"}`` from the Trainer's log."""
    keys = ("step", "loss", "learning_rate", "grad_norm")
    return [{key: entry.get(key) for key in keys} for entry in log_history if "loss" in entry]


class RunAlreadyFinished(Exception):
    """``finetune(resume=True)`` on a run that already reached ``max_steps``: there is nothing left to train, and
    nothing in its folder was changed. Not an error (a retried ``--resume`` of a finished run is done)."""

    def __init__(self, output_dir: Path, step: int) -> None:
        super().__init__(f"{output_dir}: already finished at step {step}; nothing changed")
        self.output_dir, self.step = output_dir, step


def _finished_step(output_dir: Path) -> int | None:
    """The last step of the finished run in ``output_dir`` (its summary, written last), or None."""
    try:
        summary = json.loads((output_dir / SUMMARY_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    finished = isinstance(summary, dict) and summary.get("status") == "ok"
    return (summary.get("training") or {}).get("global_step") if finished else None


def _start_checkpoint(output_dir: Path, resume: bool, max_steps: int) -> Path | None:
    """The checkpoint to resume from (None: start afresh), refusing to train over another run's checkpoints.

    Raises RunAlreadyFinished when resuming a run that reached ``max_steps`` (the Trainer would otherwise train
    past it and replace the final adapter), before anything in ``output_dir`` is touched."""
    if not resume:
        if list_checkpoints(output_dir):
            raise ValueError(f"{output_dir} already holds checkpoints: resume, or choose another folder")
        return None
    finished = _finished_step(output_dir)
    if finished is not None and finished >= max_steps:
        raise RunAlreadyFinished(output_dir, finished)
    last = last_complete_checkpoint(output_dir)
    if last is not None and checkpoint_step(last) >= max_steps:
        raise ValueError(f"{last} already reaches max_steps {max_steps} but {output_dir} has no finished "
                         f"{SUMMARY_NAME} (stopped after its last checkpoint): generate or merge from {last.name}, "
                         f"or fine-tune afresh in another folder")
    discard_incomplete_checkpoints(output_dir)
    return last


def finetune(
    source: ModelSource,
    mode: Mode,
    output_dir: str | os.PathLike,
    *,
    device: torch.device,
    settings: FinetuneSettings = FinetuneSettings(),
    lora: LoraSettings = LoraSettings(),
    data: str = datalib.QUOTES,
    text_field: str = "quote",
    resume: bool = False,
    prompt: str = TUTORIAL_PROMPT,
    max_new_tokens: int = 32,
    callbacks: Sequence = (),
) -> FinetuneRun:
    """Run steps 1-4 of the workflow and generate a sample; write ``output_dir/summary.json``.

    ``output_dir`` receives the Trainer's ``checkpoint-N`` folders (adapter, optimizer, scheduler, RNG and trainer
    state), the final adapter in ``adapter/`` (written atomically), and the summary. With ``resume`` the run
    continues from the last complete checkpoint there (incomplete ones are deleted), or starts afresh if none; a
    run that already reached ``settings.max_steps`` raises ``RunAlreadyFinished`` and is left as it is.
    ``callbacks`` are extra ``TrainerCallback`` objects (progress, early stop).

    The summary holds the per-step losses, the training wall time (s, synchronized), each optimizer step's wall
    time (``step_seconds``, s, synchronized; ``step_time``: their median and spread, see ``StepTimer``), memory
    after loading and at the training peak (``memory_snapshot``), parameter counts, mode and model descriptions
    with provenance, the settings, the environment, and a greedy sample from ``prompt``; with
    ``settings.compile``, what torch.compile made of the step (``trainer.compile_report``) and the first step's
    time, its compilation included (``training.compile``; the step-time statistics leave that step out).
    """
    from transformers import set_seed

    check_int8_matmul(settings.int8_matmul, mode)  # before anything is loaded or written
    output_dir = Path(output_dir)
    start_from = _start_checkpoint(output_dir, resume, settings.max_steps)
    set_seed(settings.seed)
    tokenizer = load_tokenizer(source)
    rows = tokenize_rows(tokenizer, datalib.load_texts(data, text_field), settings.max_length)

    reset_peak(device)
    model = load_model(source, mode, device)
    memory = {"after_load": memory_snapshot(device)}
    model = prepare_for_training(model, mode, gradient_checkpointing=settings.gradient_checkpointing,
                                 path=settings.path)
    model = attach_adapters(model, lora, settings.path)
    model, _ = settings.levers.apply(model, loss_fn=None)  # the workflow's trainer computes its own loss
    counts = parameter_counts(model)

    checkpointing, step_timer = AdapterOnlyCheckpointCallback(), StepTimer(device)
    profiled = ProfiledSteps(device, settings.max_steps - settings.profile_steps + 1, settings.max_steps)
    trainer = WorkflowTrainer(
        model=model,
        args=settings.training_arguments(output_dir, mode, device),
        train_dataset=rows,
        data_collator=training_collator(tokenizer),
        callbacks=[checkpointing, step_timer, *([profiled] if settings.profile_steps else []), *callbacks],
        path=settings.path,
        compile=settings.compile,
        compile_mode=settings.compile_mode,
        compile_scope=settings.compile_scope,
    )
    reset_peak(device)
    _, wall_s = timed(lambda: trainer.train(resume_from_checkpoint=str(start_from) if start_from else None), device)
    memory["training_peak"] = memory_snapshot(device)
    adapter_dir = save_adapter(model, output_dir / ADAPTER_DIR_NAME)

    compiled = {**compile_report(), "first_step_s": step_timer.seconds[0]} if settings.compile else None
    # the sample decoded eager, as the uncompiled model decodes it when the whole step was compiled: layers
    # compiled in place (compile scope "layers") would otherwise compile again for decoding
    with torch.compiler.set_stance("force_eager"):
        completion = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens,
                              compute_dtype=mode.torch_compute_dtype)
    records = step_losses(trainer.state.log_history)
    summary = {
        "schema": FINETUNE_SCHEMA,
        "status": "ok",
        "mode": mode.describe(),
        "model": {**source.describe(), "model_type": model.config.model_type},
        "settings": settings.describe(),
        "lora": lora.describe(),
        "data": {"source": data, "text_field": text_field, "rows": len(rows),
                 "tokens": sum(len(row["input_ids"]) for row in rows)},
        "device": device.type,
        "parameters": counts,
        "training": {
            "steps": records,
            "losses": [record["loss"] for record in records],
            "global_step": trainer.state.global_step,
            "resumed_from": start_from.name if start_from else None,
            "wall_s": wall_s,
            "step_seconds": step_timer.seconds,
            "step_time": step_timer.stats(leave_out_last=settings.profile_steps if profiled.summary else 0),
            "profile": profiled.summary,
            "compile": compiled,
        },
        "memory": memory,
        "checkpoints": [folder.name for folder in list_checkpoints(output_dir) if checkpoint_is_complete(folder)],
        "removed_full_weights": checkpointing.removed,
        "adapter_dir": str(adapter_dir),
        "sample": {"prompt": prompt, "completion": completion, "max_new_tokens": max_new_tokens,
                   "decoding": "greedy"},
        "environment": environment(),
    }
    write_json_atomic(summary, output_dir / SUMMARY_NAME)
    return FinetuneRun(summary, model, tokenizer)


# ---- inference ----


def load_for_inference(source: ModelSource, mode: Mode, adapter_dir: str | os.PathLike, device: torch.device):
    """Step 5: the base loaded again in ``mode`` with the adapter from ``adapter_dir`` (a checkpoint folder or a
    saved adapter) attached, frozen and in eval mode."""
    from peft import PeftModel

    base = load_model(source, mode, device)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, *, max_new_tokens: int, compute_dtype: torch.dtype) -> str:
    """The greedy continuation of ``prompt`` (new text only, special tokens dropped), computed under autocast in
    ``compute_dtype`` as the tutorial does. The model is left in the train/eval mode it came in."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=compute_dtype):
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def generate_from_adapter(
    source: ModelSource,
    mode: Mode,
    adapter_dir: str | os.PathLike,
    *,
    device: torch.device,
    prompt: str = TUTORIAL_PROMPT,
    max_new_tokens: int = 32,
) -> str:
    """Step 5 whole: reload the base in ``mode`` with the adapter and return the greedy continuation of
    ``prompt``."""
    model = load_for_inference(source, mode, adapter_dir, device)
    return generate(model, load_tokenizer(source), prompt, max_new_tokens=max_new_tokens,
                    compute_dtype=mode.torch_compute_dtype)


# ---- merge ----


def merge_to_bf16(
    source: ModelSource,
    mode: Mode,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    base: str = "dequantized",
) -> Path:
    """Step 6: merge the adapter into a bf16 base and save a standalone model (weights, config, tokenizer and a
    ``provenance.json`` naming the base, mode and adapter) to ``out_dir`` atomically; returns ``out_dir``.

    ``base`` is ``"dequantized"`` (default: the mode's weights dequantized, what the adapter was trained on) or
    ``"original"`` (the source checkpoint's own weights); see ``lora.merge_into_bf16``, the merge the cells use too.
    """
    merged = merge_into_bf16(source, mode, adapter_dir, device, base=base)
    tokenizer = load_tokenizer(source)
    provenance = {
        **source.provenance,
        "merged": {"model": source.describe(), "mode": mode.describe(), "adapter": str(adapter_dir),
                   "base": base, "dtype": "bfloat16"},
    }

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "provenance.json").write_text(json.dumps(provenance, indent=2))

    return publish_folder(out_dir, write)


def merge_into_quantized(model):
    """Merge a ``PeftModel``'s adapters into its base as loaded. On a 4-bit or 8-bit base peft dequantizes,
    adds the update and re-quantizes: lossy (the update is partly rounded away). Returns the merged model."""
    return model.merge_and_unload()


def merge_tolerance(mode: Mode) -> float:
    """Relative perplexity difference allowed between the merged bf16 model and base-plus-adapter in ``mode``
    (see ``MERGE_PERPLEXITY_RTOL``)."""
    return INT8_MERGE_PERPLEXITY_RTOL if mode.weight_format == "int8" else MERGE_PERPLEXITY_RTOL


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / reference


def merge_report(
    source: ModelSource,
    mode: Mode,
    adapter_dir: str | os.PathLike,
    merged_dir: str | os.PathLike,
    token_ids: torch.Tensor,
    *,
    device: torch.device,
    window: int,
    stride: int,
    into_quantized: bool = False,
) -> dict:
    """Perplexity on ``token_ids`` [n_tokens] of base-plus-adapter (base in ``mode``) and of the saved merged model
    in ``merged_dir``, and whether they agree within ``merge_tolerance(mode)``; with ``into_quantized`` also the
    adapter merged into the still-quantized base, flagged ``lossy`` when the base is quantized.

    Models load one at a time, all evaluated under autocast in the mode's compute dtype. Plain JSON.
    """

    def evaluate(model) -> dict:
        return perplexity(model, token_ids, window=window, stride=stride, autocast_dtype=mode.torch_compute_dtype)

    with_adapter = load_for_inference(source, mode, adapter_dir, device)
    reference = evaluate(with_adapter)
    quantized = None
    if into_quantized:
        merged_quantized = evaluate(merge_into_quantized(with_adapter))
        quantized = {
            "perplexity": merged_quantized,
            "relative_delta": _relative(merged_quantized["perplexity"], reference["perplexity"]),
            "lossy": mode.is_quantized,
            "why": "peft re-quantizes base + update into the mode's format, rounding part of the update away"
            if mode.is_quantized else "the base is not quantized: the merge only rounds to its dtype",
        }
    del with_adapter
    merged_source = resolve_model(str(merged_dir))
    merged = evaluate(load_model(merged_source, get_mode(BASELINE_MODE), device))
    delta = _relative(merged["perplexity"], reference["perplexity"])
    tolerance = merge_tolerance(mode)
    return {
        "schema": MERGE_SCHEMA,
        "mode": mode.describe(),
        "model": source.describe(),
        "adapter_dir": str(adapter_dir),
        "merged": {**merged_source.describe(), "perplexity": merged, "relative_delta": delta},
        "base_plus_adapter": {"perplexity": reference},
        "tolerance": {"relative_perplexity": tolerance, "within": delta <= tolerance},
        "merged_into_quantized": quantized,
        "environment": environment(),
    }


def merge_and_report(
    source: ModelSource,
    mode: Mode,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    device: torch.device,
    base: str = "dequantized",
    check_data: str = datalib.QUOTES,
    text_field: str = "quote",
    check_tokens: int = 1024,
    window: int = 128,
    stride: int = 64,
    into_quantized: bool = False,
) -> dict:
    """Step 6 whole: ``merge_to_bf16`` into ``out_dir``, then ``merge_report`` on the first ``check_tokens``
    tokens of ``check_data`` (perplexity windows of ``window`` tokens every ``stride``); the report is also
    saved as ``out_dir/merge-report.json``. A consistency check, so the training rows serve as well as any."""
    merged_dir = merge_to_bf16(source, mode, adapter_dir, out_dir, device=device, base=base)
    tokens = datalib.token_stream(load_tokenizer(source), datalib.load_texts(check_data, text_field))[:check_tokens]
    report = merge_report(source, mode, adapter_dir, merged_dir, tokens, device=device, window=window,
                          stride=stride, into_quantized=into_quantized)
    report["merged"]["base"] = base
    report["check"] = {"data": check_data, "text_field": text_field, "tokens": int(tokens.numel())}
    write_json_atomic(report, merged_dir / MERGE_REPORT_NAME)
    return report
