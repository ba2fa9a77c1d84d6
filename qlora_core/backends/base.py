"""The interface every quantization backend implements (``qlora_core.backends``).

Methods that look at a tensor or a module answer for what their backend stores and return None (or nothing)
for anything else, so the package can ask each backend in turn.
"""

from __future__ import annotations

import torch


class Backend:
    """One quantization library behind the harness's measurements."""

    #: The name a mode gives (``Mode.backend``) and results record.
    name: str
    #: The package that must be importable for its modes to run.
    package: str
    #: Whether peft's ``prepare_model_for_kbit_training`` (the reference path) casts this backend's models'
    #: unquantized fp16/bf16 weights to fp32. peft skips the cast for libraries it lists (HQQ among them).
    kbit_preparation_upcasts: bool = True
    #: Whether the backend's own matmul saves each linear's input for backward (as autograd saved tensors, which
    #: checkpointing drops) although the frozen weight needs no gradient; ``prepare_lean`` routes around it.
    matmul_saves_inputs: bool = False

    def quantization_config(self, mode):
        """The transformers quantization config that loads or builds a model in ``mode``."""
        raise NotImplementedError

    def describe(self, mode) -> dict:
        """Plain-JSON facts of ``mode`` the library fixes rather than the mode (block sizes), saved with results."""
        return {}

    def quantize_linear(self, name: str, module: torch.nn.Module, mode,
                        device: torch.device) -> torch.nn.Module | None:
        """For a backend that quantizes after loading (transformers cannot load its format): the layer that
        replaces the module called ``name`` when it is a linear ``mode`` stores, its weight quantized on ``device``
        (on the meta device: a placeholder that answers ``storage`` and has the features); else None. None for
        every module by default: transformers quantizes while loading (``quantization_config``)."""
        return None

    def after_build(self, model: torch.nn.Module) -> None:
        """Whatever a model loaded or built with this backend needs before use."""

    def stored_parameter(self, placeholder: torch.nn.Parameter, value: torch.Tensor,
                         device: torch.device) -> torch.nn.Parameter | None:
        """``value`` stored as the meta ``placeholder`` of a shape skeleton says, on ``device``, when the
        placeholder is this backend's; else None."""
        return None

    def constants(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The quantization constants stored beside ``param`` when it is this backend's weight; else empty."""
        return []

    def logical_numel(self, param: torch.Tensor) -> int | None:
        """How many weights ``param`` represents when it is this backend's packed weight; else None."""
        return None

    def dequantize(self, module: torch.nn.Module) -> torch.Tensor | None:
        """The layer's weight as float32 [out, in] when this backend stores it; else None."""
        return None

    def storage(self, module: torch.nn.Module) -> str | None:
        """The memory model's name for how this backend stores the layer's weight (e.g. ``4bit``); else None."""
        return None

    def stored_bytes(self, storage: str, in_features: int, out_features: int, mode) -> tuple[int, int]:
        """(data, constants) bytes of one weight of ``storage`` in ``mode``, as the memory model predicts."""
        raise NotImplementedError

    def prepare_lean(self, model: torch.nn.Module) -> None:
        """What the lean training path changes in this backend's layers (nothing by default)."""

    def outliers(self, model: torch.nn.Module) -> dict | None:
        """Input columns the backend's kernels computed apart in higher precision at the last forward (LLM.int8's
        outliers), which cost memory and time: ``{"columns": {linear: count a layer}, "share": {linear:
        fraction}}``; None where the backend has none."""
        return None
