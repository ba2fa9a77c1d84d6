"""The analytic memory floor of a LoRA training step: what the weights, adapters, optimizer, saved activations
and logits must take, in bytes, derived from the model's shape, the mode and the training set-up.

Everything is counted in bytes, per component, so it can sit beside what the CUDA allocator measured (after load,
after set-up, peak of the training steps) with the unexplained remainder. Notation (per micro-batch):

    T = batch_size * seq_len tokens, L layers, h hidden size, f MLP width, V vocabulary, r LoRA rank,
    n_h / n_kv attention / key-value heads of width d, c = 2 bytes (bf16/fp16 compute),
    e = bytes of the residual stream (2; 4 on the reference path of a quantized mode, whose fp32-upcast
    embeddings make every residual add fp32, but for a backend peft does not upcast: HQQ), o = bytes of a 4-bit
    linear's output (bitsandbytes casts it back to its input's dtype, so e; autocast gives c for every other
    linear, HQQ's too).

Two paths are predicted (``qlora_core.paths``): ``reference`` (peft's ``prepare_model_for_kbit_training`` with its
fp32 upcasts of embeddings, norms and head where it makes them, and the model's own loss over full-vocabulary
logits) and ``lean`` (no upcasts, loss in chunks of ``LOSS_CHUNK_TOKENS`` tokens under checkpointing). The lean
prediction is the floor proper: it keeps only what backward needs. The per-layer accounting was checked tensor by
tensor against autograd's saved tensors on tiny models (tests/test_measure_floor.py); terms that depend on the
device's autocast (BLOOM's LayerNorm runs in fp32 under CUDA autocast, in its input dtype under CPU autocast) take
``device_type``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from qlora_core import backends
from qlora_core.levers import Levers
from qlora_core.measure.flops import head_dim
from qlora_core.modes import Mode
from qlora_core.optimizers import OPTIMIZERS
from qlora_core.paths import LOSS_CHUNK_TOKENS, check_path
from qlora_core.strategies import check_strategy, fsdp_units, mode_for
from qlora_core.units import FLOAT32, INT64

GATED_MLP_FAMILIES = ("llama", "qwen2", "mistral")
#: A decoder layer's module path in a linear's name: Llama/Qwen2 ``model.layers.N.``, BLOOM ``transformer.h.N.``.
DECODER_LAYER = re.compile(r"(.*\.(?:layers|h)\.\d+)\.")
BLOOM_FAMILIES = ("bloom",)


@dataclass(frozen=True)
class Linear:
    """One linear layer of the skeleton: its name, features, and how the mode stores it."""

    name: str
    in_features: int
    out_features: int
    storage: str  # "dense" or a backend's storage ("4bit", "int8": backends.layer_storage)
    has_bias: bool


# --- weights ------------------------------------------------------------------------------------------------------


def reference_upcasts(mode: Mode, path: str) -> bool:
    """Whether ``path`` casts the mode's unquantized weights to fp32: peft's k-bit preparation on the reference
    path, for a quantized mode whose backend it does not exempt."""
    return path == "reference" and mode.is_quantized and backends.backend_of(mode).kbit_preparation_upcasts


def skeleton(config, mode: Mode):
    """The model of ``config`` on the meta device with the mode's quantized layers swapped in (no memory used):
    the same modules ``from_pretrained`` and ``build_shape_model`` make (for a backend that quantizes after
    loading, its meta placeholders: ``Backend.quantize_linear``)."""
    from qlora_core.shapes import empty_model, quantizer

    model = empty_model(config, mode.load_dtype)
    if (mode_quantizer := quantizer(mode)) is not None:
        mode_quantizer.preprocess_model(model=model, dtype=mode.load_dtype, device_map={"": "cpu"})
    backends.quantize_after_load(model, mode, torch.device("meta"))
    return model


def linears(model) -> list[Linear]:
    """Every linear layer of a (skeleton) model with how it is stored: ``torch.nn.Linear`` and its subclasses, and
    a backend's layers that replace it without subclassing it (HQQ's)."""
    found = []
    for name, module in model.named_modules():
        if not backends.is_linear(module):
            continue
        found.append(Linear(name, module.in_features, module.out_features, backends.layer_storage(module),
                            module.bias is not None))
    return found


def weight_bytes(model, mode: Mode) -> dict:
    """Bytes of the weights as stored after loading, split like ``weight_footprint``: quantized data, their
    constants, and everything else (embeddings, norms, head, biases in the load dtype; buffers as they are)."""
    counts = {"quantized_bytes": 0, "quant_constants_bytes": 0, "unquantized_bytes": 0}
    quantized = [layer for layer in linears(model) if layer.storage != "dense"]
    for layer in quantized:
        data, constants = backends.backend_of(mode).stored_bytes(layer.storage, layer.in_features,
                                                                 layer.out_features, mode)
        counts["quantized_bytes"] += data
        counts["quant_constants_bytes"] += constants
    # Every other parameter (a tied one is yielded once) in the load dtype. A quantized layer transformers made
    # has its data as a parameter named ``weight``, counted above; a placeholder of a backend that quantizes
    # after loading has none (its bias, where it has one, is counted here).
    quantized_weights = {f"{layer.name}.weight" for layer in quantized}
    load_bytes = mode.load_dtype.itemsize
    counts["unquantized_bytes"] += sum(param.numel() * load_bytes for name, param in model.named_parameters()
                                       if name not in quantized_weights)
    counts["unquantized_bytes"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return {"weights_bytes": sum(counts.values()), **counts}


def upcast_bytes(model, mode: Mode, path: str) -> int:
    """Bytes the path's preparation adds to the weights: on the reference path of a quantized mode, peft casts
    every fp16/bf16 parameter that is not 4-bit data (embeddings, norms, head, biases) to fp32, where it does so
    for the mode's backend (``Backend.kbit_preparation_upcasts``)."""
    if not reference_upcasts(mode, path):
        return 0
    quantized = {f"{layer.name}.weight" for layer in linears(model) if layer.storage != "dense"}
    load_bytes = mode.load_dtype.itemsize
    return sum(p.numel() * (FLOAT32 - load_bytes) for n, p in model.named_parameters() if n not in quantized)


# --- LoRA ---------------------------------------------------------------------------------------------------------


def lora_targets(model, lora) -> list[Linear]:
    """The linear layers peft adapts: ``"all-linear"`` is every linear but the output head; names match a
    module's last component (peft's rule for a list of names)."""
    head = model.get_output_embeddings()
    head_names = {name for name, module in model.named_modules() if module is head}
    found = [layer for layer in linears(model) if layer.name not in head_names]
    if isinstance(lora.target_modules, str) and lora.target_modules.lower() == "all-linear":
        return found
    names = (lora.target_modules,) if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    return [layer for layer in found if layer.name.split(".")[-1] in names]


def optimizer_state_bytes(tensor_numels: list[int], optimizer: str) -> int:
    """Bytes of the optimizer's state for trainable tensors of these sizes (``optimizers.Optimizer``)."""
    return OPTIMIZERS[optimizer].state_bytes_for(tensor_numels)


def lora_bytes(targets: list[Linear], lora, optimizer: str) -> dict:
    """Adapter parameters (A: r x in, B: out x r per target, kept in fp32 by peft), their fp32 gradients and
    the optimizer state."""
    numels = [n for t in targets for n in (lora.r * t.in_features, t.out_features * lora.r)]
    params = sum(numels)
    return {
        "lora_params": params,
        "lora_param_bytes": params * FLOAT32,
        "lora_grad_bytes": params * FLOAT32,
        "optimizer_state_bytes": optimizer_state_bytes(numels, optimizer),
    }


# --- activations --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Bytes of the tensors whose dtype depends on mode and path (see the module docstring)."""

    compute: int  # c
    residual: int  # e
    linear_out: int  # o, for the MLP's linears
    norm_stats: int  # BLOOM LayerNorm's saved input and statistics (fp32 under CUDA autocast)
    adapter_input_copies: bool = True  # each adapter saves its own copy of its input (see lora_input_bytes_...)
    dropout_mask: int = 1  # a LoRA dropout's saved mask, a value (0 without dropout)

    @classmethod
    def of(cls, mode: Mode, path: str, device_type: str, lora_dropout: float = 0.05) -> Precision:
        compute = mode.torch_compute_dtype.itemsize
        residual = FLOAT32 if reference_upcasts(mode, path) else 2
        linear_out = residual if mode.is_4bit else compute
        norm_stats = FLOAT32 if device_type == "cuda" else residual
        copies = path != "lean" or lora_dropout > 0
        # CUDA's fused dropout keeps a bool mask; the CPU's keeps it in the input's dtype (the compute dtype under
        # autocast: seen storage by storage on a CPU step, 2026-12-03)
        mask = 0 if lora_dropout == 0 else 1 if device_type == "cuda" else compute
        return cls(compute, residual, linear_out, norm_stats, copies, mask)


#: Adapted linears that read one input tensor (Llama/Qwen2 names): without copies, their adapters save it once.
SHARED_INPUTS = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "gate_proj": "mlp input", "up_proj": "mlp input"}
#: Adapted linears whose input, uncopied, is a tensor the layer saves anyway: o_proj's is SDPA's output (its
#: transpose back is contiguous, so no copy), counted in ``gated_layer_bytes_per_token``.
INPUTS_SAVED_ELSEWHERE = ("o_proj",)


def lora_input_bytes_per_token(layer_targets: list[Linear], lora, p: Precision) -> int:
    """Per token, what one layer's adapters save: the input of ``lora_A``, the rank-r product ``x A`` for
    ``lora_B``'s gradient, and with dropout the mask (``p.dropout_mask`` bytes a value).

    With ``p.adapter_input_copies`` every adapter saves an input of its own: its dropout's output, or peft's
    cast of it (on the reference path), so q, k and v hold three. Without (the lean path, no dropout: no cast,
    dropout the identity) the adapters of linears reading one tensor save that tensor once (``SHARED_INPUTS``),
    and one reading a tensor the layer saves anyway adds nothing (``INPUTS_SAVED_ELSEWHERE``): checked storage by
    storage against autograd's saved tensors (tests/test_measure_floor.py)."""
    mask = p.dropout_mask
    products = sum(lora.r * p.compute for _ in layer_targets)
    if p.adapter_input_copies:
        return products + sum(t.in_features * (p.compute + mask) for t in layer_targets)
    names = {t.name.rsplit(".", 1)[-1]: t for t in layer_targets}
    inputs = {SHARED_INPUTS.get(name, name): t.in_features for name, t in names.items()
              if name not in INPUTS_SAVED_ELSEWHERE}
    return products + sum(width * p.compute for width in inputs.values())


def norm_bytes_per_token(config, p: Precision) -> int:
    """Per token, what one norm saves: RMSNorm its input upcast to fp32 (4h) and the fp32 reciprocal RMS (4);
    BLOOM's LayerNorm its input and mean and rstd (``norm_stats`` bytes each)."""
    if config.model_type in BLOOM_FAMILIES:
        return p.norm_stats * (config.hidden_size + 2)
    return FLOAT32 * (config.hidden_size + 1)


#: The linears of a Llama/Qwen2 MLP: what ``levers.tile_mlps`` runs in tiles.
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def gated_mlp_bytes_per_token(config, p: Precision) -> int:
    """Per token, what a Llama/Qwen2 MLP saves besides its adapters: the gate and up projections' outputs and
    silu(gate) (f each, o bytes)."""
    return 3 * config.intermediate_size * p.linear_out


def mlp_bytes_per_token(config, layer_targets: list[Linear], lora, p: Precision) -> int:
    """Per token, what one layer's MLP saves, its adapters' inputs included: the part of ``layer_bytes_per_token``
    that MLP tiling (``levers.tile_mlps``) holds for one tile at a time. 0 outside the gated families (BLOOM's
    MLP is not tiled)."""
    if config.model_type not in GATED_MLP_FAMILIES:
        return 0
    mlp_targets = [t for t in layer_targets if t.name.rsplit(".", 1)[-1] in MLP_LINEARS]
    return gated_mlp_bytes_per_token(config, p) + lora_input_bytes_per_token(mlp_targets, lora, p)


def gated_layer_bytes_per_token(config, p: Precision) -> int:
    """Per token, what a Llama/Qwen2 decoder layer saves for backward besides its adapters:

    - two RMSNorms (``norm_bytes_per_token``);
    - attention (SDPA: flash or memory-efficient): q and the output (n_h d each), k and v (n_kv d each) in the
      compute dtype, and the fp32 log-sum-exp per head;
    - the MLP: gate and up projections' outputs and the activation silu(gate) (f each, o bytes).
    Frozen linears save nothing for themselves (their input gradient needs only the weight).
    """
    n_h, n_kv = config.num_attention_heads, config.num_key_value_heads
    d = head_dim(config)
    norms = 2 * norm_bytes_per_token(config, p)
    attention = p.compute * (2 * n_h * d + 2 * n_kv * d) + FLOAT32 * n_h
    return norms + attention + gated_mlp_bytes_per_token(config, p)


def bloom_layer_bytes_per_token(config, seq_len: int, p: Precision) -> int:
    """Per token, what a BLOOM block saves besides its adapters (transformers has eager attention only):

    - two LayerNorms (``norm_bytes_per_token``; fp32 under CUDA autocast);
    - attention: q, k, v (h each, compute dtype), the fp32 softmax output and its compute-dtype copy
      (n_h x seq_len each: the full score matrix, one row per token);
    - the MLP: the GELU's input (4h, o bytes).
    """
    h, n_h = config.hidden_size, config.num_attention_heads
    norms = 2 * norm_bytes_per_token(config, p)
    attention = 3 * h * p.compute + n_h * seq_len * (FLOAT32 + p.compute)
    return norms + attention + 4 * h * p.linear_out


#: The linears whose input is the attention output (compute dtype, from SDPA or BLOOM's attention under
#: autocast), and those whose input is the MLP's intermediate; every other linear's input is a norm's output.
ATTENTION_OUTPUT_LINEARS = ("o_proj", "dense")
MLP_INTERMEDIATE_LINEARS = ("down_proj", "dense_4h_to_h")


def _norm_output_bytes(config, p: Precision) -> int:
    """Bytes of one value of a norm's output: the residual dtype (BLOOM's LayerNorm: ``norm_stats``)."""
    return p.norm_stats if config.model_type in BLOOM_FAMILIES else p.residual


def saved_linear_inputs_bytes_per_token(config, p: Precision) -> int:
    """Per token, the inputs one layer's quantized linears save for backward where their backend's own matmul
    saves them (``saves_linear_inputs``; hqq 0.2.8's ``HQQMatmulNoCacheMul``, for a weight gradient it never
    computes). They are autograd's saved tensors, so checkpointing drops them with the rest of the layer. Linears
    that share an input save it once: the attention's and the MLP's input (norm outputs, h each), and the MLP's
    intermediate (compute dtype: f, BLOOM 4h); BLOOM's attention output too (h, compute dtype), where the Llama
    family's is SDPA's own saved output, already counted in ``gated_layer_bytes_per_token``."""
    h, c = config.hidden_size, p.compute
    norm_outputs = 2 * h * _norm_output_bytes(config, p)
    if config.model_type in BLOOM_FAMILIES:
        return norm_outputs + h * c + 4 * h * c
    return norm_outputs + config.intermediate_size * c


def _int8_input_bytes(config, name: str, p: Precision, device_type: str) -> int:
    """Bytes of one value of the input of the int8 linear called ``name`` (its name's last component).

    A norm's output keeps the residual dtype (BLOOM's LayerNorm: ``norm_stats``); the attention output is in the
    compute dtype. The MLP's intermediate is the dtype of the int8 up-projections' output: on CUDA their kernel
    returns its input's dtype, the norm output's; on CPU bitsandbytes' training path runs ``F.linear``, which
    autocast casts to the compute dtype."""
    norm_output = _norm_output_bytes(config, p)
    if name in ATTENTION_OUTPUT_LINEARS:
        return p.compute
    if name in MLP_INTERMEDIATE_LINEARS:
        return norm_output if device_type == "cuda" else p.compute
    return norm_output


def int8_held_inputs_bytes_per_token(config, p: Precision, device_type: str,
                                     outlier_columns: dict[str, float] | None = None) -> int:
    """Per token, what one layer's LLM.int8 linears keep alive beyond autograd's saved tensors.

    bitsandbytes (0.50) keeps an int8 matmul's input as a ctx attribute (``MatMul8bitLt``: ``ctx.tensors``, with
    the input's outlier columns ``subA``; the CPU training path ``MatMul8bitFp``: ``ctx.A``), not through
    ``save_for_backward``: non-reentrant checkpointing's saved-tensor hooks never see it, so every layer's int8
    inputs stay alive from its forward to its backward, checkpointing or not. Linears that share an input hold
    it once: the two norms' outputs, the attention output and the MLP's intermediate (BLOOM: 4h wide), each at
    ``_int8_input_bytes``. ``subA`` is each linear's own copy of its input's outlier columns (|value| above the
    threshold anywhere in the batch): ``outlier_columns`` maps a linear's name (``down_proj``) to its columns a
    layer, as measured (``backends.outliers``); None counts none. With random weights nearly every column of the
    MLP's intermediate is an outlier, so a shape's int8 figures hold a full extra copy of it a layer that a real
    checkpoint need not.
    """
    h = config.hidden_size
    if config.model_type in BLOOM_FAMILIES:
        widths = {"query_key_value": h, "dense_h_to_4h": h, "dense": h, "dense_4h_to_h": 4 * h}
    else:
        attention_output = config.num_attention_heads * head_dim(config)
        widths = {"q_proj": h, "gate_proj": h, "o_proj": attention_output, "down_proj": config.intermediate_size}
    inputs = sum(width * _int8_input_bytes(config, name, p, device_type) for name, width in widths.items())
    outliers = sum(columns * _int8_input_bytes(config, name, p, device_type)
                   for name, columns in (outlier_columns or {}).items())
    return inputs + math.ceil(outliers)


def layer_bytes_per_token(config, layer_targets, lora, seq_len: int, p: Precision) -> int:
    """Per token, everything one layer saves for backward (its adapters included)."""
    if config.model_type in GATED_MLP_FAMILIES:
        body = gated_layer_bytes_per_token(config, p)
    elif config.model_type in BLOOM_FAMILIES:
        body = bloom_layer_bytes_per_token(config, seq_len, p)
    else:
        raise NotImplementedError(f"no activation accounting for model type {config.model_type!r}")
    return body + lora_input_bytes_per_token(layer_targets, lora, p)


def layer_bytes(config, layer_targets, lora, seq_len: int, tokens: int, p: Precision,
                levers: Levers = Levers()) -> int:
    """Everything one layer saves for ``tokens`` tokens: the per-token tensors, and the adapters' weights as
    autocast casts them to the compute dtype once a forward (each saved for its input's gradient). With the MLP
    in tiles (``levers``) it holds ``tiled_mlp_bytes`` instead of its whole tensors."""
    casts = p.compute * lora.r * sum(t.in_features + t.out_features for t in layer_targets)
    per_token = layer_bytes_per_token(config, layer_targets, lora, seq_len, p)
    if levers.mlp_tile_tokens is None:
        return tokens * per_token + casts
    mlp = mlp_bytes_per_token(config, layer_targets, lora, p)
    return tokens * (per_token - mlp) + tiled_mlp_bytes(config, layer_targets, lora, tokens, p, levers) + casts


def tiled_mlp_bytes(config, layer_targets, lora, tokens: int, p: Precision, levers: Levers) -> int:
    """What a layer's MLP in tiles holds while the layer is recomputed: one tile's tensors
    (``mlp_bytes_per_token``) and its whole input, the second norm's output, held by the tiles' checkpoints
    (h values a token in the residual dtype)."""
    tile = levers.mlp_tokens(tokens) * mlp_bytes_per_token(config, layer_targets, lora, p)
    return tile + tokens * config.hidden_size * p.residual


def rope_table_bytes(config, seq_len: int, p: Precision) -> int:
    """RoPE's cos and sin [seq_len, head_dim] in the residual dtype, computed once and saved by every layer."""
    if config.model_type not in GATED_MLP_FAMILIES:
        return 0
    return 2 * seq_len * head_dim(config) * p.residual


def first_layer_targets(targets: list[Linear]) -> list[Linear]:
    """The adapted linears of one decoder layer (every layer has the same; layer 0's are taken)."""
    prefix_parts = {".layers.0.", ".h.0."}
    return [t for t in targets if any(part in f".{t.name}." for part in prefix_parts)]


# --- logits and transients ----------------------------------------------------------------------------------------


def logits_phase_bytes(tokens: int, vocab: int, head_cast_bytes: int) -> int:
    """Peak of the loss over ``tokens`` positions: in backward, the saved fp32 log-softmax, the fp32 gradient
    reaching it and the fp32 gradient it produces (12 bytes a logit; forward holds 10: bf16 logits, their fp32
    copy, the log-softmax), plus the head's weight cast by autocast when the head is stored in fp32."""
    return 3 * FLOAT32 * tokens * vocab + head_cast_bytes


def layer_backward_transient(config, tokens: int, p: Precision, largest: Linear | None,
                             levers: Levers = Levers(), recomputed: bool = True, brought_back: int = 0,
                             int8_quantizing: int = 0) -> int:
    """Working set of one layer's backward beyond its saved tensors (bytes): the larger of two moments.

    - The MLP's backward: the gradients coming in (the layer's output gradient and, at the top layer, the loss's
      gradient of the final hidden states: h each, e bytes), MLP-wide gradients (f each, o bytes; for one
      tile's tokens with the MLP in tiles, plus the MLP input's gradient the tiles accumulate, h values in the
      compute dtype) and the largest quantized weight dequantized to the compute dtype (bitsandbytes does so for
      each 4-bit matmul and for int8's backward; HQQ for each matmul too, where hqq 0.2.8's dequantization holds
      up to three such tensors at once, counted as one until measured on a GPU). A Llama/Qwen2 MLP's backward
      holds one such gradient beside its saved tensors (the down projection's input gradient: its adapter's
      saved input is freed as the next is made, storage by storage on a CPU step, 2026-12-03); BLOOM's is
      counted with three, unmeasured.
    - Under checkpointing (``recomputed``), the end of a Llama/Qwen2 layer's recompute (``recompute_end_bytes``),
      which was the layer's peak on that CPU step, with the input the recompute brought back from the host
      (``brought_back`` bytes: ``activation_terms``); where an LLM.int8 down projection quantizes its input in
      the recompute, the larger moment then (``int8_quantizing`` bytes: ``int8_quantize_transient``).
    """
    f = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    incoming = tokens * 2 * config.hidden_size * p.residual
    gated = config.model_type in GATED_MLP_FAMILIES
    mlp = levers.mlp_tokens(tokens) * (1 if gated else 3) * f * p.linear_out
    tiled_input = 0 if levers.mlp_tile_tokens is None else tokens * config.hidden_size * p.compute
    dequantized = largest.in_features * largest.out_features * p.compute if largest else 0
    mlp_backward = incoming + mlp + tiled_input + dequantized
    if not (gated and recomputed):
        return mlp_backward
    recompute = max(recompute_end_bytes(config, tokens, p, levers), int8_quantizing)
    return max(mlp_backward, incoming + brought_back + recompute)


def recompute_end_bytes(config, tokens: int, p: Precision, levers: Levers = Levers()) -> int:
    """What a Llama/Qwen2 layer's recomputed forward holds when it returns, beyond the tensors it saved: its
    local results, alive until the forward's frame is gone: the attention block's residual sum (h, e bytes), the
    second norm's output (h, e bytes; with the MLP in tiles the tiles hold it, counted in ``tiled_mlp_bytes``),
    the MLP's intermediate (f, o bytes; one tile's) and the down projection's output (h, o bytes). Found storage
    by storage on a CPU step (2026-12-03): with the incoming gradients, this moment is the untiled layer's peak,
    and with it the H200's lean-path peaks of issue 10 (4,096 to 65,536 tokens) are predicted within 1 %."""
    h, f = config.hidden_size, config.intermediate_size
    norm_output = h * p.residual if levers.mlp_tile_tokens is None else 0
    return (tokens * (h * p.residual + norm_output + h * p.linear_out)
            + levers.mlp_tokens(tokens) * f * p.linear_out)


#: Bytes a value of an LLM.int8 linear's input adds while bitsandbytes (0.50, CUDA: ``int8_vectorwise_quant``)
#: quantizes it, by whether an outlier threshold is set: the input cast to fp16 (the int8 mode computes in bf16)
#: and the int8 result, and with a threshold the fp16 absolute values and the bool outlier mask made from them,
#: all alive at the mask's making. The H200's allocator history of an 8B int8 lean step (2026-12-03) held exactly
#: these beside the MLP's recomputed tensors at its peak.
INT8_QUANTIZE_BYTES_PER_VALUE = {False: 2 + 1, True: 2 + 1 + 2 + 1}


def int8_quantize_transient(config, tokens: int, p: Precision, layer_targets: list[Linear], lora,
                            threshold: float, levers: Levers = Levers()) -> int:
    """What a Llama/Qwen2 layer's recompute holds beyond its recomputed activations (``layer_bytes``) while an
    LLM.int8 down projection quantizes its input (on CUDA; bitsandbytes' CPU path dequantizes the weight
    instead): the recompute's locals so far (``recompute_end_bytes`` but the down projection's output, not made
    yet), the quantization's temporaries (``INT8_QUANTIZE_BYTES_PER_VALUE``, f values a token), less what the
    down projection's adapter saves, which ``layer_bytes`` counts but peft makes only after the base layer's
    matmul. The up projections quantize inputs f / h times narrower: the down projection's moment is the larger
    one in Llama/Qwen2 MLPs (f > h). With the MLP in tiles, one tile's (unmeasured)."""
    h, f = config.hidden_size, config.intermediate_size
    mlp_tokens = levers.mlp_tokens(tokens)
    down = [t for t in layer_targets if t.name.rsplit(".", 1)[-1] == "down_proj"]
    not_yet_saved = mlp_tokens * lora_input_bytes_per_token(down, lora, p)
    locals_so_far = recompute_end_bytes(config, tokens, p, levers) - tokens * h * p.linear_out
    return locals_so_far + mlp_tokens * f * INT8_QUANTIZE_BYTES_PER_VALUE[threshold > 0] - not_yet_saved


def quantizes_int8_down_projections(config, quantized: list[Linear], device_type: str,
                                    levers: Levers = Levers()) -> bool:
    """Whether the layers' down projections, among the ``quantized`` linears, are LLM.int8 linears that quantize
    their input on each call (CUDA: ``int8_quantize_transient``), in a family whose recompute the floor follows
    (Llama/Qwen2). The dequantized int8 matmul (``levers``) quantizes nothing: it holds a dequantized weight, as
    the 4-bit modes do."""
    return (device_type == "cuda" and config.model_type in GATED_MLP_FAMILIES and not levers.int8_dequantized
            and any(layer.storage == "int8" and layer.name.endswith(".down_proj") for layer in quantized))


#: Bytes a value of RMSNorm's backward holds at its peak beyond its saved tensors and incoming gradient: its fp32
#: temporaries (the upcast gradient, its products with the input and the reciprocal RMS, the pow's gradient),
#: measured op by op for a bf16 input (20 bytes a value, 2026-12-03: the glibc heap read after every autograd
#: op of one ``LlamaRMSNorm`` backward on the CPU; the ops and their dtypes are CUDA's too).
RMS_NORM_BACKWARD_BYTES_PER_VALUE = 5 * FLOAT32


def tiled_norm_backward_transient(config, tokens: int, p: Precision, mlp_held_bytes: int) -> int:
    """With the MLP in tiles, the other moment of a layer's backward that can be its peak, as a transient beside
    the layer's recomputed activations (``layer_bytes``): the second norm's backward, after the MLP's tiles are
    done. The MLP's tile tensors and its whole input (``mlp_held_bytes``) are freed by then; alive are the
    layer's output gradient (h, e bytes) and the norm's backward temporaries
    (``RMS_NORM_BACKWARD_BYTES_PER_VALUE``, h values a token): the norm output's gradient the tiles accumulated is
    freed once the norm's backward has cast it to fp32, and the gradient going out is made last. The H200's
    allocator history of an 8B step (2026-12-03: seven fp32 and eight bf16 hidden-wide blocks alive at the peak,
    where the earlier count of three gradients made ten) and a CPU step storage by storage agree. Untiled, the
    MLP's moments are larger; tiled, this one is, once the tile is small."""
    h = config.hidden_size
    per_token = h * p.residual + RMS_NORM_BACKWARD_BYTES_PER_VALUE * h
    return tokens * per_token - mlp_held_bytes


def optimizer_transient(lora_params: int) -> int:
    """Foreach AdamW's temporary fp32 list (the square roots of the second moments): 4 bytes a parameter."""
    return FLOAT32 * lora_params


# --- FSDP: one rank's shards and the units it gathers -------------------------------------------------------------

#: The FSDP unit of every parameter that no unit of its own holds (``strategies.wrap``: the loss module).
ROOT_UNIT = "root"
#: The kinds of FSDP unit, as ``sharding["unit_bytes"]`` names them.
UNIT_KINDS = ("root", "embeddings", "layer", "head")


@dataclass(frozen=True)
class ShardedParam:
    """One parameter as FSDP2 holds it: ``rows`` along dim 0, the dim it shards, and one row's bytes as trained
    by floor component (``quantized_bytes``: 4-bit data in its storage dtype; ``unquantized_bytes`` in the load
    dtype, the reference path's fp32 upcast adding ``upcast_bytes``; ``lora_param_bytes``: an fp32 adapter), in
    ``unit``: the module name of the FSDP unit that gathers it, or ``ROOT_UNIT``."""

    unit: str
    rows: int
    row_bytes: dict[str, int]

    def shard_bytes(self, num_processes: int, component: str | None = None) -> int:
        """Bytes of one rank's shard, of one component (None: all of them). FSDP2 pads dim 0 to a multiple of
        the ranks and every rank allocates its padded share, ceil(rows / N) rows (rank 0's all real rows)."""
        row = sum(self.row_bytes.values()) if component is None else self.row_bytes.get(component, 0)
        return math.ceil(self.rows / num_processes) * row

    def gathered_bytes(self, num_processes: int, component: str | None = None) -> int:
        """Bytes of the parameter gathered whole: every rank's padded shard."""
        return num_processes * self.shard_bytes(num_processes, component)


def fsdp_unit_kinds(model) -> dict[str, str]:
    """The FSDP units of a skeleton (``strategies.fsdp_units``) by module name, each with its kind: ``layer``,
    ``embeddings`` or ``head``."""
    kinds = {id(model.get_input_embeddings()): "embeddings", id(model.get_output_embeddings()): "head"}
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(unit)]: kinds.get(id(unit), "layer") for unit in fsdp_units(model)}


def sharded_params(model, mode: Mode, lora, path: str) -> list[ShardedParam]:
    """Every parameter FSDP2 shards when the skeleton ``model`` trains on ``path``, the adapters included: a
    4-bit weight as bitsandbytes stores it for FSDP (``strategies.mode_for``: its packed data as a column of
    values of the storage dtype), every other parameter (a tied one once) by its own dim 0, each adapter's A
    (r x in) and B (out x r) in fp32. Buffers and quantization constants are not parameters: every rank keeps
    them whole (bitsandbytes keeps a 4-bit weight's constants on its module, ``Linear4bit.quant_state``, where
    FSDP does not look)."""
    units = [f"{name}." for name in fsdp_unit_kinds(model)]

    def unit_of(name: str) -> str:
        return next((unit[:-1] for unit in units if name.startswith(unit)), ROOT_UNIT)

    quantized = {f"{layer.name}.weight": layer for layer in linears(model) if layer.storage != "dense"}
    load, storage = mode.load_dtype.itemsize, mode.torch_quant_storage.itemsize
    upcast = FLOAT32 - load if reference_upcasts(mode, path) else 0
    params = []
    for name, param in model.named_parameters():
        if (layer := quantized.get(name)) is not None:
            data, _ = backends.backend_of(mode).stored_bytes(layer.storage, layer.in_features, layer.out_features,
                                                             mode)
            params.append(ShardedParam(unit_of(name), math.ceil(data / storage), {"quantized_bytes": storage}))
            continue
        values = param.numel() // param.shape[0]  # a row's
        row = {"unquantized_bytes": values * load} | ({"upcast_bytes": values * upcast} if upcast else {})
        params.append(ShardedParam(unit_of(name), param.shape[0], row))
    for target in lora_targets(model, lora):
        unit = unit_of(f"{target.name}.")
        params.append(ShardedParam(unit, lora.r, {"lora_param_bytes": target.in_features * FLOAT32}))
        params.append(ShardedParam(unit, target.out_features, {"lora_param_bytes": lora.r * FLOAT32}))
    return params


def fsdp_terms(model, mode: Mode, lora, path: str, optimizer: str, num_processes: int, weights: dict) -> dict:
    """What one rank of ``num_processes`` holds under FSDP2 (``strategies.wrap``), rank 0's, the most any holds:
    the weight and adapter components as its shards (``ShardedParam``; the quantization constants and buffers
    whole; the adapters' gradients, views of each unit's reduce-scatter output, and AdamW's state on the local
    shards: all / N), and ``sharding``, what the step gathers beside them (``fsdp_gathered_bytes``). ``weights``:
    ``weight_bytes`` of the skeleton, whole as every rank loads it before it is sharded."""
    n = num_processes
    params = sharded_params(model, mode, lora, path)
    shards = {key: sum(p.shard_bytes(n, key) for p in params)
              for key in ("quantized_bytes", "unquantized_bytes", "upcast_bytes", "lora_param_bytes")}
    adapters = [p for p in params if "lora_param_bytes" in p.row_bytes]
    local_numels = [p.shard_bytes(n, "lora_param_bytes") // FLOAT32 for p in adapters]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    per_rank = {
        "quantized_bytes": shards["quantized_bytes"],
        "quant_constants_bytes": weights["quant_constants_bytes"],
        "unquantized_bytes": shards["unquantized_bytes"] + buffers,
    }
    return {
        **per_rank,
        "weights_bytes": sum(per_rank.values()),
        "upcast_bytes": shards["upcast_bytes"],
        "lora_params": sum(local_numels),
        "lora_param_bytes": shards["lora_param_bytes"],
        "lora_grad_bytes": shards["lora_param_bytes"],
        "optimizer_state_bytes": optimizer_state_bytes(local_numels, optimizer),
        "sharding": sharding(model, params, path, n, weights["weights_bytes"]),
    }


def sharding(model, params: list[ShardedParam], path: str, num_processes: int, loaded_weights_bytes: int) -> dict:
    """The FSDP2 terms of one rank (bytes; plain JSON): ``num_processes``; ``loaded_weights_bytes``, the weights
    whole as each rank loads them; ``shard_bytes``, its shards of every parameter (weights, upcasts, adapters);
    ``unit_bytes``, each kind of unit (``UNIT_KINDS``) gathered whole; ``layer_grad_bytes``, a decoder layer's
    adapter gradients as autograd makes them (unsharded, fp32); ``reduce_scatter_bytes``, the buffer they are
    copied into, padded, for the reduce-scatter; and ``gathered_bytes``, what each step phase holds of these
    beside the shards (``fsdp_gathered_bytes``).

    Read in torch 2.13's FSDP2 (``torch/distributed/fsdp/_fully_shard``), default settings as ``wrap`` uses them:

    - A unit is gathered for its forward and again for its backward, resharded after each; the root, never
      resharded after forward, stays gathered from the forward's start to the backward's end. A decoder layer's
      recompute under checkpointing runs inside its backward's gather (the pre-forward hook skips the unshard
      in backward), so it gathers nothing more.
    - In backward each unit prefetches the one before it in forward order: the all-gather's output buffer
      (the unit's padded bytes) is held until that unit's backward copies it out. With one rank there is no
      all-gather: the unshard copies the shard into the unsharded parameter itself, so nothing is prefetched.
      In forward, without explicit prefetching, a unit is gathered only when it runs.
    - A unit's gradients are copied into a reduce-scatter input and freed; the input is kept until the next
      unit's reduce-scatter (one in flight). The sharded gradients are views of the reduce-scatter's output.

    So a decoder layer's backward holds the root, the layer, its gradients unsharded (in place of its shard of
    them, which the sharded gradients count, as one process's floor counts every layer's gradients at that
    phase), the unit it prefetches (the layer below; the bottom layer the embeddings, where they are a unit)
    and the layer above's reduce-scatter input (the top layer's neighbour, the head or the root, has no
    adapters): the most of these over the layers, beside one process's layer backward. The loss, at its
    logits' backward, holds the root and what the root's backward prefetched first, the unit that ran last: the
    head, or (tied) the top layer. On the lean path that head buffer becomes the head gathered for each chunk's
    recompute (the head's own prefetch of the top layer comes after the logits' backward); on the reference
    path the head is gathered only after the loss's backward.

    Checked on 1 and 2 gloo ranks on the CPU (tests/test_floor_fsdp.py): each rank's shards byte for byte, and
    its heap's peak over a step, read after every op, against one process's. On CUDA the all-gathers and
    reduce-scatters allocate on streams of their own, and the caching allocator gives a freed block back to its
    own stream only: how that shifts the peak a CPU cannot show, so a one-process FSDP cell's measured peak is
    checked against this on a GPU (tests/test_floor_fsdp.py, marked ``gpu``). One process of the 8B shape on an
    H100 and an H200 peaked within 2 % of it, and FSDP's addition over DDP within ``fsdp_addition_bounds``
    (tests/test_floor_published.py)."""
    n = num_processes
    kinds = {ROOT_UNIT: "root", **fsdp_unit_kinds(model)}
    gathered = dict.fromkeys(kinds, 0)
    for p in params:
        gathered[p.unit] += p.gathered_bytes(n)
    units = {kind: next((gathered[name] for name, k in kinds.items() if k == kind), 0) for kind in UNIT_KINDS}
    first_layer = next(name for name, kind in kinds.items() if kind == "layer")  # every layer has the same
    layer_adapters = [p for p in params if p.unit == first_layer and "lora_param_bytes" in p.row_bytes]
    layer_grad = sum(p.rows * p.row_bytes["lora_param_bytes"] for p in layer_adapters)
    layer_grad_shard = sum(p.shard_bytes(n, "lora_param_bytes") for p in layer_adapters)
    reduce_scatter = sum(p.gathered_bytes(n, "lora_param_bytes") for p in layer_adapters)
    prefetched = units if n > 1 else dict.fromkeys(units, 0)
    layers = sum(kind == "layer" for kind in kinds.values())
    # layer i (bottom first) prefetches the unit before it and keeps layer i + 1's reduce-scatter input
    before = [prefetched["embeddings"]] + [prefetched["layer"]] * (layers - 1)
    after = [reduce_scatter] * (layers - 1) + [0]
    # the layer's gradients exist unsharded, in place of its shard of them, which ``lora_grad_bytes`` counts
    unreduced = layer_grad - layer_grad_shard
    layer_backward = units["root"] + units["layer"] + unreduced + max(b + a for b, a in zip(before, after))
    # The root's backward starts by prefetching the unit that ran last: the head, or (tied) the top layer. On the
    # lean path the head's buffer becomes the head gathered for the chunks' recompute.
    if path == "lean":
        loss = units["root"] + units["head"] + (0 if units["head"] else prefetched["layer"])
    else:
        loss = units["root"] + (prefetched["head"] or prefetched["layer"])
    return {
        "num_processes": n,
        "loaded_weights_bytes": loaded_weights_bytes,
        "shard_bytes": sum(p.shard_bytes(n) for p in params),
        "unit_bytes": units,
        "layer_grad_bytes": layer_grad,
        "reduce_scatter_bytes": reduce_scatter,
        "gathered_bytes": {"loss": loss, "layer_backward": layer_backward, "optimizer_step": 0},
    }


def fsdp_addition_bounds(fsdp_floor: dict, alone_floor: dict, near: float) -> tuple[int, int]:
    """The least and the most (bytes) FSDP's peak may lie above the same cell's peak without it (its floor
    ``alone_floor``, DDP's or one process's), by the floors' phases. FSDP adds its gathered units to the same
    activations, so what the floor misses or over-counts in a phase it misses alike under both: the cell's
    peak without FSDP is in one of the phases predicted within ``near`` (a fraction) of its predicted peak, and
    there FSDP adds at least what it gathers in that phase; it cannot add more than the most it gathers in any.
    A difference of two peaks predicted at different phases inherits both phases' errors; these bounds do not."""
    gathered = fsdp_floor["sharding"]["gathered_bytes"]
    peak = alone_floor["peak_bytes"]
    candidates = [phase for phase, held in alone_floor["phase_peak_bytes"].items() if held >= peak * (1 - near)]
    return min(gathered[phase] for phase in candidates), max(gathered.values())


# --- the floor ----------------------------------------------------------------------------------------------------


def int8_layers_count(model) -> int:
    """Decoder layers with LLM.int8 linears (every layer in the int8 mode, none in the others)."""
    return len({match.group(1) for layer in linears(model) if layer.storage == "int8"
                if (match := DECODER_LAYER.match(layer.name))})


def saves_linear_inputs(mode: Mode, path: str) -> bool:
    """Whether the mode's quantized linears save their inputs for backward: those of a backend whose own matmul
    does (``Backend.matmul_saves_inputs``: HQQ's), on the reference path; the lean path routes them through one
    that saves none (``Backend.prepare_lean``)."""
    return path == "reference" and mode.is_quantized and backends.backend_of(mode).matmul_saves_inputs


def activation_terms(config, model, lora, seq_len: int, tokens: int, gradient_checkpointing: bool, path: str,
                     p: Precision, device_type: str, int8_outlier_columns: dict[str, float] | None = None,
                     linear_inputs_saved: bool = False, levers: Levers = Levers(),
                     embeddings_output_held: bool = False) -> dict:
    """Bytes of the activations a step keeps, by component (see the module docstring for the notation).
    ``linear_inputs_saved``: the quantized linears save their inputs (``saves_linear_inputs``). With activations
    offloaded (``levers``), ``offloaded_activations_bytes`` are in host memory: every layer's input (the first's,
    the embeddings' output, too: the lean path makes it need no gradient, ``paths.drop_input_gradients``), the
    final norm's fp32 input and the loss chunks' hidden states. ``embeddings_output_held``: the embeddings'
    output needs a gradient, so its gradient accumulator holds it on the GPU whatever the offload does (runs
    published before ``drop_input_gradients``, whose floors do not record it). Under the levers' cap on host memory
    (``offload_host_gib``) what does not fit stays on the GPU (``offloaded_split``). With every layer's input
    offloaded, the one a layer's recompute brings back is alive until the recompute returns
    (``brought_back_bytes``: the H200's allocator history of an 8B step without MLP tiles, 2026-12-03, held one
    hidden-wide bf16 block more than the floor counted before)."""
    targets = first_layer_targets(lora_targets(model, lora))
    linear_inputs = saved_linear_inputs_bytes_per_token(config, p) if linear_inputs_saved else 0
    per_layer = layer_bytes(config, targets, lora, seq_len, tokens, p, levers) + tokens * linear_inputs
    layers = config.num_hidden_layers
    # Non-reentrant checkpointing keeps each layer's input: T h e bytes a layer. Without it every layer keeps all,
    # but the first layer's first norm keeps nothing: its input (the frozen embeddings' output) needs no gradient;
    # nor do the linears it feeds, which then save no input either.
    checkpoints = layers * tokens * config.hidden_size * p.residual
    first_layer_input = norm_bytes_per_token(config, p) + (
        config.hidden_size * _norm_output_bytes(config, p) if linear_inputs_saved else 0)
    no_checkpoints = layers * per_layer - tokens * first_layer_input
    # The final norm saves like any norm; the loss keeps its labels; RoPE tables are shared by the layers; the
    # lean loss's checkpoints keep the final hidden states (compute dtype).
    rope = rope_table_bytes(config, seq_len, p)
    head_saved = tokens * (norm_bytes_per_token(config, p) + INT64) + rope
    if path == "lean":
        head_saved += tokens * config.hidden_size * p.compute
    # the lean path's int8 linears keep no inputs (backends.bitsandbytes.FrozenInt8Matmul)
    held = 0 if path == "lean" else int8_layers_count(model) * tokens * int8_held_inputs_bytes_per_token(
        config, p, device_type, int8_outlier_columns)
    saved = checkpoints if gradient_checkpointing else no_checkpoints
    offloaded = brought_back = 0
    if levers.offload_activations:
        layer_input = tokens * config.hidden_size * p.residual
        offloadable = layers - 1 if embeddings_output_held else layers
        layers_off, head_off = offloaded_split(offloadable, layer_input, offloaded_head_tensors(config, tokens, p),
                                               levers.offload_host_bytes)
        offloaded = layers_off * layer_input + head_off
        # the layers' inputs left on the GPU (the top one's among them, which the peak's layer recomputes from,
        # unless every one went to the host: then the one brought back)
        saved, head_saved = (layers - layers_off) * layer_input, head_saved - head_off
        brought_back = layer_input if layers_off == offloadable else 0
    return {
        "layer_activation_bytes": per_layer,
        "int8_held_inputs_bytes": held,
        "offloaded_activations_bytes": offloaded,
        "brought_back_bytes": brought_back,
        "saved_activations_bytes": saved,
        "saved_activations_checkpointing_bytes": checkpoints,
        "saved_activations_no_checkpointing_bytes": no_checkpoints,
        "head_saved_bytes": head_saved,
        "rope_table_bytes": rope,
    }


def offloaded_head_tensors(config, tokens: int, p: Precision) -> list[int]:
    """Bytes of each tensor the lean path's head saves outside checkpoints, in the order a forward saves them:
    the final norm's fp32 input, then each loss chunk's hidden states (``paths.LOSS_CHUNK_TOKENS`` tokens a
    chunk, the last one what is left)."""
    chunks = [min(LOSS_CHUNK_TOKENS, tokens - start) for start in range(0, tokens, LOSS_CHUNK_TOKENS)]
    return [tokens * config.hidden_size * FLOAT32, *(n * config.hidden_size * p.compute for n in chunks)]


def offloaded_split(layers: int, layer_input: int, head: list[int], host_bytes: int | None) -> tuple[int, int]:
    """(layers whose input goes to the host, bytes of the head's tensors that go) when a forward offloads what
    it saves in order, each whole tensor while it fits ``host_bytes`` (None: everything), as
    ``levers.ActivationOffload`` does: the layers' inputs first, then ``head`` (``offloaded_head_tensors``)."""
    if host_bytes is None:
        return layers, sum(head)
    layers_off = min(layers, host_bytes // layer_input)
    left, head_off = host_bytes - layers_off * layer_input, 0
    for size in head:
        if size <= left:
            left, head_off = left - size, head_off + size
    return layers_off, head_off


def loss_terms(config, tokens: int, path: str, head_cast: int) -> dict:
    """Bytes of the loss: the reference path's model loss over all ``tokens`` positions at once, which saves its
    fp32 log-probabilities (and the fp32 head's bf16 cast) until backward; the lean path's chunks, which save
    nothing and hold one chunk's logits at a time."""
    loss_tokens = min(tokens, LOSS_CHUNK_TOKENS) if path == "lean" else tokens
    reference = path == "reference"
    return {
        "loss_tokens_at_once": loss_tokens,
        "loss_saved_bytes": FLOAT32 * tokens * config.vocab_size + head_cast if reference else 0,
        "logits_phase_bytes": logits_phase_bytes(loss_tokens, config.vocab_size, head_cast),
    }


#: The parts a step phase's predicted bytes are made of, bottom to top of a stacked bar, with their labels.
PHASE_COMPONENTS = {
    "quantized_bytes": "quantized weights (data)",
    "quant_constants_bytes": "quantization constants",
    "unquantized_bytes": "unquantized weights (all of them in bf16/fp16)",
    "upcast_bytes": "fp32 upcasts (reference path)",
    "lora_bytes": "LoRA adapters + gradients + optimizer state",
    "saved_activations_bytes": "saved activations",
    "int8_held_inputs_bytes": "int8 matmul inputs (kept by bitsandbytes)",
    "fsdp_gathered_bytes": "FSDP: units gathered whole, a layer's gradients unreduced (transient)",
    "logits_loss_bytes": "logits and loss (transient)",
    "layer_backward_bytes": "one layer's backward (transient)",
    "optimizer_step_bytes": "optimizer step temporaries (transient)",
}
#: The candidate peaks of a step after the first (optimizer state allocated).
STEP_PHASES = ("loss", "layer_backward", "optimizer_step")


def _phase_parts(terms: dict, phase: str, gradient_checkpointing: bool, layer_transient: int) -> dict[str, int]:
    """The predicted bytes of one step phase by ``PHASE_COMPONENTS`` (every key, 0 where the phase holds none).

    Every phase holds the weights as stored, the upcasts, the adapters and the optimizer state; the loss adds
    every saved activation (the head's too), the int8 matmuls' held inputs and the logits, with no gradient yet
    (zeroed to None); the top layer's backward adds the saved activations, the int8 held inputs (the top
    layer's are still alive), its working set and, under checkpointing, the layer's recomputed activations, and
    (floors since 2026-12-03, which record ``rope_table_bytes``) the adapters' gradients and the RoPE tables,
    which the layers' backward holds to the last (the H200's allocator history has every layer's gradients
    alive at the peak, where the peak is the bottom layer's); the optimizer step adds the adapters' gradients
    and AdamW's temporaries. Under FSDP (``terms["sharding"]``) the weights and adapters are one rank's shards,
    and each phase adds the units it holds gathered (``sharding``).
    """
    parts = dict.fromkeys(PHASE_COMPONENTS, 0)
    for key in ("quantized_bytes", "quant_constants_bytes", "unquantized_bytes", "upcast_bytes"):
        parts[key] = terms[key]
    parts["lora_bytes"] = terms["lora_param_bytes"] + terms["optimizer_state_bytes"]
    held = terms.get("int8_held_inputs_bytes", 0)  # floors saved before the term existed predicted none
    if phase == "loss":
        parts["saved_activations_bytes"] = terms["saved_activations_bytes"] + terms["head_saved_bytes"]
        parts["int8_held_inputs_bytes"] = held
        parts["logits_loss_bytes"] = terms["logits_phase_bytes"]
    elif phase == "layer_backward":
        recompute = terms["layer_activation_bytes"] if gradient_checkpointing else 0
        parts["saved_activations_bytes"] = terms["saved_activations_bytes"]
        parts["int8_held_inputs_bytes"] = held
        parts["layer_backward_bytes"] = layer_transient + recompute
        if "rope_table_bytes" in terms:  # floors saved before held neither in their backward
            parts["lora_bytes"] += terms["lora_grad_bytes"]
            parts["saved_activations_bytes"] += terms["rope_table_bytes"]
    elif phase == "optimizer_step":
        parts["lora_bytes"] += terms["lora_grad_bytes"]
        parts["optimizer_step_bytes"] = optimizer_transient(terms["lora_params"])
    else:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(STEP_PHASES)}")
    if "sharding" in terms:  # FSDP: the components above are one rank's shards; it holds these beside them
        parts["fsdp_gathered_bytes"] = terms["sharding"]["gathered_bytes"][phase]
    return parts


def step_phases(terms: dict, gradient_checkpointing: bool, layer_transient: int) -> dict:
    """Predicted bytes at each of ``STEP_PHASES``: the sum of its ``_phase_parts``."""
    return {phase: sum(_phase_parts(terms, phase, gradient_checkpointing, layer_transient).values())
            for phase in STEP_PHASES}


def true_floor(terms: dict, layer_transient: int) -> tuple[str, int]:
    """(phase, bytes) of the least any LoRA training of this model, mode, adapters and tokens a step must hold:
    the weights as stored with their constants, the adapters with their gradients and optimizer state, one
    checkpointed boundary a layer, and the largest unavoidable transient (one layer recomputed with its backward
    working set, one loss chunk, or the optimizer's temporaries). ``terms`` and ``layer_transient`` are the lean
    path's under checkpointing, whose phases hold just that (its int8 linears keep no inputs). It shares the lean
    path's transient accounting, which predicts the H200's lean-path peaks closely since 2026-12-03
    (tests/test_floor_published.py); before, it was up to 5 % above them."""
    phases = step_phases(terms, True, layer_transient)
    phase = max(phases, key=phases.get)
    return phase, phases[phase]


def _checkpointed(floor: dict) -> bool:
    """Whether the floor was predicted with gradient checkpointing: recorded since levers came in; before, read
    from ``activation_terms``'s choice of saved activations, as the two choices never coincide (without
    checkpointing every layer saves at least its two norms' fp32 inputs, more than the h e bytes a token the
    checkpoints keep)."""
    if "gradient_checkpointing" in floor:
        return floor["gradient_checkpointing"]
    return floor["saved_activations_bytes"] == floor["saved_activations_checkpointing_bytes"]


def phase_components(floor: dict, phase: str) -> dict[str, int]:
    """The predicted bytes of one phase of a floor (``memory_floor``'s result, as saved with a cell) split into
    ``PHASE_COMPONENTS``; they sum to ``floor["phase_peak_bytes"][phase]`` exactly, as ``step_phases`` made it."""
    return _phase_parts(floor, phase, _checkpointed(floor), floor["layer_backward_transient_bytes"])


def _path_terms(config, model, mode: Mode, lora, seq_len: int, batch_size: int, gradient_checkpointing: bool,
                path: str, optimizer: str, device_type: str, int8_outlier_columns: dict[str, float] | None,
                levers: Levers = Levers(), fsdp_ranks: int | None = None,
                embeddings_output_held: bool = False) -> tuple[Precision, dict, int]:
    """(precision, bytes by component, one layer's backward transient) of training the skeleton ``model`` on
    ``path``: what ``memory_floor`` composes into phases, for its own path and for the true floor's. With
    ``fsdp_ranks``, one of that many FSDP ranks' (``fsdp_terms``)."""
    tokens = batch_size * seq_len
    p = Precision.of(mode, check_path(path), device_type, lora.dropout)
    weights = weight_bytes(model, mode)
    upcast = upcast_bytes(model, mode, path)
    terms = {
        **weights,
        "upcast_bytes": upcast,
        **lora_bytes(lora_targets(model, lora), lora, optimizer),
        **activation_terms(config, model, lora, seq_len, tokens, gradient_checkpointing, path, p, device_type,
                           int8_outlier_columns, saves_linear_inputs(mode, path), levers, embeddings_output_held),
        **loss_terms(config, tokens, path, config.vocab_size * config.hidden_size * p.compute if upcast else 0),
    }
    if fsdp_ranks is not None:
        terms |= fsdp_terms(model, mode, lora, path, optimizer, fsdp_ranks, weights)
    quantized = [layer for layer in linears(model) if layer.storage != "dense"]
    largest = max(quantized, key=lambda layer: layer.in_features * layer.out_features, default=None)
    targets = first_layer_targets(lora_targets(model, lora))
    int8_quantizing = 0
    if quantizes_int8_down_projections(config, quantized, device_type, levers):
        int8_quantizing = int8_quantize_transient(config, tokens, p, targets, lora, mode.int8_threshold, levers)
    transient = layer_backward_transient(config, tokens, p, largest, levers, gradient_checkpointing,
                                         terms["brought_back_bytes"], int8_quantizing)
    if levers.mlp_tile_tokens is not None:
        mlp_held = tiled_mlp_bytes(config, targets, lora, tokens, p, levers)
        transient = max(transient, tiled_norm_backward_transient(config, tokens, p, mlp_held))
    return p, terms, transient


def memory_floor(config, mode: Mode, lora, seq_len: int, batch_size: int, gradient_checkpointing: bool,
                 path: str = "lean", optimizer: str = "adamw", device_type: str = "cuda",
                 int8_outlier_columns: dict[str, float] | None = None, levers: Levers = Levers(),
                 optimizer_state_upfront: bool = False, strategy: str = "ddp", num_processes: int = 1,
                 embeddings_output_held: bool = False) -> dict:
    """Predicted bytes of each memory component of LoRA training on ``path``, and the resulting totals.
    ``int8_outlier_columns``: LLM.int8's outlier columns a layer by linear name, where measured
    (``int8_held_inputs_bytes_per_token``); recorded in the result. ``levers``: the lean path's memory levers
    pulled (``qlora_core.levers``; recorded), which the true floor assumes too: with activations offloaded the
    GPU need not hold the checkpointed boundaries, so a floor without them would sit above what was measured.
    ``embeddings_output_held``: the first layer's input stays on the GPU under the offload (``activation_terms``;
    recorded).

    Totals: ``after_load_bytes`` (weights as stored), ``after_setup_bytes`` (plus the path's upcasts and the
    adapters; the optimizer state is allocated at the first step, or at set-up with ``optimizer_state_upfront``,
    as frontier probes make it: ``TrainSettings``), ``peak_bytes``, the largest of
    ``phase_peak_bytes`` (``step_phases``), and ``peak_phase``: the prediction for ``path``. Beside it
    ``true_floor_bytes`` and ``true_floor_phase``: the least any path could hold (``true_floor``).
    ``device_type`` selects autocast's behaviour ("cuda" or "cpu"). Plain JSON.

    ``strategy`` and ``num_processes``: how the processes share the training (``qlora_core.strategies``). Under
    ``ddp`` (and with one process) the floor is one process's, whatever ``num_processes``: pass each process's
    rows as ``batch_size``. Under ``fsdp`` it is one rank's of ``num_processes`` (``fsdp_terms``): the weights
    and adapters are its shards, ``after_load_bytes`` is the whole model each rank loads before it is sharded,
    ``sharding`` says what the step gathers beside the shards, and ``mode`` is taken as FSDP stores it
    (``strategies.mode_for``).
    """
    fsdp_ranks = num_processes if check_strategy(strategy) == "fsdp" else None
    mode = mode_for(mode, strategy)
    model = skeleton(config, mode)  # built once: the true floor's lean terms read the same skeleton
    set_up = (config, model, mode, lora, seq_len, batch_size)
    levers.check(path, gradient_checkpointing)
    p, terms, layer_transient = _path_terms(*set_up, gradient_checkpointing, path, optimizer, device_type,
                                            int8_outlier_columns, levers, fsdp_ranks, embeddings_output_held)
    lean_terms, lean_transient = terms, layer_transient
    if path != "lean" or not gradient_checkpointing:  # levers pull only there: none to carry over
        _, lean_terms, lean_transient = _path_terms(*set_up, True, "lean", optimizer, device_type, None,
                                                    fsdp_ranks=fsdp_ranks)
    floor_phase, floor_bytes = true_floor(lean_terms, lean_transient)
    phases = step_phases(terms, gradient_checkpointing, layer_transient)
    peak_phase = max(phases, key=phases.get)
    return {
        "path": path,
        "device_type": device_type,
        "optimizer": optimizer,
        "tokens_per_micro_batch": batch_size * seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "levers": levers.describe(),
        "int8_outlier_columns": int8_outlier_columns,
        "embeddings_output_held": embeddings_output_held,
        **terms,
        "layer_backward_transient_bytes": layer_transient,
        "largest_transient_bytes": max(terms["logits_phase_bytes"], layer_transient),
        "after_load_bytes": terms["sharding"]["loaded_weights_bytes"] if fsdp_ranks else terms["weights_bytes"],
        "optimizer_state_upfront": optimizer_state_upfront,
        "after_setup_bytes": terms["weights_bytes"] + terms["upcast_bytes"] + terms["lora_param_bytes"]
        + (terms["optimizer_state_bytes"] if optimizer_state_upfront else 0),
        "phase_peak_bytes": phases,
        "peak_bytes": phases[peak_phase],
        "peak_phase": peak_phase,
        "true_floor_bytes": floor_bytes,
        "true_floor_phase": floor_phase,
        "precision_bytes": dataclasses.asdict(p),
    }


# --- beside the measurements --------------------------------------------------------------------------------------


def compare(predicted_bytes: int, measured_bytes: int | None, measured_by: str) -> dict:
    """One predicted-vs-measured row: the remainder (measured - predicted, bytes) and the ratio, or None where
    nothing was measured."""
    measured = measured_bytes is not None
    return {
        "predicted_bytes": predicted_bytes,
        "measured_bytes": measured_bytes,
        "remainder_bytes": measured_bytes - predicted_bytes if measured else None,
        "ratio": measured_bytes / predicted_bytes if measured and predicted_bytes else None,
        "measured_by": measured_by if measured else None,
    }


#: How a predicted-vs-measured row was measured: the CUDA allocator's bytes, or the model's tensors' bytes.
MEASURED_BY_ALLOCATOR, MEASURED_BY_TENSORS = "cuda allocator", "tensor bytes"


def predicted_vs_measured(floor: dict, memory: dict, tensors_after_load: int, tensors_after_setup: int) -> dict:
    """The floor beside what was observed after load, after set-up and at the training peak, and the training
    peak beside the true floor.

    On CUDA the allocator is read (allocated bytes; peak allocated since the set-up), less what the process
    already held before the model loaded (``memory["before_load"]``: zero in a fresh process, an earlier
    test's leftovers in a shared one). Elsewhere the allocator cannot be observed: weights and set-up are
    compared with the bytes of the model's tensors, and the peak is left unmeasured (a CPU's RSS also counts
    Python and libraries).
    """
    cuda = memory.get("after_load", {}).get("kind") == "cuda"
    if cuda:
        held_before = memory.get("before_load", {}).get("allocated_bytes", 0)
        grown = lambda value: None if value is None else value - held_before  # noqa: E731
        load = grown(memory["after_load"]["allocated_bytes"])
        setup = grown(memory.get("after_setup", {}).get("allocated_bytes"))
        peak = grown(memory.get("training_peak", {}).get("peak_allocated_bytes"))
    else:
        load, setup, peak = tensors_after_load, tensors_after_setup, None
    by = MEASURED_BY_ALLOCATOR if cuda else MEASURED_BY_TENSORS
    rows = {
        "weights_after_load": compare(floor["after_load_bytes"], load, by),
        "after_setup": compare(floor["after_setup_bytes"], setup, by),
        "training_peak": compare(floor["peak_bytes"], peak, by),
    }
    if "true_floor_bytes" in floor:  # floors saved before it existed have none
        rows["true_floor"] = compare(floor["true_floor_bytes"], peak, by)
    return rows


#: The components ``summary_lines`` lists, with their labels.
SUMMARY_COMPONENTS = {
    "weights_bytes": "weights as stored",
    "upcast_bytes": "fp32 upcasts (reference path)",
    "lora_param_bytes": "LoRA parameters (fp32)",
    "lora_grad_bytes": "LoRA gradients (fp32)",
    "optimizer_state_bytes": "optimizer state",
    "saved_activations_bytes": "saved activations",
    "int8_held_inputs_bytes": "int8 matmul inputs (bitsandbytes)",
    "head_saved_bytes": "final norm, labels, RoPE, lean hidden",
    "logits_phase_bytes": "loss: logits and their gradient",
    "layer_backward_transient_bytes": "one layer's backward working set",
}


def summary_lines(floor: dict, comparison: dict | None) -> list[str]:
    """Plain-text lines: the predicted components (GiB; under FSDP one rank's, with the units it gathers at the
    peak), then predicted vs measured with the remainder."""
    gib = 2**30
    lines = [f"memory floor, {floor['path']} path (GiB):"]
    lines += [f"  {label:<40} {floor[key] / gib:9.3f}" for key, label in SUMMARY_COMPONENTS.items()]
    if "sharding" in floor:  # FSDP: the components above are one rank's shards
        gathered = floor["sharding"]["gathered_bytes"][floor["peak_phase"]]
        label = f"FSDP units gathered (1 rank of {floor['sharding']['num_processes']})"
        lines.append(f"  {label:<40} {gathered / gib:9.3f}")
    lines.append(f"  {'predicted peak (' + floor['peak_phase'] + ')':<40} {floor['peak_bytes'] / gib:9.3f}")
    for name, row in (comparison or {}).items():
        if row["measured_bytes"] is None:
            lines.append(f"  {name:<20} predicted {row['predicted_bytes'] / gib:9.3f}  measured: not observable here")
            continue
        lines.append(f"  {name:<20} predicted {row['predicted_bytes'] / gib:9.3f}  measured "
                     f"{row['measured_bytes'] / gib:9.3f}  remainder {row['remainder_bytes'] / gib:+8.3f}  "
                     f"x{row['ratio']:.3f} ({row['measured_by']})")
    return lines


def path_gap(reference: dict, lean: dict) -> dict:
    """Where the reference path's predicted memory goes beyond the lean path's, by component (bytes, reference
    minus lean), with the peak; for two floors of the same model, mode and set-up."""
    gap = {key: reference[key] - lean[key] for key in SUMMARY_COMPONENTS}
    gap["peak_bytes"] = reference["peak_bytes"] - lean["peak_bytes"]
    return gap
