"""LoRA adapters: the settings, attaching them to a prepared base, counting what trains, and the one merge into a
bf16 base."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qlora_core import backends

#: peft's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"
#: What ``merge_into_bf16`` merges an adapter into: the mode's weights dequantized, or the checkpoint's own.
MERGE_BASES = ("dequantized", "original")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (defaults: the classic QLoRA tutorial's r=16, alpha=32, dropout 0.05).

    ``alpha`` left out is ``2 r`` (the tutorial's ratio, so the adapters' scale alpha/r stays 2 whatever the
    rank): every command and the bench suites share this one default. ``target_modules="all-linear"`` adapts
    every linear layer but the output head, the QLoRA paper's choice.
    """

    r: int = 16
    alpha: int | None = None
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ALL_LINEAR

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.r)  # frozen: set once, here
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def describe(self) -> dict:
        description = asdict(self)
        if not isinstance(self.target_modules, str):
            description["target_modules"] = list(self.target_modules)
        return description


def peft_target_modules(model, target_modules: str | tuple[str, ...]) -> str | list[str]:
    """What peft's ``LoraConfig`` is given for ``target_modules`` on ``model``.

    peft resolves ``"all-linear"`` to the ``torch.nn.Linear`` layers but the output head, so a backend whose
    layers are not ``torch.nn.Linear`` subclasses (HQQ's) would get no adapters; on such a model it is resolved
    here to the same layers, by the last component of their names (peft matches a listed name against it).
    """
    if not isinstance(target_modules, str):
        return list(target_modules)
    linears = {name: module for name, module in model.named_modules() if backends.is_linear(module)}
    if target_modules.lower() != ALL_LINEAR or all(isinstance(m, torch.nn.Linear) for m in linears.values()):
        return target_modules
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in linears.items() if module is not head})


def attach_lora(model, settings: LoraSettings):
    """Wrap a prepared base model in a peft ``PeftModel`` with fresh adapters (the base stays frozen)."""
    from peft import LoraConfig, get_peft_model

    target = peft_target_modules(model, settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def parameter_counts(model) -> dict:
    """Trainable and total parameter counts as peft defines them (4-bit weights counted unpacked)."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_params": trainable, "total_params": total}


def merge_into_bf16(source, mode, adapter, device, *, base: str = "dequantized", adapter_state=None):
    """The one merge, of the cell's merged evaluation and the workflow's ``merge`` command: a standalone bf16 model
    (eval mode) with ``adapter`` merged into a base of ``source``.

    ``adapter``: a saved adapter folder (or checkpoint folder), or a ``PeftModel``, whose adapters are saved to a
    temporary folder first (peft merges a saved adapter into a freshly loaded base): its own, or with
    ``adapter_state`` those weights (by its state-dict keys: FSDP's shards gathered whole,
    ``strategies.whole_trainable``). ``base``: ``"dequantized"`` (default), the base as ``mode`` stores it
    dequantized (``models.load_dequantized``): exactly the weights the adapter was trained against, so merged
    outputs match base-plus-adapter; or ``"original"``, the checkpoint's own weights in the unquantized baseline
    mode (the adapter then meets weights it never saw: the difference is the mode's quantization error).
    """
    from peft import PeftModel

    from qlora_core.models import load_dequantized
    from qlora_core.modes import BASELINE_MODE, get_mode

    if base not in MERGE_BASES:
        raise ValueError(f"unknown merge base {base!r}; choose from {', '.join(MERGE_BASES)}")
    weights = load_dequantized(source, mode if base == "dequantized" else get_mode(BASELINE_MODE), device)
    with _adapter_folder(adapter, adapter_state) as folder:
        return PeftModel.from_pretrained(weights, str(folder)).merge_and_unload().eval()


@contextlib.contextmanager
def _adapter_folder(adapter, adapter_state=None):
    """``adapter`` when it is a folder; else a ``PeftModel``'s adapters (or ``adapter_state``, see
    ``merge_into_bf16``) saved to a temporary folder (removed after: peft has read them into memory by then)."""
    from qlora_core.trainer import save_adapter

    if isinstance(adapter, (str, os.PathLike)):
        yield adapter
        return
    with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
        yield save_adapter(adapter, Path(tmp) / "adapter", adapter_state)
