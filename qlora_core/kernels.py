"""Well-kept fused kernels as options of the lean path (issue 14), each switched on by name and measured on and
off; the default is none, what the user's own stack runs. Liger-Kernel's Triton kernels:

- ``rms-norm``: every RMSNorm (Llama's, Qwen2's, Mistral's: a ``weight`` and a ``variance_epsilon``) as one
  kernel, fp32 inside as Llama's own, instead of transformers' several element-wise kernels and fp32 copies.
- ``swiglu``: each decoder MLP's ``silu(gate) * up`` as one kernel, which recomputes the silu in backward
  instead of keeping it.
- ``fused-linear-cross-entropy``: the head and the cross-entropy in one function that computes the final hidden
  states' gradient chunk by chunk during forward, so no chunk's logits outlive it; it replaces the lean path's
  own chunked loss (``paths.chunked_causal_lm_loss``), the same mean next-token NLL.

They are swapped in on the model instance, never on transformers' classes (Liger's ``apply_liger_kernel_to_*``
patches the modules, so every model built later in the process would run them too), after the adapters are
attached: the modules, their names and the adapters are as before. Triton kernels run on CUDA only. The memory
floor (``measure.floor``) does not model them: a cell with kernels records no prediction, and its measured peak
says what they save.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlora_core.levers import decoder_mlps
from qlora_core.paths import IGNORE_INDEX, body_and_head, next_token_labels

RMS_NORM, SWIGLU, FUSED_LINEAR_CROSS_ENTROPY = "rms-norm", "swiglu", "fused-linear-cross-entropy"
KERNELS = (RMS_NORM, SWIGLU, FUSED_LINEAR_CROSS_ENTROPY)
#: The MLP activations whose gated product is SwiGLU (transformers' names for SiLU).
SWIGLU_ACTIVATIONS = ("silu", "swish")
INSTALL_HINT = "pip install 'qlora-bench[liger]' (Liger-Kernel; its Triton kernels need a CUDA GPU)"


@dataclass(frozen=True)
class KernelFunctions:
    """The three computations a kernel replaces, as functions of tensors:

    rms_norm(x [..., h], weight [h], eps) -> x / sqrt(mean(x**2) + eps) * weight, in fp32 inside, cast back to
        x's dtype before the weight (Llama's order).
    swiglu(gate [..., m], up [..., m]) -> silu(gate) * up.
    linear_cross_entropy(hidden [n, h], weight [V, h], labels [n], bias [V] or None) -> the mean fp32 NLL of
        ``hidden @ weight.T (+ bias)`` over the labels that are not ``paths.IGNORE_INDEX``.
    """

    rms_norm: Callable
    swiglu: Callable
    linear_cross_entropy: Callable


def liger_functions() -> KernelFunctions:
    """Liger-Kernel's functional API as ``KernelFunctions``; an ImportError saying how to install it otherwise.

    The RMSNorm does not write its input's gradient into its output's (``in_place=False``): Liger documents that
    form as wrong wherever that gradient is read again (Gemma 2's norms around a residual), and it saves one
    hidden-sized buffer in a norm's backward at most; out of place holds for every family."""
    try:
        from liger_kernel.transformers.functional import (liger_fused_linear_cross_entropy, liger_rms_norm,
                                                          liger_swiglu)
    except ImportError as error:
        raise ImportError(f"the kernels option needs Liger-Kernel: {INSTALL_HINT}") from error
    # Liger's functions take the arguments KernelFunctions names in the same order; the rest by keyword
    return KernelFunctions(
        rms_norm=functools.partial(liger_rms_norm, casting_mode="llama", in_place=False),
        swiglu=liger_swiglu,
        linear_cross_entropy=functools.partial(liger_fused_linear_cross_entropy, ignore_index=IGNORE_INDEX,
                                               reduction="mean"),
    )


def unknown_kernels(names) -> list[str]:
    """The names among ``names`` that are not ``KERNELS``, in order."""
    return [name for name in names if name not in KERNELS]


def check_kernels(kernels: tuple[str, ...], path: str, strategy: str = "ddp") -> tuple[str, ...]:
    """``kernels`` when a training set-up can run them; a ValueError naming what is wrong otherwise: an unknown
    or repeated name, a path other than the lean one (whose loss and adapters they replace or wrap), or the
    fused loss under FSDP (it reads the head's weight outside the head, where FSDP holds only a shard)."""
    if unknown := unknown_kernels(kernels):
        raise ValueError(f"unknown kernel(s) {', '.join(map(repr, unknown))}; choose from {', '.join(KERNELS)}")
    if len(set(kernels)) != len(kernels):
        raise ValueError(f"a kernel named twice: {', '.join(kernels)}")
    if kernels and path != "lean":
        raise ValueError(f"the fused kernels are options of the lean path, not {path!r}")
    if FUSED_LINEAR_CROSS_ENTROPY in kernels and strategy == "fsdp":
        raise ValueError(f"{FUSED_LINEAR_CROSS_ENTROPY} reads the output head's weight outside the head, where FSDP "
                         f"holds only its shard: leave it out under --strategy fsdp")
    return kernels


def rms_norms(model) -> list[torch.nn.Module]:
    """Every RMSNorm of ``model``: a module whose class is named ``*RMSNorm`` with a ``weight`` and a
    ``variance_epsilon`` (Llama's, Qwen2's, Mistral's)."""
    return [module for module in model.modules()
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor)]


def _rms_norm_forward(norm: torch.nn.Module, rms_norm: Callable, hidden: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden, norm.weight, norm.variance_epsilon)


def _swiglu_forward(mlp: torch.nn.Module, swiglu: Callable, hidden: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(swiglu(mlp.gate_proj(hidden), mlp.up_proj(hidden)))


def swiglu_mlps(model) -> list[torch.nn.Module]:
    """The decoder MLPs that are SwiGLU (``levers.decoder_mlps`` with gate and up projections and a SiLU);
    a ValueError for a model that has none or whose MLP's activation is another."""
    mlps = [mlp for mlp in decoder_mlps(model) if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")]
    if not mlps:
        raise ValueError(f"{SWIGLU} needs decoder MLPs with gate_proj, up_proj and down_proj (Llama, Qwen2, "
                         f"Mistral); this model has none")
    activations = {getattr(getattr(mlp, "config", None), "hidden_act", None) for mlp in mlps}
    if not activations <= set(SWIGLU_ACTIVATIONS):
        raise ValueError(f"{SWIGLU} computes silu(gate) * up; this model's MLP activation is "
                         f"{', '.join(map(str, sorted(activations, key=str)))}")
    return mlps


def fused_linear_cross_entropy_loss(model, input_ids: torch.Tensor, *, linear_cross_entropy: Callable) -> torch.Tensor:
    """The mean next-token NLL of ``input_ids`` (as ``paths.chunked_causal_lm_loss``), its head and cross-entropy
    through ``linear_cross_entropy`` (``KernelFunctions``) on the final hidden states."""
    body, head = body_and_head(model)
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = next_token_labels(input_ids).reshape(-1)
    return linear_cross_entropy(hidden, head.weight, labels, head.bias)


def apply_kernels(model, kernels: tuple[str, ...], loss_fn, functions: KernelFunctions | None = None):
    """(``model`` with the named kernels in its norms' and MLPs' forwards, the loss function to train with):
    ``loss_fn`` itself unless the fused loss is named. ``functions`` default to Liger-Kernel's
    (``liger_functions``), looked up only when a kernel is named; a ValueError for a model a named kernel does not
    fit, before anything is changed."""
    if not kernels:
        return model, loss_fn
    functions = functions or liger_functions()
    norms = rms_norms(model) if RMS_NORM in kernels else []
    if RMS_NORM in kernels and not norms:
        raise ValueError(f"{RMS_NORM} needs RMSNorm layers (Llama, Qwen2, Mistral); this model has none")
    mlps = swiglu_mlps(model) if SWIGLU in kernels else []
    for norm in norms:
        norm.forward = functools.partial(_rms_norm_forward, norm, functions.rms_norm)
    for mlp in mlps:
        mlp.forward = functools.partial(_swiglu_forward, mlp, functions.swiglu)
    if FUSED_LINEAR_CROSS_ENTROPY in kernels:
        loss_fn = functools.partial(fused_linear_cross_entropy_loss,
                                    linear_cross_entropy=functions.linear_cross_entropy)
    return model, loss_fn
