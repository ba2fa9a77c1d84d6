"""bitsandbytes: LLM.int8 (``int8``) and 4-bit FP4/NF4 with optional double quantization (``fp4``, ``nf4``,
``-dq``), through transformers' ``BitsAndBytesConfig``.

Storage: a 4-bit weight is a ``Params4bit`` of packed bytes (two values each) with a ``quant_state`` holding one
absmax per block of 64 values (itself quantized again in blocks of 256 under double quantization) and the
format's code book; an int8 weight is an ``Int8Params`` of one byte a value with one float32 scale a row (``SCB``).
"""

from __future__ import annotations

import functools
import math

import torch

from qlora_core.backends.base import Backend
from qlora_core.units import FLOAT32

#: bitsandbytes' fixed block sizes (elements per absmax constant) for 4-bit weights and for the second-level
#: quantization of those constants under double quantization. Recorded, not configurable: bnb hard-codes them.
BNB_4BIT_BLOCKSIZE = 64
BNB_DOUBLE_QUANT_BLOCKSIZE = 256
CODE_4BIT_ENTRIES = 2**4
CODE_8BIT_ENTRIES = 2**8


def four_bit_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed data, constants) bytes of one 4-bit weight of ``numel`` values.

    Data: two values a byte. Constants: one absmax per block of 64 values, float32 (4.5 bits a weight in all);
    with double quantization the absmax are stored as uint8 and quantized again in blocks of 256 with a float32
    absmax each plus one float32 offset and the 256-entry float32 code of that second level (4.127 bits). Every
    layer also keeps the 16-entry float32 code of its 4-bit format.
    """
    blocks = math.ceil(numel / BNB_4BIT_BLOCKSIZE)
    constants = CODE_4BIT_ENTRIES * FLOAT32
    if double_quant:
        constants += blocks + math.ceil(blocks / BNB_DOUBLE_QUANT_BLOCKSIZE) * FLOAT32 + FLOAT32
        constants += CODE_8BIT_ENTRIES * FLOAT32
    else:
        constants += blocks * FLOAT32
    return math.ceil(numel / 2), constants


def int8_bytes(in_features: int, out_features: int) -> tuple[int, int]:
    """(data, constants) bytes of an LLM.int8 weight: one byte a weight and a float32 scale per output row."""
    return in_features * out_features, out_features * FLOAT32


def _layers(model: torch.nn.Module, class_name: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every bitsandbytes ``class_name`` layer of ``model`` (``Linear4bit``, ``Linear8bitLt``).
    bitsandbytes is imported only when a module of that name is there, so a model without them needs no
    bitsandbytes; peft's adapted wrappers share the names, so the class itself decides."""
    if not any(type(module).__name__ == class_name for module in model.modules()):
        return []
    import bitsandbytes as bnb

    layer_class = getattr(bnb.nn, class_name)
    return [(name, module) for name, module in model.named_modules() if isinstance(module, layer_class)]


#: How the lean path's LLM.int8 linears compute (``Levers.int8_matmul``). ``llm-int8``: bitsandbytes' CUDA kernel,
#: the input quantized to int8 a row at a time but for its outlier columns (magnitude above the mode's threshold),
#: which are multiplied in fp16 apart. ``dequantized``: the weight dequantized to the input's dtype and one matmul,
#: what bitsandbytes itself does when training on a CPU or XPU (its ``MatMul8bitFp``): the same stored weight,
#: without the input's int8 rounding, its fp16 copies and its host synchronizations (finding the outliers).
LLM_INT8, DEQUANTIZED = "llm-int8", "dequantized"
INT8_MATMULS = (LLM_INT8, DEQUANTIZED)


def dequantized_int8_weight(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """An LLM.int8 linear's weight [out, in] in ``dtype``: each int8 row times its scale / 127 (bitsandbytes'
    dequantization, ``MatMul8bitLt.backward``), a weight-sized transient."""
    if layer.weight.CB is not None:  # bitsandbytes moves the int8 weight into its matmul state at the first call
        layer.init_8bit_state()
    state = layer.state
    return state.CB.to(dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))


class FrozenInt8Matmul(torch.autograd.Function):
    """An LLM.int8 linear whose weight is frozen, keeping nothing for backward but the weight itself.

    bitsandbytes' own matmul keeps its input (and the input's outlier columns) as attributes of its autograd
    context, where gradient checkpointing cannot drop them: every int8 layer's inputs stay alive from its
    forward to its backward (``measure.floor.int8_held_inputs_bytes_per_token``), which put int8's lean peak at
    twice its floor on the H200. Those inputs serve only the weight's gradient, which a frozen base never needs.
    Forward runs outside autograd, as ``int8_matmul`` says (``INT8_MATMULS``: bitsandbytes' kernel, or the
    dequantized weight); backward is bitsandbytes' own input gradient, from the int8 weight and its row scales.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: torch.nn.Module, int8_matmul: str) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_dtype = x.dtype
        with torch.no_grad():
            if int8_matmul != DEQUANTIZED:
                return type(layer).forward(layer, x)
            bias = None if layer.bias is None else layer.bias.to(x.dtype)
            return torch.nn.functional.linear(x, dequantized_int8_weight(layer, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = dequantized_int8_weight(ctx.layer, ctx.input_dtype)
        return torch.matmul(grad_output.to(ctx.input_dtype), weight), None, None


def _frozen_int8_forward(layer: torch.nn.Module, int8_matmul: str, x: torch.Tensor) -> torch.Tensor:
    return FrozenInt8Matmul.apply(x, layer, int8_matmul)


def check_int8_matmul(int8_matmul: str, mode=None) -> str:
    """``int8_matmul`` when it is one of ``INT8_MATMULS`` and, given a ``mode`` (``modes.Mode``), one it can
    compute in: any but the default needs the int8 mode's linears. A ValueError saying which otherwise."""
    if int8_matmul not in INT8_MATMULS:
        raise ValueError(f"unknown int8 matmul {int8_matmul!r}; choose from {', '.join(INT8_MATMULS)}")
    if mode is not None and int8_matmul != LLM_INT8 and mode.weight_format != "int8":
        raise ValueError(f"int8_matmul {int8_matmul!r} is how the int8 mode's linears compute; mode {mode.name!r} "
                         f"has none")
    return int8_matmul


def keep_no_int8_inputs(model: torch.nn.Module, int8_matmul: str = LLM_INT8) -> int:
    """Route every LLM.int8 linear of ``model`` through ``FrozenInt8Matmul``, computing as ``int8_matmul`` says;
    returns how many. Its weight must stay frozen: the weight's gradient is never computed."""
    check_int8_matmul(int8_matmul)
    layers = _layers(model, "Linear8bitLt")
    for _, layer in layers:
        layer.forward = functools.partial(_frozen_int8_forward, layer, int8_matmul)
    return len(layers)


#: peft wraps an adapted linear and keeps the original as this child.
PEFT_BASE_LAYER = ".base_layer"


def int8_outliers(model: torch.nn.Module) -> dict | None:
    """Outlier columns of each int8 linear as the last forward pass through bitsandbytes' int8 kernel found them
    (it keeps them in ``state.idx``; on CPU, training runs a dequantizing path instead, so there they are the
    last evaluation's), by the linear's name's last component (``down_proj``), averaged over layers: ``columns`` a
    layer and their ``share`` of the linear's input features. None for a model without int8 linears or one that
    has run no forward."""
    counts: dict[str, list[int]] = {}
    widths: dict[str, int] = {}
    for name, module in _layers(model, "Linear8bitLt"):
        if module.state.idx is None:
            continue
        name = name.removesuffix(PEFT_BASE_LAYER).rsplit(".", 1)[-1]
        counts.setdefault(name, []).append(module.state.idx.numel())
        widths[name] = module.in_features
    if not counts:
        return None
    columns = {name: sum(found) / len(found) for name, found in counts.items()}
    return {"columns": columns, "share": {name: columns[name] / widths[name] for name in columns}}


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for AVX512-BF16 CPUs.

    On such CPUs the first no-grad eval forward of a ``Linear4bit`` permanently repacks its weight; afterwards
    gradients through it are wrong and merging yields garbage. Harmless on GPU.
    """
    for _, module in _layers(model, "Linear4bit"):
        module.support_avx512bf16_for_cpu = False


class BitsAndBytes(Backend):
    name = "bitsandbytes"
    package = "bitsandbytes"

    def quantization_config(self, mode):
        """A fully explicit ``BitsAndBytesConfig`` (transformers' defaults are fp4 and fp32 compute)."""
        from transformers import BitsAndBytesConfig

        skip = list(mode.skip_modules)
        if mode.weight_format == "int8":
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=float(mode.int8_threshold), llm_int8_skip_modules=skip
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode.weight_format,
            bnb_4bit_use_double_quant=mode.double_quant,
            bnb_4bit_compute_dtype=mode.torch_compute_dtype,
            bnb_4bit_quant_storage=mode.torch_quant_storage,
            llm_int8_skip_modules=skip,
        )

    def describe(self, mode) -> dict:
        if not mode.is_4bit:
            return {}
        return {"blocksize": BNB_4BIT_BLOCKSIZE,
                "double_quant_blocksize": BNB_DOUBLE_QUANT_BLOCKSIZE if mode.double_quant else None}

    def after_build(self, model: torch.nn.Module) -> None:
        disable_cpu_4bit_repacking(model)

    def stored_parameter(self, placeholder, value, device):
        """Quantized at once on ``device``, exactly as transformers' bitsandbytes conversion ops do it."""
        kind = type(placeholder).__name__
        if kind == "Params4bit":
            import bitsandbytes as bnb

            return bnb.nn.Params4bit(value, requires_grad=False, **placeholder.__dict__).to(device)
        if kind == "Int8Params":
            import bitsandbytes as bnb

            # bnb quantizes int8 when moved off the CPU; transformers passes through the CPU the same way.
            return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False,
                                     has_fp16_weights=placeholder.has_fp16_weights).to(device)
        return None

    def constants(self, param):
        state = getattr(param, "quant_state", None)
        if state is not None:  # 4-bit: absmax (uint8 when nested), code book, and the nested level's own constants
            tensors = [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
            return [t for t in tensors if isinstance(t, torch.Tensor)]
        scb = getattr(param, "SCB", None)  # int8: one float32 scale per output row
        return [scb] if isinstance(scb, torch.Tensor) else []

    def logical_numel(self, param):
        state = getattr(param, "quant_state", None)
        return state.shape.numel() if state is not None else None

    def dequantize(self, module):
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight.data, state).float()
        scb = getattr(weight, "SCB", None)
        if scb is not None:  # LLM.int8: int8 rows scaled by their absmax / 127
            return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
        return None

    def storage(self, module):
        kind = type(module).__name__  # by name: a meta skeleton's layers need no bitsandbytes import to be told
        return {"Linear4bit": "4bit", "Linear8bitLt": "int8"}.get(kind)

    def stored_bytes(self, storage, in_features, out_features, mode):
        if storage == "4bit":
            return four_bit_bytes(in_features * out_features, mode.double_quant)
        return int8_bytes(in_features, out_features)

    def prepare_lean(self, model):
        keep_no_int8_inputs(model)

    def outliers(self, model):
        return int8_outliers(model)
