"""Quantization backends: the libraries that store a frozen base's linear weights in fewer bits.

Each backend is one module here implementing ``Backend``; a mode names its backend (``Mode.backend``), and
``BACKENDS`` is the one list of them. Everything outside this package asks through the functions below and never
imports a backend's library or reads its attributes: how a model is loaded or built in a mode, how stored bytes
and constants are counted, how a weight is dequantized, what a layer's storage costs in the memory model, and
what the lean path changes.

Adding a backend: a module with a ``Backend`` subclass, and its line in ``BACKENDS``.
"""

from __future__ import annotations

import importlib.util

import torch

from qlora_core.backends.base import Backend
from qlora_core.backends.bitsandbytes import BitsAndBytes

#: Every backend, by the name a mode gives (``Mode.backend``).
BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (BitsAndBytes(),)}


class ModeUnavailableError(RuntimeError):
    """A mode this installation cannot run (its backend's library is missing)."""


def backend_of(mode) -> Backend | None:
    """The backend storing ``mode``'s weights; None for a half-precision mode, which needs none."""
    return None if mode.backend is None else BACKENDS[mode.backend]


def require(mode) -> None:
    """Raise ``ModeUnavailableError`` naming the package when ``mode``'s backend is not installed."""
    backend = backend_of(mode)
    if backend is not None and importlib.util.find_spec(backend.package) is None:
        raise ModeUnavailableError(f"mode {mode.name!r} needs {backend.package}: pip install {backend.package}")


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
