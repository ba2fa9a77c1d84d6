"""The one registry of weight quantization modes.

Every other part of qlora-bench (CLI choices, test and benchmark parameters, table rows) derives its list of
modes from ``MODES``; no other module spells a mode's name. A mode states everything that defines it, and
``Mode.describe()`` is saved with every result so a number can always be traced to its exact configuration.

Add a variant without touching the trainer::

    register(dataclasses.replace(get_mode("nf4"), name="nf4-fp16", compute_dtype="float16"))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from qlora_core import backends
from qlora_core.backends import BACKENDS

WeightFormat = Literal["fp16", "bf16", "int8", "fp4", "nf4", "hqq4", "hqq8"]
HALF_PRECISION_FORMATS = ("fp16", "bf16")
#: Formats stored in groups of ``Mode.group_size`` weights with a scale and a zero point each (HQQ).
GROUPED_FORMATS = ("hqq4", "hqq8")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}


class UnknownModeError(ValueError):
    """A mode name that is not in the registry; the message lists the valid ones."""


@dataclass(frozen=True)
class Mode:
    """One way of storing the frozen base weights while LoRA adapters train on top.

    Attributes:
        name: registry key, e.g. ``"nf4-dq"``.
        weight_format: how linear-layer weights are stored: a half-precision dtype or a quantized format.
        compute_dtype: dtype of matmuls and of autocast during training (name of a torch dtype).
        backend: the library storing a quantized format (a key of ``backends.BACKENDS``); None for half precision.
        double_quant: 4-bit only: quantize the per-block absmax constants again (8-bit, blocks of 256).
        int8_threshold: int8 only: activation magnitude above which LLM.int8 keeps a feature in 16-bit.
        quant_storage: 4-bit only: dtype that packs two 4-bit values (bitsandbytes' ``bnb_4bit_quant_storage``).
        group_size: HQQ only: consecutive weights of a row that share one scale and one zero point.
        skip_modules: module names left unquantized (the output head: its logits need full precision).
    """

    name: str
    weight_format: WeightFormat
    compute_dtype: str
    backend: str | None = None
    double_quant: bool = False
    int8_threshold: float | None = None
    quant_storage: str | None = None
    group_size: int | None = None
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"mode {self.name!r}: unknown compute dtype {self.compute_dtype!r}")
        if self.double_quant and not self.is_4bit:
            raise ValueError(f"mode {self.name!r}: double quantization applies to 4-bit formats only")
        if self.weight_format == "int8" and self.int8_threshold is None:
            raise ValueError(f"mode {self.name!r}: int8 needs an outlier threshold")
        if (self.group_size is None) == (self.weight_format in GROUPED_FORMATS):
            raise ValueError(f"mode {self.name!r}: a group size is needed by HQQ formats and taken by no other")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"mode {self.name!r}: group size must be >= 1, got {self.group_size}")
        if (self.backend is None) != (self.weight_format in HALF_PRECISION_FORMATS):
            raise ValueError(f"mode {self.name!r}: a quantized format needs a backend, half precision none")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"mode {self.name!r}: unknown backend {self.backend!r}; backends: {', '.join(BACKENDS)}")

    @property
    def is_4bit(self) -> bool:
        """bitsandbytes' 4-bit formats (FP4, NF4)."""
        return self.weight_format in ("fp4", "nf4")

    @property
    def is_quantized(self) -> bool:
        """True when a backend stores the weights (and peft's k-bit preparation applies)."""
        return self.backend is not None

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return _DTYPES[self.quant_storage or "uint8"]

    @property
    def load_dtype(self) -> torch.dtype:
        """dtype of every weight the backend does not store: the half-precision format, else compute dtype."""
        if self.weight_format in HALF_PRECISION_FORMATS:
            return _DTYPES["float16" if self.weight_format == "fp16" else "bfloat16"]
        return self.torch_compute_dtype

    def quantization_config(self):
        """The transformers quantization config that loads or builds the model in this mode (its backend's,
        fully explicit), or None for half precision."""
        return None if self.backend is None else BACKENDS[self.backend].quantization_config(self)

    def describe(self) -> dict:
        """Plain-JSON description saved with every result, including what the backend fixes (block sizes)."""
        description = dataclasses.asdict(self)
        description["skip_modules"] = list(self.skip_modules)
        description["quantized"] = self.is_quantized
        if self.backend is not None:
            description |= BACKENDS[self.backend].describe(self)
        return description


def _hqq(fmt: WeightFormat) -> Mode:
    return Mode(name=fmt, weight_format=fmt, compute_dtype="bfloat16", backend="hqq", group_size=64,
                skip_modules=("lm_head",))


def _four_bit(name: str, fmt: WeightFormat, double_quant: bool) -> Mode:
    return Mode(
        name=name,
        weight_format=fmt,
        compute_dtype="bfloat16",
        backend="bitsandbytes",
        double_quant=double_quant,
        quant_storage="uint8",
        skip_modules=("lm_head",),
    )


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add a mode to the registry (refusing to silently replace an existing one) and return it."""
    if mode.name in MODES:
        raise ValueError(f"mode {mode.name!r} is already registered")
    MODES[mode.name] = mode
    return mode


for _mode in (
    Mode("fp16", "fp16", compute_dtype="float16"),
    Mode("bf16", "bf16", compute_dtype="bfloat16"),
    # LLM.int8 in bf16 compute, like the 4-bit modes, so the modes differ in weight storage alone.
    Mode("int8", "int8", compute_dtype="bfloat16", backend="bitsandbytes", int8_threshold=6.0,
         skip_modules=("lm_head",)),
    _four_bit("fp4", "fp4", double_quant=False),
    _four_bit("fp4-dq", "fp4", double_quant=True),
    _four_bit("nf4", "nf4", double_quant=False),
    _four_bit("nf4-dq", "nf4", double_quant=True),
    # HQQ, calibration-free, at bitsandbytes' 4-bit block size: 4.5 bits a weight in hqq4, as in nf4.
    _hqq("hqq4"),
    _hqq("hqq8"),
):
    register(_mode)

#: The unquantized mode every other mode is compared with in reports.
BASELINE_MODE = "bf16"


def get_mode(name: str) -> Mode:
    """The registered mode called ``name``; an unknown name raises ``UnknownModeError`` listing valid ones."""
    try:
        return MODES[name]
    except KeyError:
        raise UnknownModeError(f"unknown mode {name!r}; valid modes: {', '.join(MODES)}") from None


def installed_modes() -> list[Mode]:
    """The registered modes this installation can run (their backend's package is importable)."""
    return [mode for mode in MODES.values() if backends.installed(mode)]


def parse_modes(names: str | list[str]) -> list[Mode]:
    """Modes from a comma-separated string or a list; ``"all"`` means every registered mode this installation
    can run (``installed_modes``: e.g. the HQQ modes only where the optional ``hqq`` package is installed); a mode
    named explicitly is returned even when it cannot run, so that running it says what it needs.

    Raises ``ValueError`` for no names at all (a sweep of nothing would look like success) and for a name given
    twice (a mode measured twice would overwrite its own result); ``UnknownModeError`` for an unknown name.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError(f"no modes given; pass comma-separated names or 'all' ({', '.join(MODES)})")
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"mode given twice: {', '.join(duplicates)}")
    if names == ["all"]:
        return installed_modes()
    return [get_mode(n) for n in names]
