"""Named model shapes: real architectures built with random weights, quantized directly into a mode.

Memory and step time do not depend on the weights' values (with one caveat: LLM.int8's outlier path depends on
activation magnitudes, and random weights make every input column of the MLP's down projection an outlier), so a
shape measures what a 1B-70B model costs without downloading it. Perplexity means nothing here: every result of a shape says ``RANDOM_WEIGHTS_NOTE``.

``build_shape_model`` builds the skeleton on the meta device, lets transformers' own quantizer for the mode swap
the linear layers for its backend's layers (so the modules are exactly those ``from_pretrained`` makes), then
materializes one parameter at a time: a linear weight is drawn in the load dtype on the target device and
quantized there at once by its backend (a backend that quantizes after loading, HQQ, replaces the linear as soon
as its weight is drawn), so at most one layer's bf16 weights exist beside the stored model. A 70B shape in
4-bit therefore needs about 40 GB, where its bf16 weights alone (141 GB) would not fit one H200.
"""

from __future__ import annotations

import torch

from qlora_core import backends
from qlora_core.modes import Mode

RANDOM_WEIGHTS_NOTE = "random weights: memory and time only"

#: RoPE of the Llama 3.1/3.2 family (transformers 5's ``rope_parameters``), from the models' config.json.
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

#: name -> transformers config keyword arguments, with the public architecture numbers of each model's
#: config.json on the Hugging Face Hub. Only shapes: tokenizers, special tokens and weights are not needed.
SHAPES: dict[str, dict] = {
    "Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
    ),
    "Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0},
    ),
    "Llama-2-13B": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "Llama-3.1-70B": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0},
    ),
    "Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
    ),
    # The embedded default model's architecture (its config.json): its speed figures without staging the model,
    # which a GPU machine without network must be sent in pieces.
    "SmolLM2-135M": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # The classic QLoRA tutorial's base: ALiBi positions (no length limit in the config), fused query_key_value,
    # a 4x GELU MLP, LayerNorms with biases, tied embeddings; transformers implements only eager attention.
    "BLOOM-3B": dict(
        model_type="bloom", hidden_size=2560, n_layer=30, n_head=32, vocab_size=250880, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    ),
    # A small Llama for checking the memory model's activation terms on the CPU (tests/test_floor_heap.py): wide
    # enough that a step's activations dwarf the few fixed-size tensors the model leaves out, and its MLP 3.5x
    # as wide as the residual, like Llama-3.1-8B's.
    "small-llama": dict(
        model_type="llama", hidden_size=256, intermediate_size=896, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False,
    ),
    # Tiny shapes of the same families, for CPU tests: 64 wide keeps 4-bit blocks (64 weights) whole.
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    "tiny-bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4, vocab_size=320,
                       tie_word_embeddings=True),
}

#: Published parameter counts (embeddings and head included, a tied matrix once), for checking SHAPES.
PUBLISHED_PARAMS = {
    "Llama-3.2-1B": 1.236e9, "Llama-3.1-8B": 8.030e9, "Llama-2-13B": 13.016e9, "Llama-3.1-70B": 70.554e9,
    "Qwen2.5-7B": 7.616e9, "BLOOM-3B": 3.003e9, "SmolLM2-135M": 134.515e6,
}


class UnknownShapeError(ValueError):
    """A shape name that is not in ``SHAPES``; the message lists the valid ones."""


def check_shape(name: str) -> str:
    """``name`` itself when it is a registered shape; otherwise ``UnknownShapeError`` listing them."""
    if name not in SHAPES:
        raise UnknownShapeError(f"unknown shape {name!r}; valid shapes: {', '.join(SHAPES)}")
    return name


def shape_config(name: str):
    """The transformers config of the named shape (a fresh object each call)."""
    from transformers import AutoConfig

    kwargs = dict(SHAPES[check_shape(name)])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def shape_source(name: str):
    """A ``ModelSource`` describing the shape (no files): its provenance says the weights are random."""
    from qlora_core.models import ModelSource

    provenance = {"source": RANDOM_WEIGHTS_NOTE, "shape": check_shape(name), "config": SHAPES[name]}
    return ModelSource(f"shape:{name}", name, provenance)


def random_weights_int8_outliers(config) -> dict[str, float] | None:
    """LLM.int8's outlier columns a layer that a shape's random weights make, by linear name, for the memory
    floor (``measure.floor.int8_held_inputs_bytes_per_token``): every column of a Llama/Qwen2 MLP's intermediate,
    none elsewhere (the ``int8_outliers`` the H200 measured for the Llama-3.1-8B and Qwen2.5-7B shapes,
    h200-scale-2026-12-02); None for a family not measured."""
    from qlora_core.measure.floor import GATED_MLP_FAMILIES

    if config.model_type not in GATED_MLP_FAMILIES:
        return None
    return {"down_proj": float(config.intermediate_size)}


def random_blocks(vocab_size: int, n_blocks: int, seq_len: int, seed: int) -> torch.Tensor:
    """Uniformly random token ids [n_blocks, seq_len]: training data for a shape, whose cost is all we measure."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, seq_len), generator=generator)


def _as_config(name_or_config):
    return shape_config(name_or_config) if isinstance(name_or_config, str) else name_or_config


def empty_model(config, dtype: torch.dtype):
    """The causal LM of ``config`` with every parameter on the meta device (no memory) in ``dtype``; buffers
    (RoPE frequency tables) are real, on the CPU, computed as the model's constructor computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights re-registers parameters, which unties a tied head from embeddings
    return model


def quantizer(mode: Mode):
    """transformers' own quantizer for ``mode``, as ``from_pretrained`` would create it (None: half precision)."""
    from transformers.quantizers import AutoHfQuantizer

    config = mode.quantization_config()
    return None if config is None else AutoHfQuantizer.from_config(config, pre_quantized=False)


def _random_value(name: str, shape: torch.Size, dtype: torch.dtype, device, generator, std: float):
    """Initial value of a parameter by its role: biases 0, 1-D weights (norm scales) 1, matrices N(0, std)."""
    if name == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype, device=device)
    value = torch.empty(shape, dtype=dtype, device=device)
    return value.normal_(0.0, std, generator=generator)


def _stored_parameter(old: torch.nn.Parameter, value: torch.Tensor, device: torch.device) -> torch.nn.Parameter:
    """``value`` stored as ``old`` (a meta placeholder) says: quantized by its backend where it is a backend's
    parameter, a plain frozen parameter otherwise."""
    for backend in backends.BACKENDS.values():
        if (stored := backend.stored_parameter(old, value, device)) is not None:
            return stored
    return torch.nn.Parameter(value, requires_grad=False)


def _materialize(model, mode: Mode, device: torch.device, seed: int) -> None:
    """Replace every meta parameter by a random one on ``device``, one at a time (tied parameters once); a linear
    whose backend quantizes after loading is quantized as soon as its weight is drawn."""
    dtype = mode.load_dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    done: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, old in list(module._parameters.items()):
            if old is None or not old.is_meta:
                continue
            if id(old) not in done:
                value = _random_value(name, old.shape, dtype, device, generator, std)
                done[id(old)] = _stored_parameter(old, value, device)
                del value
            module._parameters[name] = done[id(old)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
        if (layer := backends.quantized_layer(module_name, module, mode, device)) is not None:
            model.set_submodule(module_name, layer)


def build_shape_model(name_or_config, mode: Mode, device: torch.device | str, seed: int = 0):
    """A causal LM of the named shape (or a config) with random weights stored as ``mode`` says, on ``device``.

    The result is what ``from_pretrained(..., quantization_config=mode.quantization_config(), dtype=mode.load_dtype)``
    returns for the same config: the same modules, dtypes and bytes as stored, the quantizer attributes peft
    reads (``is_loaded_in_4bit``/``is_loaded_in_8bit``, ``quantization_method``, ``config.quantization_config``),
    eval mode. Peak memory while building: the stored model plus one layer's weights in the load dtype.
    """
    backends.require(mode)
    device = torch.device(device)
    config = _as_config(name_or_config)
    model = empty_model(config, mode.load_dtype)
    mode_quantizer = quantizer(mode)
    if mode_quantizer is not None:  # swap nn.Linear for the mode's quantized layers, still on meta
        mode_quantizer.preprocess_model(model=model, dtype=mode.load_dtype, device_map={"": device})
    _materialize(model, mode, device, seed)
    if mode_quantizer is not None:
        model.hf_quantizer = mode_quantizer
        mode_quantizer.postprocess_model(model)
    model.config.name_or_path = getattr(config, "name_or_path", "") or "shape"
    backends.after_build(model)
    return model.eval()
