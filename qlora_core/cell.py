"""One benchmark cell: one model in one mode, loaded, evaluated, fine-tuned and evaluated again.

``run_cell`` is the library call; ``python -m qlora_core.cell SETTINGS.json RESULT.json`` runs it in a fresh
process (the sweep and the bench suites do), so one mode's allocator state never leaks into another's peak.
The child reports progress as marked JSON lines on stdout and writes its result atomically.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from dataclasses import dataclass, field

import torch

from qlora_core import data as datalib
from qlora_core.lora import LoraSettings, attach_lora, parameter_counts
from qlora_core.measure.flops import lora_training_flops_per_token, matmul_params, peak_flops
from qlora_core.measure.memory import memory_snapshot, reset_peak, weight_footprint
from qlora_core.measure.perplexity import perplexity
from qlora_core.measure.quant_error import weight_quant_error
from qlora_core.measure.timing import timing_stats
from qlora_core.models import (
    check_sequence_length,
    load_config,
    load_model,
    prepare_for_training,
    require_backend,
    resolve_model,
)
from qlora_core.modes import get_mode
from qlora_core.results import SCHEMA, environment, write_json_atomic
from qlora_core.trainer import LoraTrainer, TrainSettings

PROGRESS_MARK = "@qlora-bench "


@dataclass(frozen=True)
class CellSettings:
    """Everything one cell needs; saved verbatim with its result.

    Attributes (units in names where they have one):
        model: ``"smollm2"`` (embedded default), a local folder or a hub id. gguf: local copy of the default's GGUF.
        seq_len: tokens per training block. batch_size: blocks per micro-batch.
        timing_warmup: first steps excluded from step-time statistics.
        data / text_field / heldout_fraction: fine-tuning rows and the share held out for evaluation.
        eval_text: path of an extra evaluation text (e.g. WikiText-2 test), or ``"wikitext"``, or None.
        eval_window / eval_stride / eval_max_tokens: perplexity protocol and the tokens evaluated per text.
        device: ``"auto"`` (CUDA when available), ``"cuda"`` or ``"cpu"``.
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
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "lora": self.lora.describe(), "train": self.train.describe()}

    @classmethod
    def from_dict(cls, values: dict) -> CellSettings:
        values = dict(values)
        lora = dict(values.pop("lora", {}))
        train = TrainSettings(**values.pop("train", {}))
        if isinstance(lora.get("target_modules"), list):
            lora["target_modules"] = tuple(lora["target_modules"])
        return cls(**values, lora=LoraSettings(**lora), train=train)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but CUDA is not available on this machine")
    return torch.device(name)


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

    source = resolve_model(settings.model, gguf_path=settings.gguf, trust_remote_code=settings.trust_remote_code)
    config = load_config(source)
    check_sequence_length(config, max(settings.seq_len, settings.eval_window))
    tokenizer = AutoTokenizer.from_pretrained(source.name_or_path)
    texts = datalib.load_texts(settings.data, settings.text_field)
    train_texts, heldout = datalib.split_heldout(texts, settings.heldout_fraction, settings.train.seed)
    train_blocks = datalib.pack(tokenizer, train_texts, settings.seq_len)
    datalib.check_batch_size(train_blocks, settings.batch_size)
    return CellInputs(source, config, train_blocks, eval_token_sets(tokenizer, heldout, settings))


def preflight(settings: CellSettings, modes) -> CellSettings:
    """Check everything a sweep needs once, in the parent, before any cell process starts; the default
    model is fetched and converted here so the cells never race to do it."""
    for mode in modes:
        require_backend(mode)
    prepare_inputs(settings)
    return settings


def run_cell(settings: CellSettings, report=_report_nothing) -> dict:
    """Measure one (model, mode) cell and return its self-describing result (plain JSON).

    ``report`` receives progress events: ``{"phase": str}`` and ``{"step": i, "of": n, "loss": float}``.
    """
    from transformers import set_seed

    mode = get_mode(settings.mode)
    device = resolve_device(settings.device)
    set_seed(settings.train.seed)
    report({"phase": "data"})
    inputs = prepare_inputs(settings)
    source, config = inputs.source, inputs.config

    report({"phase": "loading"})
    reset_peak(device)
    model = load_model(source, mode, device)
    memory = {"after_load": memory_snapshot(device)}
    weights = weight_footprint(model)
    quant_error = weight_quant_error(model, source.name_or_path)
    matmul_weights = matmul_params(model)

    report({"phase": "evaluating before"})
    ppl_before = evaluate(model, inputs.token_sets, settings, mode.torch_compute_dtype)

    report({"phase": "setting up LoRA"})
    model = prepare_for_training(model, mode, gradient_checkpointing=settings.gradient_checkpointing)
    model = attach_lora(model, settings.lora)
    counts = parameter_counts(model)
    batches = datalib.batches(inputs.train_blocks, settings.batch_size, settings.train.seed)
    trainer = LoraTrainer(model, batches, settings.train, mode.torch_compute_dtype)
    memory["after_setup"] = memory_snapshot(device)

    report({"phase": "training"})
    reset_peak(device)
    records = trainer.train(
        on_step=lambda r: report({"step": r.step, "of": settings.train.max_steps, "loss": r.loss})
    )
    memory["training_peak"] = memory_snapshot(device)

    report({"phase": "evaluating after"})
    ppl_after = evaluate(model, inputs.token_sets, settings, mode.torch_compute_dtype)

    timing = timing_stats([r.seconds for r in records], settings.timing_warmup)
    tokens_per_step = records[0].tokens
    flops_per_token = lora_training_flops_per_token(
        config, matmul_weights, counts["trainable_params"], settings.seq_len
    )
    tokens_per_s = tokens_per_step / timing["median_s"]
    peak = peak_flops(device, mode.torch_compute_dtype)
    return {
        "schema": SCHEMA,
        "status": "ok",
        "mode": mode.describe(),
        "model": {**source.describe(), "model_type": config.model_type, "matmul_params": matmul_weights},
        "settings": settings.describe(),
        "device": device.type,
        "parameters": counts,
        "weights": weights,
        "quant_error": quant_error,
        "memory": memory,
        "training": {
            "losses": [r.loss for r in records],
            "step_seconds": [r.seconds for r in records],
            "timing": timing,
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token,
            "peak_flops": peak,
            "mfu": tokens_per_s * flops_per_token / peak["flops_per_s"] if peak else None,
        },
        "perplexity": {"before": ppl_before, "after": ppl_after},
        "environment": environment(),
    }


def failure_result(settings: CellSettings, status: str, error: BaseException) -> dict:
    """The result of a cell that did not finish: which settings, what failed, and the environment."""
    return {
        "schema": SCHEMA,
        "status": status,
        "mode": get_mode(settings.mode).describe(),
        "settings": settings.describe(),
        "error": f"{type(error).__name__}: {error}",
        "traceback": "".join(traceback.format_exception(error, limit=-8)),
        "environment": environment(),
    }


def _print_progress(event: dict) -> None:
    print(PROGRESS_MARK + json.dumps(event), flush=True)


def main(argv: list[str]) -> int:
    """Child-process entry point: ``python -m qlora_core.cell SETTINGS.json RESULT.json``.

    Out-of-memory becomes the cell's result (status ``oom``) rather than a crash of the whole sweep.
    """
    settings_path, result_path = argv
    with open(settings_path) as handle:
        settings = CellSettings.from_dict(json.load(handle))
    try:
        result = run_cell(settings, report=_print_progress)
    except torch.cuda.OutOfMemoryError as error:
        write_json_atomic(failure_result(settings, "oom", error), result_path)
        return 3
    except Exception as error:
        write_json_atomic(failure_result(settings, "error", error), result_path)
        traceback.print_exc()
        return 1
    write_json_atomic(result, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
