"""Model sources and loading a causal LM in a quantization mode, ready for LoRA.

A model source is the embedded default (``"smollm2"``), a local Hugging Face folder, or a hub id. Tiny random
models for tests are built from a config into a folder and then loaded like any other folder, so tests run
the same loading path as real models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_core import backends
from qlora_core.default_model import DEFAULT_MODEL, PROVENANCE, ensure_default_model
from qlora_core.modes import Mode


class ModelSourceError(ValueError):
    """A model that cannot be found or loaded, or that cannot serve the requested set-up."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and what is known of their history.

    Attributes:
        name_or_path: what ``from_pretrained`` receives: a local folder or a hub id.
        label: the short name used in tables.
        provenance: plain-JSON facts saved with every result (e.g. that the base was already 4-bit).
        trust_remote_code: allow the checkpoint's own Python code (off unless the user asks).
    """

    name_or_path: str
    label: str
    provenance: dict = field(default_factory=dict)
    trust_remote_code: bool = False

    def describe(self) -> dict:
        return {"name_or_path": self.name_or_path, "label": self.label, "provenance": self.provenance}


def resolve_model(model: str | None = None, *, gguf_path: str | None = None, trust_remote_code: bool = False):
    """Turn the user's ``--model`` into a ``ModelSource``; the default fetches and converts SmolLM2 once."""
    if model in (None, DEFAULT_MODEL):
        return ModelSource(str(ensure_default_model(gguf_path)), DEFAULT_MODEL, dict(PROVENANCE))
    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{model}: a folder, but not a Hugging Face model (no config.json)")
        provenance_file = path / "provenance.json"
        provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {"source": str(path)}
        return ModelSource(str(path), path.name, provenance, trust_remote_code)
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelSourceError(f"{model}: no such local folder, and not a hub id of the form owner/name")
    return ModelSource(model, model.split("/")[1], {"source": f"hub:{model}"}, trust_remote_code)


def load_config(source: ModelSource):
    """The model's config alone (cheap): for checks before the weights are loaded."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.name_or_path, trust_remote_code=source.trust_remote_code)
    except OSError as error:
        raise ModelSourceError(f"cannot load the config of {source.name_or_path}: {error}") from error


def max_sequence_length(config) -> int | None:
    """The longest sequence the model's position scheme supports, when its config states one."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def check_sequence_length(config, seq_len: int, beyond_positions: bool = False) -> None:
    """Refuse a training/eval length the model cannot represent, before anything is loaded. ``beyond_positions``:
    allow one past the positions a RoPE model was trained for (it computes any position: a memory and time
    measurement, as context frontiers are published); a learned position table still bounds it."""
    limit = max_sequence_length(config)
    if seq_len < 2:
        raise ValueError(f"sequence length {seq_len}: need at least 2 tokens (one input, one target)")
    rotary = bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))
    if beyond_positions and limit is not None and not rotary:
        raise ValueError(f"{config.model_type} has no rotary positions: it cannot go beyond {limit} positions")
    if limit is not None and seq_len > limit and not beyond_positions:
        raise ValueError(f"sequence length {seq_len} exceeds the model's limit of {limit} positions")


def load_model(source: ModelSource, mode: Mode, device: torch.device):
    """Load the causal LM with its frozen base weights stored as ``mode`` says, on ``device``.

    The model is returned as loaded (before any training preparation), so its memory can be measured. A backend
    that transformers cannot load with (HQQ) quantizes the loaded linears one by one afterwards
    (``backends.quantize_after_load``): its load holds the whole model in the compute dtype first.
    """
    from transformers import AutoModelForCausalLM

    backends.require(mode)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.name_or_path,
            quantization_config=mode.quantization_config(),
            dtype=mode.load_dtype,
            device_map={"": device},
            trust_remote_code=source.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"cannot load {source.name_or_path} in mode {mode.name}: {error}") from error
    backends.quantize_after_load(model, mode, device)
    backends.after_build(model)
    return model


#: Attention implementations a cell can ask for (transformers' ``attn_implementation``; issue 14 measures fused
#: attention on and off): ``sdpa``, PyTorch's scaled_dot_product_attention, which picks a fused flash,
#: memory-efficient or cuDNN kernel where one applies (no attention matrix kept), and ``eager``, transformers' own
#: matmul, softmax and matmul, which makes the whole [heads, tokens, tokens] matrix. None: as the model loads
#: (transformers' choice: sdpa where the family has it).
SDPA, EAGER = "sdpa", "eager"
ATTENTIONS = (SDPA, EAGER)


def check_attention(attention: str | None) -> str | None:
    """``attention`` when it is None or one of ``ATTENTIONS``; a ValueError listing them otherwise."""
    if attention is not None and attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTIONS)}")
    return attention


def set_attention(model, attention: str | None) -> str:
    """Switch ``model`` to the ``attention`` implementation (None: leave it as loaded); returns the one it runs
    (``config._attn_implementation``, what transformers dispatches on)."""
    if check_attention(attention) is not None:
        model.set_attn_implementation(attention)
    return model.config._attn_implementation


def dequantize_linears(model, dtype: torch.dtype):
    """``model`` with every linear a backend stores replaced by a ``torch.nn.Linear`` of its dequantized weight
    (``backends.dequantized_weight``) in ``dtype``. transformers undoes its own quantization (``dequantize``, which
    also drops the quantizer's state); a backend that quantized after loading has no quantizer there."""
    if getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize(dtype=dtype)
    for name, module in list(model.named_modules()):
        if backends.layer_storage(module) == "dense":
            continue
        weight = backends.dequantized_weight(module)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        model.set_submodule(name, linear)
    return model


def load_dequantized(source: ModelSource, mode: Mode, device: torch.device):
    """The base exactly as ``mode`` stores it, as a plain bf16 model: dequantized for 8-/4-bit modes.

    This is what adapters trained in ``mode`` were trained against, so merging into it keeps outputs equal to
    base-plus-adapter (merging into the still-quantized base would re-quantize the update away).
    """
    model = load_model(source, mode, device)
    if mode.is_quantized:
        model = dequantize_linears(model, torch.bfloat16)
    return model.to(torch.bfloat16)


def prepare_for_training(model, mode: Mode, *, gradient_checkpointing: bool, path: str = "reference"):
    """Freeze the base and make it trainable through adapters, as ``path`` says (``qlora_core.paths``).

    ``reference``, the common recipe: quantized modes go through peft's ``prepare_model_for_kbit_training``
    (non-quantized modules upcast to fp32 for stability, except where peft leaves a backend's models in their
    dtypes, as it does HQQ's: ``Backend.kbit_preparation_upcasts``; input gradients on). It is not called for
    fp16/bf16: there it would upcast the whole model. ``lean``: frozen as loaded, no upcast.
    """
    from peft import prepare_model_for_kbit_training

    from qlora_core.paths import check_path, prepare_lean

    if check_path(path) == "lean":
        return prepare_lean(model, gradient_checkpointing=gradient_checkpointing)
    checkpointing_kwargs = {"use_reentrant": False}
    if mode.is_quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    else:
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
            model.enable_input_require_grads()
    if gradient_checkpointing:
        model.config.use_cache = False
    # from_pretrained returns eval mode, where HF silently skips gradient checkpointing and LoRA dropout.
    model.train()
    return model


def save_random_model(config, folder: Path, tokenizer, seed: int = 0) -> Path:
    """Build a causal LM with random weights from ``config`` and save it with ``tokenizer`` (for tests)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps({"source": "random weights", "seed": seed}))
    return folder
