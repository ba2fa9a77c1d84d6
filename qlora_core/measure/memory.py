"""Memory: bytes of weights as stored, and what the device's allocator (or the CPU process) holds.

Two views, never mixed: ``weight_footprint`` counts tensors (quantization constants included, so double
quantization shows its saving, which ``get_memory_footprint()`` does not); ``memory_snapshot`` reads the CUDA
caching allocator, or on a CPU-only machine the process RSS, labelled as such.
"""

from __future__ import annotations

import gc
import resource

import torch

from qlora_core.backends import logical_numel, quant_constants


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def cuda_index(device: torch.device) -> int:
    """The number of a CUDA ``device`` (the current one for a plain ``cuda``), where torch wants it numbered."""
    return torch.cuda.current_device() if device.index is None else device.index


def held(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``tensor``: where it is a DTensor (FSDP's parameters and the optimizer's state
    of them), its local shard's whole storage, as a flat tensor: FSDP pads a parameter's shards to equal shares
    of its dim 0, which every rank allocates; else the tensor itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    local = tensor.to_local()
    with torch.no_grad():
        return local.new_empty(0).set_(local.untyped_storage())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors this process holds, each storage once (0 before its first step,
    unless made upfront: ``LoraTrainer.make_optimizer_state``). 0-d tensors are left out: Adam's step counts,
    which torch keeps on the host even beside CUDA parameters."""
    tensors = [held(value) for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value) and value.dim() > 0]
    return sum({tensor.untyped_storage().data_ptr(): tensor_bytes(tensor) for tensor in tensors}.values())


def weight_footprint(model: torch.nn.Module) -> dict:
    """Bytes of the model's parameters and buffers as stored, each storage counted once (tied weights share).

    Returns plain JSON: ``weights_bytes`` (everything), ``quantized_bytes`` (packed 4-bit or int8 data),
    ``quant_constants_bytes``, ``unquantized_bytes``, ``quantized_params`` (logical count),
    ``bits_per_quantized_param`` (data plus constants; None when nothing is quantized), ``total_params``. Of a
    model sharded by FSDP, the bytes are this process's shards (``stored``); the counts are the whole model's.
    """
    seen: set[int] = set()
    counts = {"quantized_bytes": 0, "quant_constants_bytes": 0, "unquantized_bytes": 0}
    quantized_params = total_params = 0

    def add(tensor: torch.Tensor, key: str) -> bool:
        if tensor.data_ptr() in seen:
            return False
        seen.add(tensor.data_ptr())
        counts[key] += tensor_bytes(tensor)
        return True

    for module in model.modules():
        for param in module.parameters(recurse=False):
            tensor, constants, numel = stored(module, param)
            if not add(tensor, "quantized_bytes" if constants else "unquantized_bytes"):
                continue
            total_params += numel
            if constants:
                quantized_params += numel
                for constant in constants:
                    add(constant, "quant_constants_bytes")
    for buffer in model.buffers():
        add(buffer, "unquantized_bytes")
    quantized_total = counts["quantized_bytes"] + counts["quant_constants_bytes"]
    return {
        "weights_bytes": sum(counts.values()),
        **counts,
        "quantized_params": quantized_params,
        "bits_per_quantized_param": 8 * quantized_total / quantized_params if quantized_params else None,
        "total_params": total_params,
    }


def stored(module: torch.nn.Module, param: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(what this process holds of ``module``'s parameter ``param``, its quantization constants, how many weights
    it represents). FSDP's shard of a 4-bit weight is a plain DTensor: bitsandbytes keeps the weight's quant state
    on its module (``Linear4bit.quant_state``), every rank all of it."""
    local = held(param)
    if local is param:
        return param, quant_constants(param), logical_numel(param)
    constants = quant_constants(module)
    return local, constants, logical_numel(module) if constants else param.numel()


def reset_peak(device: torch.device) -> None:
    """Start a new peak window on CUDA, with the allocator's cached free blocks returned first so the window's
    reserved peak counts its own needs, not an earlier phase's cache (evaluation before training, say). On CPU
    the RSS peak is the process's lifetime peak and cannot reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cap_memory(device: torch.device, cap_bytes: int | None) -> None:
    """Hold this process's CUDA caching allocator to ``cap_bytes`` (``torch.cuda.set_per_process_memory_fraction``),
    so a larger GPU measures a smaller one: an allocation beyond it raises ``OutOfMemoryError`` as it would
    there. The cap counts what the allocator reserves, not the CUDA context (a few hundred MiB on the smaller GPU
    too). It holds for the whole process, so every cell on CUDA sets it, None lifting an earlier cell's; nothing
    off CUDA.

    The fraction only refuses *new* reservations: blocks an earlier cell of the same process left in the
    allocator's cache would serve allocations beyond the cap unchecked (a cell capped at a quarter of its need
    ran to the end on the H200 that way), so the cache is emptied first. Segments still partly in use cannot be
    emptied, so the cap is exact only in a fresh process, which is what every cell of a run gets."""
    if device.type != "cuda":
        return
    index = cuda_index(device)
    total = torch.cuda.get_device_properties(index).total_memory
    gc.collect()  # an earlier model still in a reference cycle holds its blocks until collected
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else min(1.0, cap_bytes / total), index)


def memory_snapshot(device: torch.device) -> dict:
    """What the device holds now and at peak (since ``reset_peak``), in bytes. Reads; never resets.

    CUDA: the caching allocator's allocated/reserved bytes (synchronized first, so pending frees have landed)
    and the driver's whole-device used bytes. CPU: the process's resident set, which also counts Python,
    libraries and the tokenizer: label it "CPU RSS", never "model memory".
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return {
            "kind": "cuda",
            "allocated_bytes": torch.cuda.memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "device_used_bytes": total - free,
        }
    import psutil

    return {
        "kind": "cpu_rss",
        "rss_bytes": psutil.Process().memory_info().rss,
        # ru_maxrss is in KiB on Linux; it is the whole process lifetime's peak.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
