"""Switches of the lean path, each off by default and measured on and off, with its term in the memory model
(``measure.floor``). Two trade step time for GPU memory (issue 13's levers):

- ``offload_activations``: every tensor autograd saves outside a checkpointed region (under the lean path's
  checkpointing that is each decoder layer's input, the final norm's input and the loss chunks' hidden states)
  is copied to pinned host memory on a side CUDA stream as soon as it is saved, and copied back when backward
  needs it. The GPU then holds one layer's input instead of all of them (256 KiB a token each at
  Llama-3.1-8B): the one a layer's recompute brought back; the host holds the rest, the embeddings' output
  among them (the lean path makes it need no gradient: ``paths.drop_input_gradients``), so host memory bounds
  the longest sequence instead.
  ``offload_host_gib`` caps what one forward offloads: tensors go to the host in the order they are saved (the
  first layers' inputs first) while they fit, and the rest stay on the GPU, which holds the last layers' inputs,
  needed first in backward. Where host memory, not the GPU's, would bound the frontier (a 70B model's inputs
  outgrow a host's RAM before its GPU memory), the two then share them.
- ``mlp_tile_tokens``: each decoder layer's MLP runs over the sequence in tiles of this many tokens, each tile
  under its own checkpoint, so the MLP's saved tensors and gradients (three MLP-wide tensors a token, with
  their adapters' inputs) exist for one tile at a time while its layer is recomputed and differentiated.

Neither changes the mathematics: the same loss and gradients (tests/test_levers.py).

One trades LLM.int8's arithmetic for step time and memory, in the int8 mode:

- ``int8_matmul``: how its linears compute (``backends.bitsandbytes.INT8_MATMULS``). ``llm-int8`` (the
  default: what bitsandbytes runs on CUDA) quantizes every input to int8 but for its outlier columns, with fp16
  copies of the input and a host synchronization to find the outliers; ``dequantized`` multiplies the input by
  the int8 weight dequantized to the compute dtype, as bitsandbytes itself trains on a CPU. The same stored
  weights and the same input gradient; the forward leaves out the input's int8 rounding, so the loss moves by
  that rounding's error, and the floor leaves out its quantizing transient.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from qlora_core.backends.bitsandbytes import DEQUANTIZED, LLM_INT8, check_int8_matmul, keep_no_int8_inputs
from qlora_core.measure.memory import tensor_bytes
from qlora_core.units import GIB

#: Saved tensors smaller than this stay where they are: copying them costs more in launches than it frees.
OFFLOAD_MIN_BYTES = 1 << 20
#: The MLP of a decoder layer is the child named so in the Llama, Qwen2 and Mistral families.
MLP_NAME = "mlp"


def power_of_two_pieces(numel: int, smallest: int) -> list[int]:
    """``numel`` elements as lengths that are powers of two, largest first (its binary digits), those below
    ``smallest`` gathered in one last piece. torch's pinned-memory allocator rounds each allocation up to a power
    of two, which costs up to twice a tensor's size in host memory (a 3.0 GB layer input takes 4 GiB); pieces of
    these lengths cost their size, and the last at most ``smallest`` elements more."""
    pieces = [1 << bit for bit in reversed(range(numel.bit_length())) if numel >> bit & 1 and 1 << bit >= smallest]
    rest = numel - sum(pieces)
    return pieces + [rest] if rest else pieces


@dataclass(eq=False)
class HostCopy:
    """A saved activation in host memory: its elements in pieces (``power_of_two_pieces``), in order, its size
    and dtype, the CUDA event marking the copies done (None on a CPU device), the device it came from, and the
    tensor brought back from it while that is alive."""

    pieces: list[torch.Tensor]
    size: torch.Size
    dtype: torch.dtype
    copied: torch.cuda.Event | None
    device: torch.device
    brought_back: weakref.ref | None = None

    def bring_back(self) -> torch.Tensor:
        """The activation on its device again (contiguous), copied in on the current stream."""
        tensor = torch.empty(self.size, dtype=self.dtype, device=self.device)
        flat, start = tensor.view(-1), 0
        for piece in self.pieces:
            flat[start:start + piece.numel()].copy_(piece, non_blocking=True)
            start += piece.numel()
        return tensor


class ActivationOffload:
    """Saved-tensor hooks that keep each large saved activation in host memory between forward and backward.

    ``pack`` copies a CUDA tensor into pinned host memory on a side stream that first waits for the compute
    stream (so the copy reads finished values), and tells the allocator the GPU block is in use on that stream
    (``record_stream``), so the block is reused only once the copy is done: the compute stream never waits for a
    copy in forward. ``unpack`` makes the compute stream wait for the copy and brings the tensor back. Parameters
    and small tensors are returned as they are. A tensor saved twice in one forward (an RMSNorm's fp32 input, by
    its square and by its scaling) is copied once, and brought back once while the first copy is alive.
    ``offloaded_bytes`` counts what went to the host (bytes), for the memory model's check: the host holds that
    and at most ``min_bytes`` more a tensor (``power_of_two_pieces``). On a CPU device nothing moves, but the
    same copies are made, so the hooks' effect on the numbers can be tested there.
    """

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES, max_bytes: int | None = None):
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes  # a forward's share of host memory (bytes); None: no cap
        self.offloaded_bytes = 0
        self._forward_bytes = 0  # offloaded by the forward under way
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._packed: dict[int, tuple[weakref.ref, HostCopy]] = {}  # id(tensor) -> (the tensor, its copy)

    def forget(self) -> None:
        """Drop the forward's record of what it packed (a forward's tensors are never saved by the next one)."""
        self._packed.clear()
        self._forward_bytes = 0

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _stays(self, tensor: torch.Tensor, size: int) -> bool:
        """Whether a saved tensor of ``size`` bytes stays where it is: a parameter, a leaf that requires grad
        (as the embeddings' output is where transformers' hook is left on: its gradient accumulator holds it to
        the end of backward, so a host copy would free nothing), a small one, or one that would take the
        forward's offload past ``max_bytes``."""
        over = self.max_bytes is not None and self._forward_bytes + size > self.max_bytes
        held = isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad)
        return held or size < self.min_bytes or over

    def pack(self, tensor: torch.Tensor):
        size = tensor_bytes(tensor)
        seen = self._packed.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            return seen[1]
        if self._stays(tensor, size):
            return tensor
        packed = self._copy_to_host(tensor)
        self._packed[id(tensor)] = (weakref.ref(tensor), packed)
        self.offloaded_bytes += size
        self._forward_bytes += size
        return packed

    def _pieces_of(self, flat: torch.Tensor, pin: bool) -> list[torch.Tensor]:
        """Host copies of ``flat``'s elements in ``power_of_two_pieces``, each copied without blocking."""
        pieces, start = [], 0
        for length in power_of_two_pieces(flat.numel(), self.min_bytes // flat.element_size()):
            piece = torch.empty(length, dtype=flat.dtype, pin_memory=pin)
            pieces.append(piece.copy_(flat[start:start + length], non_blocking=pin))
            start += length
        return pieces

    def _copy_to_host(self, tensor: torch.Tensor) -> HostCopy:
        flat = tensor.contiguous().view(-1)
        if tensor.device.type != "cuda":
            return HostCopy(self._pieces_of(flat, pin=False), tensor.size(), tensor.dtype, None, tensor.device)
        stream = self._side_stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            pieces = self._pieces_of(flat, pin=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        flat.record_stream(stream)  # the original's block, or the contiguous copy read instead of it
        return HostCopy(pieces, tensor.size(), tensor.dtype, copied, tensor.device)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.brought_back is not None and (tensor := packed.brought_back()) is not None:
            return tensor
        if packed.copied is not None:
            torch.cuda.current_stream(packed.device).wait_event(packed.copied)
        tensor = packed.bring_back()
        packed.brought_back = weakref.ref(tensor)
        return tensor

    def hooks(self):
        """The context under which a forward's saved tensors are offloaded."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def with_offload(loss_fn, offload: ActivationOffload | None):
    """``loss_fn(model, input_ids)`` with its forward's saved activations offloaded; ``loss_fn`` itself when
    ``offload`` is None. Backward runs outside the hooks and unpacks what the forward packed."""
    if offload is None:
        return loss_fn

    @functools.wraps(loss_fn)
    def offloaded(*args, **kwargs):
        with offload.hooks():
            try:
                return loss_fn(*args, **kwargs)
            finally:
                offload.forget()

    return offloaded


def _tiled_mlp_forward(forward, tile_tokens: int, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP ``forward`` of ``hidden`` [..., h] computed ``tile_tokens`` tokens at a time, each tile under
    non-reentrant checkpointing (the RNG state kept, so LoRA dropout draws the same mask in its recompute). Per
    token the MLP is independent of the others: the result equals the untiled one."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    tiles = [checkpoint(forward, flat[start:start + tile_tokens], use_reentrant=False)
             for start in range(0, flat.shape[0], tile_tokens)]
    return torch.cat(tiles).reshape(*hidden.shape[:-1], -1)


def decoder_mlps(model) -> list[torch.nn.Module]:
    """The MLP module of every decoder layer (a child named ``mlp`` holding a ``down_proj``)."""
    return [module for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == MLP_NAME and hasattr(module, "down_proj")]


def tile_mlps(model, tile_tokens: int):
    """Run every decoder layer's MLP in tiles of ``tile_tokens`` tokens (``_tiled_mlp_forward``), in place; the
    modules and their names are unchanged, so adapters save and load as before. Returns the model; a ValueError
    for a model with no such MLP (BLOOM's is not tiled)."""
    if tile_tokens < 1:
        raise ValueError(f"mlp_tile_tokens must be >= 1, got {tile_tokens}")
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError("mlp tiling needs decoder layers with an 'mlp' holding a 'down_proj' (Llama, Qwen2, "
                         "Mistral); this model has none")
    for mlp in mlps:  # the forward it has now: a fused kernel's (``kernels.apply_kernels``) or its class's
        mlp.forward = functools.partial(_tiled_mlp_forward, mlp.forward, tile_tokens)
    return model


@dataclass(frozen=True)
class Levers:
    """Which levers a lean-path cell pulls (module docstring); the default pulls none."""

    offload_activations: bool = False
    mlp_tile_tokens: int | None = None
    offload_host_gib: float | None = None
    int8_matmul: str = LLM_INT8

    def __post_init__(self) -> None:
        if self.mlp_tile_tokens is not None and self.mlp_tile_tokens < 1:
            raise ValueError(f"mlp_tile_tokens must be >= 1 (or None: untiled), got {self.mlp_tile_tokens}")
        if self.offload_host_gib is not None and not (self.offload_activations and self.offload_host_gib > 0):
            raise ValueError(f"offload_host_gib caps the offloaded activations: it needs offload_activations and "
                             f"a share > 0, got {self.offload_host_gib} GiB with offload_activations="
                             f"{self.offload_activations}")
        check_int8_matmul(self.int8_matmul)

    @property
    def offload_host_bytes(self) -> int | None:
        """The cap on what one forward offloads (bytes), or None: no cap."""
        return None if self.offload_host_gib is None else int(self.offload_host_gib * GIB)

    @property
    def memory_levers(self) -> bool:
        """Whether a lever acting on what checkpointing keeps is pulled (the offload, the MLP tiles)."""
        return self.offload_activations or self.mlp_tile_tokens is not None

    @property
    def int8_dequantized(self) -> bool:
        """Whether the int8 linears compute with their weight dequantized instead of LLM.int8's kernel."""
        return self.int8_matmul == DEQUANTIZED

    def check(self, path: str, gradient_checkpointing: bool) -> Levers:
        """``self`` when a training set-up can pull these levers: all are the lean path's, and the memory levers
        act on what checkpointing leaves (the layers' inputs, the MLP recomputed in tiles); a ValueError
        otherwise."""
        if self.memory_levers and path != "lean":
            raise ValueError(f"offloading activations and MLP tiling are levers of the lean path, not {path!r}")
        if self.memory_levers and not gradient_checkpointing:
            raise ValueError("offloading activations and MLP tiling act on what gradient checkpointing keeps: "
                             "turn checkpointing on")
        if self.int8_dequantized and path != "lean":
            raise ValueError(f"the dequantized int8 matmul is the lean path's (its int8 linears' own autograd "
                             f"function), not {path!r}'s")
        return self

    def mlp_tokens(self, tokens: int) -> int:
        """Tokens whose MLP tensors exist at once when a layer is recomputed: one tile's, or all ``tokens``."""
        return tokens if self.mlp_tile_tokens is None else min(tokens, self.mlp_tile_tokens)

    def label(self) -> str:
        """A file-name suffix naming the levers pulled ("" for none): ``-offload``, ``-offload-host100gib``,
        ``-mlp-tile4096``, ``-int8-dequantized``."""
        parts = ["offload"] * self.offload_activations
        parts += [f"host{self.offload_host_gib:g}gib"] if self.offload_host_gib is not None else []
        parts += [f"mlp-tile{self.mlp_tile_tokens}"] if self.mlp_tile_tokens is not None else []
        parts += ["int8-dequantized"] * self.int8_dequantized
        return "".join(f"-{part}" for part in parts)

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    def apply(self, model, loss_fn):
        """(``model`` with its MLPs tiled and its int8 linears dequantizing where asked, ``loss_fn`` offloading
        where asked): the training set-up with these levers pulled, after the adapters are attached."""
        if self.mlp_tile_tokens is not None:
            tile_mlps(model, self.mlp_tile_tokens)
        if self.int8_dequantized:
            keep_no_int8_inputs(model, self.int8_matmul)
        offload = ActivationOffload(max_bytes=self.offload_host_bytes) if self.offload_activations else None
        return model, with_offload(loss_fn, offload)
