"""LLM.int8's outlier columns: the input columns bitsandbytes multiplies in 16-bit because some value in them
exceeds the threshold (6.0). They cost speed, and memory: each int8 linear keeps its input's outlier columns
until backward (``measure.floor.int8_held_inputs_bytes_per_token``). Their number depends on the activations,
so on the weights: random weights and a real checkpoint differ."""

from __future__ import annotations

import torch

#: peft wraps an adapted linear and keeps the original as this child.
PEFT_BASE_LAYER = ".base_layer"


def int8_outliers(model: torch.nn.Module) -> dict | None:
    """Outlier columns of each int8 linear as the last forward pass through bitsandbytes' int8 kernel found them
    (it keeps them in ``state.idx``; on CPU, training runs a dequantizing path instead, so there they are the
    last evaluation's), by the linear's name's last component (``down_proj``), averaged over layers: ``columns`` a
    layer and their ``share`` of the linear's input features. None for a model without int8 linears or one that
    has run no forward."""
    import bitsandbytes as bnb

    counts: dict[str, list[int]] = {}
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear8bitLt) or module.state.idx is None:
            continue
        name = name.removesuffix(PEFT_BASE_LAYER).rsplit(".", 1)[-1]
        counts.setdefault(name, []).append(module.state.idx.numel())
        widths[name] = module.in_features
    if not counts:
        return None
    columns = {name: sum(found) / len(found) for name, found in counts.items()}
    return {"columns": columns, "share": {name: columns[name] / widths[name] for name in columns}}
