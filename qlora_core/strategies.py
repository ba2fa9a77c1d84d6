"""How the ranks of one training share it: ``ddp`` or ``fsdp``.

- ``ddp``: every rank holds the whole model as loaded; the adapters' gradients are all-reduced in backward
  (accelerate's ``prepare_model``: DistributedDataParallel).
- ``fsdp``: torch's FSDP2 (``fully_shard``) shards every parameter across the ranks, the frozen base's too. Each
  decoder layer, the input embeddings and the output head are units of their own, each gathered for its own
  forward and backward and resharded after (the embeddings are not held whole while the layers run, and the lean
  path's loss calls the head around the model's own forward); the rest (the final norm; tied embeddings and head,
  one parameter) belongs to the root, the module the loss is computed in. The adapters' gradients are
  reduce-scattered, so each rank steps the optimizer on its shard of them. bitsandbytes' 4-bit weights are stored
  in the compute dtype for it (``bnb_4bit_quant_storage``; FSDP shards floating-point tensors only: FSDP-QLoRA as
  bitsandbytes documents it); LLM.int8's int8 weights and HQQ's cannot be, and are refused.

With several processes both run inside their process group (``distributed``); FSDP needs one even for a single
process, which gets a group of its own.

Outside the training steps (a cell's evaluations after training) the model inside the wrapper is called on its
own: under DDP every rank holds it whole; under FSDP every rank must run the same forwards in lock-step, each unit
gathering its shards from all of them, inside ``forwards_outside_training``, and ``whole_trainable`` gathers the
adapters whole (for the merged model).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from qlora_core.modes import Mode

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str) -> str:
    """``strategy`` itself when known; otherwise a ValueError naming the strategies."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return strategy


def mode_for(mode: Mode, strategy: str) -> Mode:
    """``mode`` as ``strategy`` loads it: under FSDP a 4-bit mode's weights are stored in its compute dtype (the
    same 4-bit values, in a dtype FSDP can shard); a mode whose quantized weights FSDP cannot shard is refused
    with a ValueError."""
    if check_strategy(strategy) == "ddp" or not mode.is_quantized:
        return mode
    if mode.is_4bit:
        return dataclasses.replace(mode, quant_storage=mode.compute_dtype)
    raise ValueError(f"mode {mode.name!r} cannot be trained with fsdp: FSDP shards floating-point tensors only, "
                     f"and its {mode.weight_format} weights are not; use ddp")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model, peft-wrapped or inside any other module (``trainer.LossModule``,
    DDP): instances of the classes its models name in ``_no_split_modules`` (Llama's ``LlamaDecoderLayer``) or of
    their subclasses (FSDP2 gives each unit it shards a class of its own, ``FSDPLlamaDecoderLayer``), in module
    order."""
    names = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    return [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]


def wrap(accelerator, loss_module: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """``loss_module`` (``trainer.LossModule``, its ``model`` inside) as ``strategy`` trains it: in accelerate's
    DistributedDataParallel, or sharded in place by FSDP2, every unit the module docstring names and the loss
    module itself as the root. Optimizers must take the parameters after this: FSDP replaces them with shards."""
    if check_strategy(strategy) == "ddp":
        return accelerator.prepare_model(loss_module)
    from torch.distributed.fsdp import fully_shard

    model = loss_module.model
    _process_group(next(model.parameters()).device)
    for unit in fsdp_units(model):
        fully_shard(unit)
    fully_shard(loss_module)
    return loss_module


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of a (peft-wrapped) transformers model that ``wrap`` shards as units of their own, in forward
    order: the input embeddings, every decoder layer and the output head, the embeddings and head only where they
    are two parameters (tied, they are one, the root's). The memory floor reads the same units
    (``measure.floor.sharded_params``)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    return [embeddings, *decoder_layers(model), head] if not tied else decoder_layers(model)


def _process_group(device: torch.device) -> None:
    """FSDP shards over the default process group: a process outside one (a single process, for which accelerate
    makes none on CUDA) gets a group of its own, in memory."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1, store=torch.distributed.HashStore())


@contextlib.contextmanager
def gradient_sync(accelerator, wrapped: torch.nn.Module, strategy: str, sync: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: the gradients are reduced across the ranks only when ``sync``
    (a step's last micro-batch); before it each rank accumulates its own (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``), so a step reduces once whatever its micro-batches. DDP decides at forward
    time, so the context must hold the forward too; FSDP's switch is put back on when it ends."""
    if sync:
        yield
    elif strategy == "ddp":
        with accelerator.no_sync(wrapped):
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


@contextlib.contextmanager
def forwards_outside_training(wrapped: torch.nn.Module, strategy: str) -> Iterator[None]:
    """Around forwards of the model inside ``wrapped`` called on their own, not through ``wrapped`` (an
    evaluation). Under FSDP the root's own parameters (final norm; tied embeddings and head) are gathered for the
    duration, since only the root's forward gathers them; the units gather theirs in their own forwards, as in
    training, so every rank must run the same forwards inside it (each gather is a collective). Under DDP nothing
    is needed: every rank holds the whole model."""
    if check_strategy(strategy) == "ddp":
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def whole_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s trainable parameters (its adapters), detached, by state-dict key: FSDP's shards all-gathered
    into whole tensors (a collective: every rank must call it), other parameters as they are."""
    from torch.distributed.tensor import DTensor

    return {name: param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()
            for name, param in model.named_parameters() if param.requires_grad}
