"""Perplexity against independent hand computations, and the window protocol's coverage."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from qlora_core.measure.perplexity import perplexity, windows

N_TOKENS = 100


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny model in float32 (no autocast), so hand computations can be compared tightly."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def token_ids(tokenizer) -> torch.Tensor:
    from qlora_core.data import load_texts, token_stream

    return token_stream(tokenizer, load_texts()[:20])[:N_TOKENS]


def nll_of_next(model, context: torch.Tensor, target: int) -> float:
    """-log p(target | context) from one forward over the context alone."""
    with torch.no_grad():
        last = model(input_ids=context.unsqueeze(0)).logits[0, -1].double()
    return -torch.log_softmax(last, dim=-1)[target].item()


class ZeroLogits(torch.nn.Module):
    """Logits all zero: a uniform distribution over ``vocab`` tokens, whatever the input."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.unused = torch.nn.Parameter(torch.zeros(1))  # perplexity() reads the device from a parameter

    def forward(self, input_ids, logits_to_keep):
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], logits_to_keep, self.vocab))


@pytest.mark.parametrize("window, stride, batch_size", [(16, 15, 1), (16, 5, 3), (200, 100, 1)])
def test_uniform_model_has_perplexity_vocab_size(token_ids, window, stride, batch_size):
    result = perplexity(ZeroLogits(259), token_ids, window=window, stride=stride, batch_size=batch_size)
    # exact up to float32 rounding of log_softmax (log 259 carries ~1e-7 relative error in float32)
    assert result["perplexity"] == pytest.approx(259, rel=1e-6)
    assert result["mean_nll"] == pytest.approx(math.log(259), rel=1e-6)
    assert result["n_tokens_scored"] == N_TOKENS - 1


def test_zeroed_head_gives_vocab_size(tiny_model_dir, token_ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.lm_head.bias is None
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = perplexity(model, token_ids, window=32, stride=16, batch_size=2)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-6)


def test_single_window_matches_full_forward(model, token_ids):
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=token_ids.unsqueeze(0)).logits[0].double(), dim=-1)
    nll = [-log_probs[t - 1, token_ids[t]].item() for t in range(1, N_TOKENS)]
    expected = math.exp(sum(nll) / len(nll))
    result = perplexity(model, token_ids, window=128, stride=64)
    assert result["n_windows"] == 1 and result["n_tokens_scored"] == N_TOKENS - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("window, stride", [(32, 16), (24, 7), (10, 1)])
def test_strided_matches_token_by_token_loop(model, token_ids, window, stride):
    """Each token t >= 1 is scored once, by the first window (starting at a multiple of stride) that reaches it,
    with that window's tokens before it as context."""
    nll = []
    for t in range(1, N_TOKENS):
        begin = next(b for b in range(0, N_TOKENS, stride) if min(b + window, N_TOKENS) > t)
        nll.append(nll_of_next(model, token_ids[begin:t], token_ids[t].item()))
    result = perplexity(model, token_ids, window=window, stride=stride)
    assert result["n_tokens_scored"] == len(nll)
    assert result["mean_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@pytest.mark.parametrize("batch_size", [2, 4, 64])
def test_batched_equals_unbatched(model, token_ids, batch_size):
    one = perplexity(model, token_ids, window=16, stride=8, batch_size=1)
    many = perplexity(model, token_ids, window=16, stride=8, batch_size=batch_size)
    assert many["n_tokens_scored"] == one["n_tokens_scored"] and many["n_windows"] == one["n_windows"]
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_restores_training_mode(model, token_ids):
    model.train()
    perplexity(model, token_ids[:20], window=8, stride=4)
    assert model.training
    model.eval()
    perplexity(model, token_ids[:20], window=8, stride=4)
    assert not model.training


@pytest.mark.parametrize("n_tokens", [2, 3, 17, 64, 65, 100])
@pytest.mark.parametrize("window, stride", [(2, 1), (8, 7), (8, 3), (16, 1), (64, 32), (200, 50)])
def test_windows_cover_every_token_after_the_first_once(n_tokens, window, stride):
    scored = []
    spans = windows(n_tokens, window, stride)
    for begin, end, n_scored in spans:
        assert 0 <= begin < end <= n_tokens and end - begin <= window
        assert 1 <= n_scored <= end - begin - 1  # the first scored token has context inside the window
        scored += range(end - n_scored, end)
    assert scored == list(range(1, n_tokens))
    assert spans[-1][1] == n_tokens
    assert [b for b, _, _ in spans] == list(range(0, stride * len(spans), stride))


def test_windows_context_is_window_minus_stride():
    for begin, end, n_scored in windows(100, 32, 8)[1:]:
        assert (end - begin) - n_scored >= 32 - 8


@pytest.mark.parametrize("n_tokens, window, stride", [(10, 4, 0), (10, 4, 5), (1, 4, 2), (0, 4, 3), (10, 1, 1)])
def test_windows_invalid(n_tokens, window, stride):
    with pytest.raises(ValueError):
        windows(n_tokens, window, stride)


def test_stride_equal_to_window_is_refused_up_front(model, token_ids):
    """Disjoint windows would leave each later window's first token without context; refused with a clear
    message rather than failing inside the forward pass (it used to raise a gather shape error)."""
    with pytest.raises(ValueError, match="stride < window"):
        perplexity(model, token_ids, window=16, stride=16)
