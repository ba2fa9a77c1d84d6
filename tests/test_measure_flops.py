"""Model FLOPs of a LoRA step, counted by hand on the tiny model's shapes."""

from __future__ import annotations

import torch

from tiny import TINY
from qlora_core.measure.flops import lora_training_flops_per_token, matmul_params, peak_flops
from qlora_core.models import load_config, load_model
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


def test_flops_per_token_formula(tiny_source):
    config = load_config(tiny_source)
    matmul, lora, seq_len = 1000, 100, 32
    attention = 12 * TINY["num_hidden_layers"] * seq_len * TINY["hidden_size"]
    assert lora_training_flops_per_token(config, matmul, lora, seq_len) == 4 * matmul + 6 * lora + attention


def test_no_peak_for_cpu():
    assert peak_flops(CPU, torch.bfloat16) is None
