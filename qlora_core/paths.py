"""Two ways of running the same LoRA training: the common recipe, and a lean one that keeps only what the memory
floor (``qlora_core.measure.floor``) says is needed.

- ``reference``: peft's ``prepare_model_for_kbit_training`` for quantized modes (it upcasts embeddings, norms and
  the head to fp32), and the model's own loss, which materializes full-vocabulary logits and their fp32 copy.
- ``lean``: the base frozen as loaded (no upcast), non-reentrant gradient checkpointing, LLM.int8 linears that
  keep nothing for backward but their weights (``FrozenInt8Matmul``), and the loss computed in chunks of tokens,
  each chunk's head and cross-entropy under checkpointing, so only one chunk's logits exist at a time, in
  forward and in backward. Mathematically the same loss (a mean token NLL in fp32) and the same gradients.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PATHS = ("reference", "lean")
IGNORE_INDEX = -100
#: Tokens per chunk of the lean path's loss: with a 128k vocabulary one chunk's fp32 logits take 256 MiB.
LOSS_CHUNK_TOKENS = 512


def check_path(path: str) -> str:
    """``path`` itself when it is a known path; otherwise a ValueError listing them."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    return path


class FrozenInt8Matmul(torch.autograd.Function):
    """An LLM.int8 linear whose weight is frozen, keeping nothing for backward but the weight itself.

    bitsandbytes' own matmul keeps its input (and the input's outlier columns) as attributes of its autograd
    context, where gradient checkpointing cannot drop them: every int8 layer's inputs stay alive from its
    forward to its backward (``measure.floor.int8_held_inputs_bytes_per_token``), which put int8's lean peak at
    twice its floor on the H200. Those inputs serve only the weight's gradient, which a frozen base never needs.
    Forward runs bitsandbytes' kernel outside autograd; backward is bitsandbytes' own input gradient, from the
    int8 weight and its row scales (``state.CB``, ``state.SCB``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_dtype = x.dtype
        with torch.no_grad():
            return type(layer).forward(layer, x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        state = ctx.layer.state
        # bitsandbytes' MatMul8bitLt.backward for the input: dequantize the rows, one weight-sized transient
        weight = state.CB.to(ctx.input_dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad_output.to(ctx.input_dtype), weight), None


def _frozen_int8_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return FrozenInt8Matmul.apply(x, layer)


def keep_no_int8_inputs(model) -> int:
    """Route every LLM.int8 linear of ``model`` through ``FrozenInt8Matmul``; returns how many. Its weight must
    stay frozen: the weight's gradient is never computed."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:  # no bitsandbytes, no int8 linears
        return 0
    layers = [module for module in model.modules() if isinstance(module, Linear8bitLt)]
    for layer in layers:
        layer.forward = functools.partial(_frozen_int8_forward, layer)
    return len(layers)


def prepare_lean(model, *, gradient_checkpointing: bool):
    """Freeze the base without changing any dtype, its int8 linears keeping no inputs (``keep_no_int8_inputs``);
    non-reentrant checkpointing needs no input gradients."""
    model.requires_grad_(False)
    keep_no_int8_inputs(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()  # from_pretrained returns eval mode, where HF skips checkpointing and LoRA dropout
    return model


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's own mean next-token NLL (labels are the inputs; the model shifts them)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def _body_and_head(model):
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


def chunked_causal_lm_loss(model, input_ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token NLL equal to ``causal_lm_loss``, with at most ``chunk_tokens`` positions' logits alive.

    Each chunk's head and cross-entropy run under non-reentrant checkpointing: forward keeps only the chunk's
    hidden states (a view of the final hidden states) and labels; backward recomputes the chunk's logits.
    """
    body, head = _body_and_head(model)
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, h], contiguous: a view
    labels = next_token_labels(input_ids).reshape(-1)
    chunk_loss = functools.partial(_chunk_nll_sum, head)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk_tokens):
        end = start + chunk_tokens
        # nothing random in a chunk: no RNG state to save and restore for its recompute
        total = total + checkpoint(chunk_loss, hidden[start:end], labels[start:end], use_reentrant=False,
                                   preserve_rng_state=False)
    return total / (labels != IGNORE_INDEX).sum()


def loss_function(path: str):
    """The loss ``LoraTrainer`` computes on ``path``: ``fn(model, input_ids) -> scalar mean NLL``."""
    return chunked_causal_lm_loss if check_path(path) == "lean" else causal_lm_loss
