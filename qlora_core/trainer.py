"""One LoRA trainer for every mode, driven step by step so a benchmark can time each step.

The mode enters only through ``compute_dtype`` (autocast) and the model it was loaded into; nothing here
branches on a mode's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_core.measure.timing import timed

#: The one optimizer vocabulary of every command and suite: name -> (module, class, the same optimizer's name
#: in transformers' ``TrainingArguments.optim``, which the classic workflow's Trainer takes). bitsandbytes' paged
#: optimizers fall back to non-paged on CPU.
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", "adamw_torch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "adamw_bnb_8bit"),
    "paged_adamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "paged_adamw_8bit"),
    "paged_adamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit", "paged_adamw_32bit"),
}


def check_optimizer(name: str) -> str:
    """``name`` itself when it is in ``OPTIMIZERS``; otherwise a ValueError listing them."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return name
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings; one optimizer step consumes ``grad_accum`` micro-batches."""

    learning_rate: float = 2e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "linear"
    max_steps: int = 20
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if self.grad_accum < 1 or self.max_steps < 1:
            raise ValueError("grad_accum and max_steps must be >= 1")

    def describe(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: mean loss over its micro-batches, synchronized wall time (s), tokens consumed."""

    step: int
    loss: float
    seconds: float
    tokens: int


def build_optimizer(params: list[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    import importlib

    module_name, class_name, _ = OPTIMIZERS[settings.optimizer]
    optimizer_class = getattr(importlib.import_module(module_name), class_name)
    return optimizer_class(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)


class LoraTrainer:
    """Trains the adapters of a peft model on an endless iterator of token batches [batch, seq_len].

    Labels are the inputs (the model shifts them); the loss is the mean token NLL under autocast in the mode's
    compute dtype, computed by ``loss_fn(model, input_ids)`` (default: the model's own; ``qlora_core.paths``).
    fp16 compute uses a gradient scaler (fp16 gradients underflow otherwise).
    """

    def __init__(self, model, batches: Iterator[torch.Tensor], settings: TrainSettings, compute_dtype: torch.dtype,
                 loss_fn=None):
        from transformers import get_scheduler

        from qlora_core.paths import causal_lm_loss

        self.model = model
        self.loss_fn = loss_fn or causal_lm_loss
        self.batches = batches
        self.settings = settings
        self.compute_dtype = compute_dtype
        self.device = next(model.parameters()).device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters: attach LoRA adapters first")
        self.optimizer = build_optimizer(self.trainable, settings)
        self.scheduler = get_scheduler(
            settings.schedule, self.optimizer, num_warmup_steps=settings.warmup_steps,
            num_training_steps=settings.max_steps,
        )
        use_scaler = compute_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.steps_done = 0

    def _micro_step(self) -> tuple[torch.Tensor, int]:
        batch = next(self.batches).to(self.device)
        with torch.autocast(self.device.type, dtype=self.compute_dtype):
            loss = self.loss_fn(self.model, batch)
        self.scaler.scale(loss / self.settings.grad_accum).backward()
        return loss.detach(), batch.numel()

    def _optimizer_step(self) -> tuple[float, int]:
        self.model.train()
        losses, tokens = [], 0
        for _ in range(self.settings.grad_accum):
            loss, n = self._micro_step()
            losses.append(loss)
            tokens += n
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).float().mean().item(), tokens

    def step(self) -> StepRecord:
        """One optimizer step, timed with the device synchronized before and after (the loss's ``.item()``
        inside also synchronizes, so the time covers all of the step's GPU work)."""
        (loss, tokens), seconds = timed(self._optimizer_step, self.device)
        self.steps_done += 1
        return StepRecord(self.steps_done, loss, seconds, tokens)

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


def save_adapter(model, folder: Path) -> Path:
    """Write ``model``'s adapters to ``folder`` atomically (see ``LoraTrainer.save_adapter``)."""
    from qlora_core.results import publish_folder

    return publish_folder(folder, model.save_pretrained)
