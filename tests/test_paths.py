"""The reference and lean training paths: same loss and adapter gradients, lean without fp32 upcasts."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from qlora_core.backends.bitsandbytes import keep_no_int8_inputs
from qlora_core.lora import LoraSettings
from qlora_core.models import prepare_for_training
from qlora_core.modes import get_mode
from qlora_core.paths import (
    IGNORE_INDEX,
    attach_adapters,
    causal_lm_loss,
    check_path,
    chunked_causal_lm_loss,
    chunked_causal_lm_nll,
    drop_input_gradients,
    loss_function,
    next_token_labels,
)
from qlora_core.shapes import build_shape_model

CPU = torch.device("cpu")
#: Lean vs reference on one batch: the reference's fp32 embeddings, norms and head change the loss by rounding
#: only. Measured on tiny-llama and tiny-bloom in bf16, nf4-dq and int8 (6 cases, one batch of 2 x 24 each):
#: relative loss difference <= 4e-5, gradient cosine >= 0.99997, gradient norm ratio within 1.1e-3 of 1.
#: The bounds below leave an order of magnitude (bf16's unit roundoff is 3.9e-3).
LOSS_REL_TOL = 1e-3
MIN_GRADIENT_COSINE = 0.999
GRADIENT_NORM_REL_TOL = 1e-2


def batch(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def adapted(shape: str, mode_name: str, path: str, checkpointing: bool = True):
    """A built tiny shape prepared on ``path`` with seeded adapters whose B is non-zero (so A gets gradients)."""
    mode = get_mode(mode_name)
    model = prepare_for_training(build_shape_model(shape, mode, CPU), mode, gradient_checkpointing=checkpointing,
                                 path=path)
    torch.manual_seed(0)
    model = attach_adapters(model, LoraSettings(r=4, alpha=8, dropout=0.0), path)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def loss_and_gradient(model, loss_fn, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, ids)
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return loss.item(), gradient


def test_check_path():
    assert check_path("lean") == "lean"
    with pytest.raises(ValueError, match="reference, lean"):
        check_path("fast")
    assert loss_function("reference") is causal_lm_loss
    assert loss_function("lean") is chunked_causal_lm_loss


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_lean_adapters_take_their_input_in_the_compute_dtype(mode):
    """peft casts a plain linear's adapted input to its fp32 adapters (a copy per adapted layer); the lean path
    leaves the input as autocast gives it, the adapters still fp32 (what the optimizer steps)."""
    seen = {}
    for path in ("reference", "lean"):
        model = adapted("tiny-llama", mode, path)
        dtypes = set()
        for layer in (m for m in model.modules() if isinstance(m, BaseTunerLayer)):
            layer.lora_dropout["default"].register_forward_hook(lambda m, inputs, out: dtypes.add(inputs[0].dtype))
        loss_and_gradient(model, chunked_causal_lm_loss, batch(320))
        assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.float32}
        seen[path] = dtypes
    assert seen["lean"] == {torch.bfloat16}
    if mode == "bf16":  # peft's own cast; on bitsandbytes' layers peft skips it under autocast
        assert seen["reference"] == {torch.float32}


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_the_lean_path_s_embeddings_output_needs_no_gradient_and_the_gradients_stay(mode):
    """transformers' checkpointing and peft (on an unquantized model) each hook the embeddings to make their output
    need a gradient; the lean path drops both, the reference path keeps them. The adapters' gradients are the
    same to the bit with the hook on: nothing reads the embeddings' output's gradient."""
    def embeddings_output(model):
        return model.get_input_embeddings()(torch.ones(1, 2, dtype=torch.long))

    lean, hooked = adapted("tiny-llama", mode, "lean"), adapted("tiny-llama", mode, "lean")
    hooked.get_base_model().enable_input_require_grads()
    assert not embeddings_output(lean).requires_grad and embeddings_output(hooked).requires_grad
    assert embeddings_output(adapted("tiny-llama", mode, "reference")).requires_grad
    ids = batch(320)
    lean_loss, lean_gradient = loss_and_gradient(lean, chunked_causal_lm_loss, ids)
    hooked_loss, hooked_gradient = loss_and_gradient(hooked, chunked_causal_lm_loss, ids)
    assert lean_loss == hooked_loss and torch.equal(lean_gradient, hooked_gradient)
    drop_input_gradients(hooked.get_base_model())
    assert not embeddings_output(hooked).requires_grad


def test_next_token_labels():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert next_token_labels(ids).tolist() == [[6, 7, IGNORE_INDEX], [9, 10, IGNORE_INDEX]]


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_lean_keeps_embeddings_norms_and_head_as_loaded(mode):
    mode_ = get_mode(mode)
    reference = prepare_for_training(build_shape_model("tiny-llama", mode_, CPU), mode_,
                                     gradient_checkpointing=True, path="reference")
    lean = prepare_for_training(build_shape_model("tiny-llama", mode_, CPU), mode_,
                                gradient_checkpointing=True, path="lean")
    unquantized = ("embed_tokens", "norm", "lm_head")
    for model, dtype in ((reference, torch.float32), (lean, torch.bfloat16)):
        dtypes = {p.dtype for n, p in model.named_parameters() if any(part in n for part in unquantized)}
        assert dtypes == {dtype}
        assert model.training and model.is_gradient_checkpointing and model.config.use_cache is False
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("chunk_tokens", [7, 48, 512])
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-bloom"])
def test_chunked_loss_equals_the_models_own(shape, chunk_tokens):
    """On one model, chunking changes only the order of an fp32 sum."""
    model = adapted(shape, "bf16", "lean")
    ids = batch(model.config.vocab_size)
    full, full_gradient = loss_and_gradient(model, causal_lm_loss, ids)
    model.zero_grad(set_to_none=True)
    chunked, chunked_gradient = loss_and_gradient(
        model, lambda m, x: chunked_causal_lm_loss(m, x, chunk_tokens=chunk_tokens), ids
    )
    assert chunked == pytest.approx(full, rel=1e-6)
    torch.testing.assert_close(chunked_gradient, full_gradient, rtol=1e-4, atol=1e-7)


def test_chunked_nll_takes_padded_rows_as_the_model_does():
    """Rows padded on the right, padding masked and labelled IGNORE_INDEX (what a collator hands the Trainer):
    the chunked sum over the scored tokens is the model's own mean loss times their count."""
    model = adapted("tiny-llama", "bf16", "lean")
    ids = batch(model.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, -40:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        total, scored = chunked_causal_lm_nll(model, ids, labels=labels, attention_mask=mask, chunk_tokens=48)
    assert scored.item() == (next_token_labels(labels) != IGNORE_INDEX).sum().item() < ids.numel() - ids.shape[0]
    assert (total / scored).item() == pytest.approx(own.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq", "int8"])
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-bloom"])
def test_lean_and_reference_train_the_same(shape, mode):
    ids = batch(320)
    reference_loss, reference_gradient = loss_and_gradient(adapted(shape, mode, "reference"), causal_lm_loss, ids)
    lean_loss, lean_gradient = loss_and_gradient(adapted(shape, mode, "lean"), chunked_causal_lm_loss, ids)
    assert lean_loss == pytest.approx(reference_loss, rel=LOSS_REL_TOL)
    cosine = torch.nn.functional.cosine_similarity(lean_gradient, reference_gradient, dim=0).item()
    assert cosine >= MIN_GRADIENT_COSINE
    assert lean_gradient.norm().item() == pytest.approx(reference_gradient.norm().item(), rel=GRADIENT_NORM_REL_TOL)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-bloom"])
def test_int8_linears_that_keep_no_inputs_give_bitsandbytes_own_loss_and_gradients(shape):
    """``FrozenInt8Matmul`` changes what is kept, not what is computed: the lean path's int8 loss and adapter
    gradients equal those of bitsandbytes' own matmul on the same model, and every int8 linear is routed."""
    ids = batch(320)
    lean = adapted(shape, "int8", "lean")
    int8_linears = [m for m in lean.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    routed = [m for m in int8_linears if "forward" in vars(m)]
    assert routed and routed == int8_linears
    lean_loss, lean_gradient = loss_and_gradient(lean, chunked_causal_lm_loss, ids)
    own = adapted(shape, "int8", "lean")
    for layer in routed:
        own.get_submodule(next(n for n, m in lean.named_modules() if m is layer)).__dict__.pop("forward")
    own_loss, own_gradient = loss_and_gradient(own, chunked_causal_lm_loss, ids)
    assert lean_loss == own_loss
    torch.testing.assert_close(lean_gradient, own_gradient, rtol=0, atol=0)


def test_no_int8_linear_no_routing():
    assert keep_no_int8_inputs(adapted("tiny-llama", "nf4-dq", "lean")) == 0
