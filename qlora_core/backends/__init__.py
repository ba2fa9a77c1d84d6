"""Quantization backends: the libraries that store a frozen base's linear weights in fewer bits.

Each backend is one module here implementing ``Backend``; a mode names its backend (``Mode.backend``), and
``BACKENDS`` is the one list of them. Everything outside this package asks through the functions below and never
imports a backend's library or reads its attributes: how a model is loaded or built in a mode (quantized while
transformers loads it, or after), how stored bytes and constants are counted, how a weight is dequantized, what a
layer's storage costs in the memory model, and what the lean path changes.

Adding a backend: a module with a ``Backend`` subclass, and its line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib.util

import torch

from qlora_core.backends.base import Backend
from qlora_core.backends.bitsandbytes import BitsAndBytes
from qlora_core.backends.hqq import Hqq

#: Every backend, by the name a mode gives (``Mode.backend``).
BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (BitsAndBytes(), Hqq())}


class ModeUnavailableError(RuntimeError):
    """A mode this installation cannot run (its backend's library is missing)."""


def backend_of(mode) -> Backend | None:
    """The backend storing ``mode``'s weights; None for a half-precision mode, which needs none."""
    return None if mode.backend is None else BACKENDS[mode.backend]


def installed(mode) -> bool:
    """Whether this installation can run ``mode``: its backend's package is importable (or it needs none)."""
    backend = backend_of(mode)
    return backend is None or importlib.util.find_spec(backend.package) is not None


def require(mode) -> None:
    """Raise ``ModeUnavailableError`` naming the package when ``mode``'s backend is not installed."""
    if not installed(mode):
        package = backend_of(mode).package
        raise ModeUnavailableError(f"mode {mode.name!r} needs {package}: pip install {package}")


def quantized_layer(name: str, module: torch.nn.Module, mode, device: torch.device) -> torch.nn.Module | None:
    """The layer replacing the module called ``name`` where ``mode``'s backend quantizes after loading
    (``Backend.quantize_linear``); None where it keeps the module."""
    backend = backend_of(mode)
    return None if backend is None else backend.quantize_linear(name, module, mode, device)


def quantize_after_load(model: torch.nn.Module, mode, device: torch.device) -> None:
    """Quantize the linears of a model loaded in ``mode.load_dtype`` where its backend does so after loading,
    one layer at a time, each layer's unquantized weight released as it is replaced; nothing for the others."""
    for name, module in list(model.named_modules()):
        if (layer := quantized_layer(name, module, mode, device)) is not None:
            model.set_submodule(name, layer)


def after_build(model: torch.nn.Module) -> None:
    """Whatever every backend needs done to a model once it is loaded or built (e.g. a CPU hazard disarmed)."""
    for backend in BACKENDS.values():
        backend.after_build(model)


def quant_constants(param: torch.Tensor) -> list[torch.Tensor]:
    """The quantization constants stored beside ``param`` (scales, code books); empty for a plain tensor."""
    for backend in BACKENDS.values():
        if constants := backend.constants(param):
            return constants
    return []


def logical_numel(param: torch.Tensor) -> int:
    """How many weights ``param`` represents (a packed 4-bit tensor holds two a byte)."""
    for backend in BACKENDS.values():
        if (numel := backend.logical_numel(param)) is not None:
            return numel
    return param.numel()


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as float32 [out, in], whatever format it is stored in."""
    for backend in BACKENDS.values():
        if (weight := backend.dequantize(module)) is not None:
            return weight
    return module.weight.data.float()


def layer_storage(module: torch.nn.Module) -> str:
    """How a linear layer stores its weight, as the memory model names it: a backend's storage (``4bit``,
    ``int8``), else ``dense``."""
    for backend in BACKENDS.values():
        if (storage := backend.storage(module)) is not None:
            return storage
    return "dense"


def is_linear(module: torch.nn.Module) -> bool:
    """A linear layer, however stored: a ``torch.nn.Linear`` (a backend's subclass included) or a backend's layer
    that replaces one without subclassing it (HQQ's)."""
    return isinstance(module, torch.nn.Linear) or layer_storage(module) != "dense"


def prepare_lean(model: torch.nn.Module) -> None:
    """What the lean path changes in each backend's layers (``Backend.prepare_lean``)."""
    for backend in BACKENDS.values():
        backend.prepare_lean(model)


def outliers(model: torch.nn.Module) -> dict | None:
    """The outlier columns of the model's quantized linears, where its backend has them (``Backend.outliers``)."""
    for backend in BACKENDS.values():
        if (found := backend.outliers(model)) is not None:
            return found
    return None
