"""Two ways of running the same LoRA training: the common recipe, and a lean one that keeps only what the memory
floor (``qlora_core.measure.floor``) says is needed.

- ``reference``: peft's ``prepare_model_for_kbit_training`` for quantized modes (it upcasts embeddings, norms and
  the head to fp32), and the model's own loss, which materializes full-vocabulary logits and their fp32 copy.
- ``lean``: the base frozen as loaded (no upcast), non-reentrant gradient checkpointing, LLM.int8 linears that
  keep nothing for backward but their weights (``backends.bitsandbytes.FrozenInt8Matmul``), adapters that take
  their input in the compute dtype (``lean_adapters``), an embeddings' output that needs no gradient
  (``drop_input_gradients``), and the loss computed in chunks of tokens, each chunk's
  head and cross-entropy under checkpointing, so only one chunk's logits exist at a time, in forward and in
  backward. Mathematically the same loss (a mean token NLL in fp32) and the same gradients.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_core import backends
from qlora_core.lora import LoraSettings, attach_lora

PATHS = ("reference", "lean")
IGNORE_INDEX = -100
#: Tokens per chunk of the lean path's loss: with a 128k vocabulary one chunk's fp32 logits take 256 MiB.
LOSS_CHUNK_TOKENS = 512


def check_path(path: str) -> str:
    """``path`` itself when it is a known path; otherwise a ValueError listing them."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    return path


def prepare_lean(model, *, gradient_checkpointing: bool):
    """Freeze the base without changing any dtype, with each backend's lean changes (``backends.prepare_lean``:
    int8 linears that keep no inputs); non-reentrant checkpointing needs no input gradients."""
    model.requires_grad_(False)
    backends.prepare_lean(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        drop_input_gradients(model)
        model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF skips checkpointing and LoRA dropout
    return model


def drop_input_gradients(model) -> None:
    """Remove the hook that makes the embeddings' output need a gradient. transformers adds it whenever
    checkpointing is turned on, and peft again when adapters go on an unquantized model; only reentrant
    checkpointing needs it. Left on, it costs the first layer's input gradient, which nothing reads; it keeps the
    embeddings' output on the GPU under the activation offload (a leaf that requires grad: its gradient
    accumulator holds it); and under torch.compile its ``requires_grad_()`` breaks the step into several graphs.
    Each ``enable_input_require_grads`` replaces the handles the previous one kept, so each is removed before
    the next is added."""
    model.disable_input_require_grads()


def lean_adapters(peft_model):
    """After ``lora.attach_lora`` on the lean path: every adapter takes its input in the dtype it arrives in.

    peft keeps adapters in fp32 and, on a plain ``torch.nn.Linear`` (the bf16 and fp16 modes), casts each
    adapted layer's input to fp32 first: a full-size fp32 copy of the activation, and the dropout run on it, in
    every adapted layer, forward and recompute. Under autocast that buys nothing (the adapter's matmul casts back
    to the compute dtype), and peft itself skips the cast under autocast on bitsandbytes' and HQQ's layers
    (H200 profile of 2026-12-02: the copies and fp32 dropout are why SmolLM2 stepped slower in bf16 than in
    hqq4). The adapters stay fp32, so the optimizer is unchanged; the model must run under autocast, as the
    trainer and evaluation do (without it the adapters' fp32 weights meet a bf16 input and torch raises).
    The embeddings' output needs no gradient (``drop_input_gradients``). Returns the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # peft's switch (peft.helpers.disable_input_dtype_casting)
    drop_input_gradients(peft_model.get_base_model())
    return peft_model


def attach_adapters(model, lora: LoraSettings, path: str):
    """``lora.attach_lora`` on a base prepared for ``path`` (``models.prepare_for_training``), the adapters as the
    path runs them: ``lean_adapters`` on the lean path, peft's own on the reference. Returns the peft model."""
    peft_model = attach_lora(model, lora)
    return lean_adapters(peft_model) if check_path(path) == "lean" else peft_model


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own mean next-token NLL (labels are the inputs; the model shifts them)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def body_and_head(model):
    """The decoder stack (returns final hidden states) and the output head of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels [batch, seq]: position i predicts token i+1; the last position of each row predicts nothing."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _chunk_nll_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed NLL of one chunk: hidden [n, h] through the head to fp32 logits [n, V], like the model's loss."""
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_nll(model, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None,
                          chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token NLL in fp32, tokens scored), with at most ``chunk_tokens`` positions' logits alive.

    ``labels`` as a Hugging Face model takes them (unshifted, ``IGNORE_INDEX`` where nothing is scored, e.g.
    padding; default: the inputs), ``attention_mask`` as it takes it. Each chunk's head and cross-entropy run
    under non-reentrant checkpointing: forward keeps only the chunk's hidden states (a view of the final hidden
    states) and labels; backward recomputes the chunk's logits. The sum, not the mean, so a caller that
    accumulates micro-batches can divide by the tokens of all of them (as transformers' Trainer does).
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, h], contiguous: a view
    targets = next_token_labels(input_ids if labels is None else labels).reshape(-1)
    chunk_loss = functools.partial(_chunk_nll_sum, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        # nothing random in a chunk: no RNG state to save and restore for its recompute
        total = total + checkpoint(chunk_loss, hidden[start:end], targets[start:end], use_reentrant=False,
                                   preserve_rng_state=False)
    return total, (targets != IGNORE_INDEX).sum()


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token NLL equal to ``causal_lm_loss``, computed in chunks (``chunked_causal_lm_nll``)."""
    total, scored = chunked_causal_lm_nll(model, input_ids, chunk_tokens=chunk_tokens)
    return total / scored


def loss_function(path: str):
    """The loss ``LoraTrainer`` computes on ``path``: ``fn(model, input_ids) -> scalar mean NLL``."""
    return chunked_causal_lm_loss if check_path(path) == "lean" else causal_lm_loss
