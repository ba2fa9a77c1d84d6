"""HQQ (half-quadratic quantization): calibration-free 4-bit and 8-bit weights (``hqq4``, ``hqq8``), quantized
after loading.

transformers' ``HqqConfig`` loading path is not usable with transformers 5.17-5.24 (NotImplementedError), so a
model in an HQQ mode loads in the compute dtype and each linear layer but the skipped ones is replaced, one at a
time, by an ``hqq.core.quantize.HQQLinear`` built on the target device (``HQQLinear.to()`` is a no-op: a layer stays
where it was quantized). HQQ fits each group's zero point with a few proximal iterations: in float32 on a CPU, in
float16 on CUDA, so the same checkpoint quantizes slightly differently on the two.

Storage: ``W_q``, a uint8 parameter of packed values (4-bit: two a byte; 8-bit: one), and in the layer's ``meta``
dict one scale and one zero point per group of ``Mode.group_size`` consecutive weights of the row-major [out, in]
weight (axis 1: along a row), both in the compute dtype; the bias, where the linear has one, in the compute dtype.
Dequantized: (W_q - zero) * scale. At group size 64 with bf16 constants: 4.5 bits a weight (hqq4), 8.5 (hqq8).
"""

from __future__ import annotations

import functools

import torch

from qlora_core.backends.base import Backend

#: Bits a weight of each HQQ weight format (``Mode.weight_format``).
NBITS = {"hqq4": 4, "hqq8": 8}
#: Groups run along a weight's rows (its input features), the axis transformers' ``HqqConfig`` defaults to.
HQQ_AXIS = 1
#: HQQ's layer class, told by name so that a model without HQQ layers needs no hqq import.
LAYER_CLASS = "HQQLinear"
#: Constants stored per group: one scale and one zero point.
CONSTANTS_PER_GROUP = 2


def hqq_bytes(numel: int, nbits: int, group_size: int, constant_bytes: int) -> tuple[int, int]:
    """(packed data, constants) bytes of one HQQ weight of ``numel`` values: ``nbits`` / 8 bytes a value, and a
    scale and a zero point of ``constant_bytes`` each per group of ``group_size`` values. HQQ needs ``numel`` to
    be a multiple of ``group_size`` (it asserts so when quantizing)."""
    return numel * nbits // 8, CONSTANTS_PER_GROUP * (numel // group_size) * constant_bytes


def _is_hqq_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__ == LAYER_CLASS


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every HQQ layer of ``model`` (peft keeps the adapted one as a child, so it is found there too)."""
    return [module for module in model.modules() if _is_hqq_layer(module)]


def _quant_config(mode) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=NBITS[mode.weight_format], group_size=mode.group_size, axis=HQQ_AXIS)


def _placeholder(linear: torch.nn.Linear, mode) -> torch.nn.Module:
    """An HQQ layer on the meta device that nothing was quantized into, for a skeleton (the memory floor's):
    it has the linear's features and bias and the mode's quantization config, which is what the memory model
    reads (``Hqq.storage``)."""
    from hqq.core.quantize import HQQLinear

    layer = HQQLinear(None, _quant_config(mode), compute_dtype=mode.torch_compute_dtype, device="meta",
                      initialize=False)
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias, requires_grad=False)
    return layer


def quantize(linear: torch.nn.Linear, mode, device: torch.device) -> torch.nn.Module:
    """``linear`` as an HQQ layer of ``mode`` on ``device``; the linear's own weight is released."""
    from hqq.core.quantize import HQQLinear

    layer = HQQLinear(linear, _quant_config(mode), compute_dtype=mode.torch_compute_dtype, device=str(device),
                      del_orig=True)
    # HQQ keeps the bias as a plain attribute: as a parameter it is counted with the model's weights and frozen
    # with them.
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(layer.bias, requires_grad=False)
    # The weight's constants live in the layer's meta dict; tied to the parameter, as bitsandbytes ties its
    # quant_state, they are found from the parameter alone (``Hqq.constants``, ``Hqq.logical_numel``).
    layer.W_q.hqq_meta = layer.meta
    return layer


class FrozenHqqMatmul(torch.autograd.Function):
    """An HQQ linear whose weight is frozen, keeping nothing for backward but the layer.

    HQQ's own matmul (hqq 0.2.8 ``HQQMatmulNoCacheMul``) saves its input for a weight gradient it never computes:
    one input a linear, dropped by gradient checkpointing but kept through a step without it and during a
    checkpointed layer's recompute. Forward runs HQQ's own forward outside autograd; backward is HQQ's own input
    gradient, from the weight dequantized again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return type(layer).forward(layer, x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return torch.matmul(grad_output, ctx.layer.dequantize()), None


def _frozen_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return FrozenHqqMatmul.apply(x, layer)


def keep_no_hqq_inputs(model: torch.nn.Module) -> int:
    """Route every HQQ linear of ``model`` through ``FrozenHqqMatmul``; returns how many. Its weight must stay
    frozen: the weight's gradient is never computed."""
    layers = _layers(model)
    for layer in layers:
        layer.forward = functools.partial(_frozen_forward, layer)
    return len(layers)


class Hqq(Backend):
    name = "hqq"
    package = "hqq"
    # peft's k-bit preparation recognises an HQQ model (``hqq_quantized``, set in ``after_build``) and leaves its
    # dtypes alone: it only freezes it and turns gradient checkpointing on.
    kbit_preparation_upcasts = False
    matmul_saves_inputs = True  # HQQMatmulNoCacheMul's ctx.save_for_backward(x, bias): see FrozenHqqMatmul

    def quantization_config(self, mode):
        """None: transformers loads the model unquantized in the compute dtype; ``quantize_linear`` follows."""
        return None

    def describe(self, mode) -> dict:
        return {"nbits": NBITS[mode.weight_format], "axis": HQQ_AXIS, "quantized_after_load": True}

    def quantize_linear(self, name, module, mode, device):
        """Every ``torch.nn.Linear`` but ``mode.skip_modules`` (matched by the last component of its name)."""
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] in mode.skip_modules:
            return None
        if module.weight.is_meta:
            return _placeholder(module, mode)
        return quantize(module, mode, device)

    def after_build(self, model):
        # peft's marker for a model of HQQ layers (peft.utils.other.prepare_model_for_kbit_training reads it, as
        # it reads ``quantization_method == "hqq"`` on a model transformers' HqqConfig loaded): no fp32 casts.
        if _layers(model):
            model.hqq_quantized = True

    def constants(self, param):
        meta = getattr(param, "hqq_meta", None)
        return [] if meta is None else [t for t in meta.values() if isinstance(t, torch.Tensor)]

    def logical_numel(self, param):
        meta = getattr(param, "hqq_meta", None)
        return None if meta is None else meta["shape"].numel()

    def dequantize(self, module):
        return module.dequantize().float() if _is_hqq_layer(module) else None

    def storage(self, module):
        if not _is_hqq_layer(module):
            return None
        return f"hqq{module.quant_config['weight_quant_params']['nbits']}"

    def stored_bytes(self, storage, in_features, out_features, mode):
        return hqq_bytes(in_features * out_features, NBITS[storage], mode.group_size,
                         mode.torch_compute_dtype.itemsize)

    def prepare_lean(self, model):
        keep_no_hqq_inputs(model)
