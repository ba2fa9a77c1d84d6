"""Perplexity over a token stream with overlapping windows.

Protocol (the one Hugging Face documents for fixed-length models): windows of ``window`` tokens start every
``stride`` tokens; in each window only the tokens not scored by an earlier window are scored, so every token
after the first is scored exactly once, with at least ``window - stride`` tokens of context when available.
Perplexity is exp of the token-weighted mean negative log-likelihood (natural log).
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext

import torch


def check_protocol(window: int, stride: int) -> None:
    """Refuse a window/stride pair the protocol cannot score (see ``windows``)."""
    if not 0 < stride < window:
        raise ValueError(f"need 0 < stride < window, got stride {stride}, window {window}")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) for each window; the scored tokens are the last ``n_scored`` of [begin, end).

    ``stride`` must be below ``window``: a window's first scored token needs context inside the same window
    (with ``stride == window`` it would have none, and the logits could not be aligned with the targets).
    """
    check_protocol(window, stride)
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    spans, scored_until = [], 1  # token 0 has no context and is never scored
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        spans.append((begin, end, end - scored_until))
        scored_until = end
        if end == n_tokens:
            break
    return spans


def _same_shape_batches(spans: list[tuple[int, int, int]], batch_size: int):
    """Consecutive windows of equal length and scored count, ``batch_size`` at a time."""
    for _, same_shape in itertools.groupby(spans, key=lambda span: (span[1] - span[0], span[2])):
        same_shape = list(same_shape)
        for start in range(0, len(same_shape), batch_size):
            yield same_shape[start : start + batch_size]


def _window_nll(model, inputs: torch.Tensor, n_scored: int) -> torch.Tensor:
    """Summed NLL (float64) of the last ``n_scored`` tokens of each row of ``inputs`` [batch, length].

    Only the positions that predict a scored token go through the output head (``logits_to_keep``, which every
    transformers causal LM takes): at stride = window / 2 that halves the head's work and its logits."""
    logits = model(input_ids=inputs, logits_to_keep=n_scored + 1).logits[:, :-1].float()
    targets = inputs[:, -n_scored:]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return -log_probs.double().sum()


@torch.no_grad()
def perplexity(
    model,
    token_ids: torch.Tensor,
    *,
    window: int,
    stride: int,
    batch_size: int = 1,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Perplexity of ``model`` on ``token_ids`` [n_tokens] (see module docstring for the protocol).

    Windows of equal length and equal scored count are batched ``batch_size`` at a time (every window but
    the first and the last). The model is left in the train/eval mode it came in.

    Returns plain JSON: ``perplexity``, ``mean_nll`` (nats/token), ``n_tokens_scored``, ``n_windows``,
    ``window``, ``stride``.
    """
    device = next(model.parameters()).device
    token_ids = token_ids.to(device)
    was_training = model.training
    model.eval()
    spans = windows(token_ids.numel(), window, stride)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    total_nll, total_scored = 0.0, 0
    with autocast:
        for group in _same_shape_batches(spans, batch_size):
            n_scored = group[0][2]
            inputs = torch.stack([token_ids[begin:end] for begin, end, _ in group])
            total_nll += _window_nll(model, inputs, n_scored).item()
            total_scored += n_scored * len(group)
    model.train(was_training)
    mean_nll = total_nll / total_scored
    return {
        "perplexity": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "n_tokens_scored": total_scored,
        "n_windows": len(spans),
        "window": window,
        "stride": stride,
    }
