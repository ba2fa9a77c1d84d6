"""Model FLOPs of a LoRA training step and utilisation against a stated peak.

Counts the work LoRA needs, per token: the forward pass through every matmul weight (2 FLOPs a weight), the
backward pass to the inputs of those frozen weights (2 a weight; their weight gradients are not needed), the
adapters' forward and full backward (6 a LoRA weight), and attention's score and value products (forward 4·s·d
per layer, backward twice that, without the causal halving: the PaLM convention). Recompute under gradient
checkpointing is not counted: it is overhead, not model work. Hardware FLOPs add it
(``recompute_flops_per_token``): what the GPU actually multiplies.
"""

from __future__ import annotations

import torch

from qlora_core.backends import is_linear

#: Dense (no sparsity) tensor-core peaks from the vendors' data sheets, in FLOP/s, by GPU name fragment.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12},
    "H100": {"bfloat16": 989.4e12, "float16": 989.4e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12},
}


def matmul_params(model: torch.nn.Module) -> int:
    """Weights used in matmuls: every linear layer's in x out (the output head included, embeddings excluded),
    whatever its storage: packed 4-bit weights count unpacked, and a backend's layer that replaces a linear
    without being a ``torch.nn.Linear`` (HQQ's: no ``weight`` attribute) counts too.

    Call on the base model before adapters are attached.
    """
    return sum(module.in_features * module.out_features for module in model.modules() if is_linear(module))


def head_dim(config) -> int:
    """Width of one attention head: the config's ``head_dim`` where it has one, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def lora_training_flops_per_token(config, matmul_weights: int, lora_weights: int, seq_len: int) -> float:
    """Model FLOPs one token costs in a LoRA training step (see the module docstring for what counts)."""
    attention = 12 * config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim(config)
    return 4 * matmul_weights + 6 * lora_weights + attention


def recompute_flops_per_token(config, matmul_weights: int, lora_weights: int, seq_len: int, *,
                              gradient_checkpointing: bool, path: str, mlp_tiled: bool = False) -> float:
    """FLOPs recomputation adds a token: with per-layer gradient checkpointing every decoder layer's forward
    again (its matmul weights, its adapters, attention's two products: 4 s d per layer); on the lean path each
    loss chunk's output head as well, checkpointed whatever the setting (``paths.chunked_causal_lm_loss``); with
    the MLP in tiles (``levers.tile_mlps``: each tile checkpointed inside its checkpointed layer) the MLP's
    three projections a third time (their adapters' few FLOPs not counted).
    ``matmul_weights`` includes the head. torch's early stop skips each layer's last adapter up-projection
    (r x h weights), which is not subtracted: a few parts in 100,000 of the recompute at 8B."""
    head = config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim(config)
    layers = 2 * (matmul_weights - head) + 2 * lora_weights + attention
    tiles = 2 * config.num_hidden_layers * 3 * config.hidden_size * config.intermediate_size if mlp_tiled else 0
    return (layers if gradient_checkpointing else 0) + (2 * head if path == "lean" else 0) + tiles


def peak_flops(device: torch.device, dtype: torch.dtype) -> dict | None:
    """The GPU's stated dense peak for ``dtype`` with its source, or None (CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in name and dtype_name in peaks:
            return {"flops_per_s": peaks[dtype_name], "gpu": name, "source": "vendor data sheet, dense"}
    return None
