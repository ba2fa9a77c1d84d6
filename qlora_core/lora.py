"""LoRA adapters: the settings, attaching them to a prepared base, and counting what trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from qlora_core import backends

#: peft's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


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


def merge_adapter(base, adapter_dir):
    """``base`` (a plain, unquantized model) with the adapter saved in ``adapter_dir`` merged into its weights:
    the one merge every command uses. Returns the merged model in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def merge_into_dequantized(peft_model, source, mode, device):
    """A standalone bf16 model: the base as ``mode`` stores it, dequantized (``models.load_dequantized``),
    with ``peft_model``'s adapters merged in (``merge_adapter``)."""
    import tempfile
    from pathlib import Path

    from qlora_core.models import load_dequantized
    from qlora_core.trainer import save_adapter

    with tempfile.TemporaryDirectory(prefix="qlora-merge-") as tmp:
        adapter = save_adapter(peft_model, Path(tmp) / "adapter")
        return merge_adapter(load_dequantized(source, mode, device), adapter)
