"""How far each mode's stored weights are from the checkpoint's: relative L2 error of the dequantized weights.

Compares what the loaded model actually holds (dequantized with its backend's own routine) with the tensors in
the checkpoint folder, over every linear layer but the output head (kept unquantized by every 8-/4-bit mode),
so all modes are measured over the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_core.backends import dequantized_weight


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for single-file and sharded checkpoints."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def weight_quant_error(model: torch.nn.Module, checkpoint: str | Path, skip: tuple[str, ...] = ("lm_head",)):
    """Relative L2 error sqrt(sum ||W - Ŵ||² / sum ||W||²) over the linear layers, and the count compared.

    Computed where the model is (a GPU cell does not wait on the CPU), each checkpoint file opened once, the
    differences in float32 and their squares summed in float64. Returns None when the checkpoint is not a local safetensors folder (e.g. a
    hub id not yet downloaded).
    """
    from safetensors import safe_open

    folder = Path(checkpoint)
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        return None
    files = _checkpoint_files(folder)
    layers = {f"{name}.weight": module for name, module in model.named_modules()
              if hasattr(module, "in_features") and name.split(".")[-1] not in skip and f"{name}.weight" in files}
    error_sq = norm_sq = 0.0
    for file in sorted({files[key] for key in layers}):
        with safe_open(file, framework="pt") as handle:
            for key in sorted(layers.keys() & set(handle.keys())):
                stored = dequantized_weight(layers[key]).float()
                original = handle.get_tensor(key).to(stored.device, torch.float32)
                error_sq += torch.sum((stored - original).square(), dtype=torch.float64).item()
                norm_sq += torch.sum(original.square(), dtype=torch.float64).item()
    return {"relative_l2": (error_sq / norm_sq) ** 0.5 if norm_sq else None, "n_tensors": len(layers)}
