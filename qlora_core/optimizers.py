"""The one optimizer vocabulary of every command and suite, and what each optimizer's state costs.

The trainer builds an optimizer from its entry; the classic workflow's ``transformers.Trainer`` takes the same
optimizer by its ``TrainingArguments.optim`` name; the memory floor predicts its state from ``state_bytes``.
A name added here is therefore trained, offered on every command line and predicted at once.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch

from qlora_core.units import FLOAT32

#: Bytes of AdamW's state a trainable value: two float32 moments.
FP32_MOMENTS = 8
#: bitsandbytes' 8-bit states apply to tensors of at least this many elements; smaller ones keep 32-bit states.
BNB_8BIT_MIN_SIZE = 4096
#: One float32 absmax per this many values of each 8-bit state.
BNB_8BIT_BLOCKSIZE = 256


@dataclass(frozen=True)
class Optimizer:
    """An optimizer: where its class lives, its name in ``TrainingArguments.optim``, the keyword arguments it is
    built with, and its state in bytes a trainable value (for tensors large enough to be 8-bit, where it is)."""

    module: str
    class_name: str
    trainer_name: str
    options: dict = field(default_factory=dict)
    state_bytes: int = FP32_MOMENTS

    def build(self, params: list[torch.nn.Parameter], **hyper) -> torch.optim.Optimizer:
        """The optimizer over ``params`` with ``hyper`` (lr, weight_decay...) and this entry's options."""
        optimizer_class = getattr(importlib.import_module(self.module), self.class_name)
        return optimizer_class(params, **hyper, **self.options)

    def state_bytes_for(self, tensor_numels: list[int]) -> int:
        """Bytes of this optimizer's state for trainable tensors of these sizes (bitsandbytes' 8-bit states:
        one byte a moment plus a float32 absmax a block, for tensors of ``BNB_8BIT_MIN_SIZE`` values or more).
        Paged states live in CUDA managed memory, outside PyTorch's allocator, which will not show them."""
        if self.state_bytes == FP32_MOMENTS:
            return FP32_MOMENTS * sum(tensor_numels)
        return sum(FP32_MOMENTS * n if n < BNB_8BIT_MIN_SIZE
                   else self.state_bytes * n + 2 * math.ceil(n / BNB_8BIT_BLOCKSIZE) * FLOAT32
                   for n in tensor_numels)


#: bitsandbytes' paged optimizers fall back to non-paged on CPU. ``adamw_fused`` is torch's AdamW with
#: ``fused=True``: each step's whole update in fused kernels, where ``adamw`` (torch's multi-tensor "foreach"
#: form on a GPU) launches one kernel per arithmetic operation for each chunk of tensors; for a step bound by
#: launches (the compiled SmolLM2 step's optimizer runs outside its CUDA graphs).
OPTIMIZERS = {
    "adamw": Optimizer("torch.optim", "AdamW", "adamw_torch"),
    "adamw_fused": Optimizer("torch.optim", "AdamW", "adamw_torch_fused", {"fused": True}),
    "adamw8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "adamw_bnb_8bit", state_bytes=2),
    "paged_adamw8bit": Optimizer("bitsandbytes.optim", "PagedAdamW8bit", "paged_adamw_8bit", state_bytes=2),
    "paged_adamw32bit": Optimizer("bitsandbytes.optim", "PagedAdamW32bit", "paged_adamw_32bit"),
}


def check_optimizer(name: str) -> str:
    """``name`` itself when it is in ``OPTIMIZERS``; otherwise a ValueError listing them."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return name
