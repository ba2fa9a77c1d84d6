"""Model FLOPs of a LoRA step: weights counted by hand on the tiny model's shapes, FLOPs by torch."""

from __future__ import annotations

import pytest
import torch

from tiny import TINY
from qlora_core.lora import LoraSettings, attach_lora
from qlora_core.measure.flops import (lora_training_flops_per_token, matmul_params, peak_flops,
                                      recompute_flops_per_token)
from qlora_core.models import load_model
from qlora_core.modes import get_mode

CPU = torch.device("cpu")


def linear_weights_by_hand(vocab: int) -> int:
    """q, o: hidden x hidden; k, v: hidden x (kv heads * head dim); gate, up, down: hidden x intermediate;
    the output head hidden x vocab (embeddings are a lookup, not a matmul)."""
    hidden, inter = TINY["hidden_size"], TINY["intermediate_size"]
    kv = TINY["num_key_value_heads"] * hidden // TINY["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    return TINY["num_hidden_layers"] * per_layer + hidden * vocab


def test_matmul_params_counts_linears_and_head(tiny_source):
    model = load_model(tiny_source, get_mode("bf16"), CPU)
    assert matmul_params(model) == linear_weights_by_hand(model.config.vocab_size)


def test_4bit_weights_are_counted_unpacked(tiny_source):
    bf16 = matmul_params(load_model(tiny_source, get_mode("bf16"), CPU))
    assert matmul_params(load_model(tiny_source, get_mode("nf4"), CPU)) == bf16
    assert matmul_params(load_model(tiny_source, get_mode("int8"), CPU)) == bf16


@pytest.mark.parametrize("seq_len", [16, 64])
def test_flops_per_token_match_torch_s_own_count(tiny_model_dir, seq_len):
    """The formula against torch's FlopCounterMode over one real LoRA forward and backward of the tiny model.

    Eager attention in fp32, so every product is a counted matmul; gradients are asked for the input embeddings
    so the backward reaches the first layer's inputs, as the formula assumes for every frozen weight (the
    PaLM convention); no recompute (checkpointing off); LoRA dropout 0 changes no FLOPs but keeps it simple.
    Two sequence lengths: the attention term grows with the sequence, the rest does not.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    matmul = matmul_params(model)
    model.requires_grad_(False)
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)).train()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch_size = 2
    ids = torch.randint(0, 256, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeddings, labels=ids).loss.backward()
    counted_per_token = counter.get_total_flops() / (batch_size * seq_len)
    assert lora_training_flops_per_token(model.config, matmul, lora, seq_len) == counted_per_token


def test_no_peak_for_cpu():
    assert peak_flops(CPU, torch.bfloat16) is None


def test_recompute_flops_match_torch_s_count_under_checkpointing(tiny_model_dir):
    """With per-layer checkpointing torch counts every layer's forward twice: the hardware FLOPs of a step are
    the model FLOPs plus ``recompute_flops_per_token`` (the reference path: the model's own loss, no chunks),
    less what torch's early stop skips: a layer's recompute ends once its last saved tensor is recovered, before
    the last adapter's up-projection (down_proj's lora_B, h x r weights; 1e-5 of the recompute at 8B)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    matmul = matmul_params(model)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0)).train()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch_size, seq_len = 2, 32
    ids = torch.randint(0, 256, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeddings, labels=ids).loss.backward()
    counted_per_token = counter.get_total_flops() / (batch_size * seq_len)
    model_flops = lora_training_flops_per_token(model.config, matmul, lora, seq_len)
    recompute = recompute_flops_per_token(model.config, matmul, lora, seq_len, gradient_checkpointing=True,
                                          path="reference")
    skipped = 2 * model.config.num_hidden_layers * model.config.hidden_size * 4  # r = 4
    assert 0 < recompute < model_flops and model_flops + recompute - skipped == counted_per_token
