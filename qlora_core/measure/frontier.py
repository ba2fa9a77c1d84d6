"""The context frontier: the longest sequence one training step can take (batch 1) under a memory capacity, as
the memory floor predicts it, with the memory each extra token costs there.

Predicted peaks grow with the tokens of a step (linearly for models with SDPA attention: saved activations,
int8's held inputs and transients all scale with the token count), so the frontier is found by doubling and
bisection over whole multiples of ``TOKEN_GRANULARITY``. The floor predicts allocated bytes; a hard cap binds
the bytes the CUDA allocator reserves, which exceed them by what it cannot reuse (blocks split for other sizes,
blocks a side stream still reads), so the frontier leaves ``ALLOCATOR_HEADROOM`` of the capacity to that. A run
under the cap at the predicted frontier is the check, and one 5 % above it should fail.
"""

from __future__ import annotations

import functools

from qlora_core.levers import Levers
from qlora_core.measure.floor import memory_floor
from qlora_core.modes import Mode

#: Frontiers are whole multiples of this many tokens (the lean path's loss chunk is 512).
TOKEN_GRANULARITY = 256
#: The share of a capacity a frontier leaves to the allocator's slack under a hard cap. On the H200 at 24 GiB
#: (2026-12-03), with the floor predicting allocated peaks within 0.6 %: probes ran reserving 0.6-1.9 % of the
#: cap beyond what they allocated, and one whose allocated peak was predicted 0.5 % under the cap (MLP tiles,
#: 42,496 tokens) ran out of memory.
ALLOCATOR_HEADROOM = 0.02
#: The search stops here (2**22 tokens, 4 M): beyond any context a single GPU trains today.
MAX_TOKENS = 2**22


def predicted_peak_bytes(config, mode: Mode, lora, tokens: int, path: str, optimizer: str = "adamw",
                         levers: Levers = Levers(), int8_outlier_columns: dict[str, float] | None = None) -> int:
    """The predicted training peak of one sequence of ``tokens`` tokens (batch 1, gradient checkpointing), with
    LLM.int8's outlier columns a layer where given (``measure.floor.memory_floor``)."""
    return memory_floor(config, mode, lora, tokens, 1, True, path=path, optimizer=optimizer, levers=levers,
                        int8_outlier_columns=int8_outlier_columns)["peak_bytes"]


def _affine_guess(config, mode: Mode, lora, capacity_bytes: int, path: str, optimizer: str,
                  levers: Levers, int8_outlier_columns: dict[str, float] | None) -> int:
    """Where the frontier lies if every phase's predicted bytes are affine in the tokens (true for attention
    without a score matrix, beyond the lean loss's first chunk), in whole steps of ``TOKEN_GRANULARITY``: each
    phase's line through two lengths, solved for the capacity, the tightest phase deciding."""
    short, long = 4 * TOKEN_GRANULARITY, 8 * TOKEN_GRANULARITY
    at = lambda tokens: memory_floor(config, mode, lora, tokens, 1, True, path=path,  # noqa: E731
                                     optimizer=optimizer, levers=levers,
                                     int8_outlier_columns=int8_outlier_columns)["phase_peak_bytes"]
    low, high = at(short), at(long)
    limits = []
    for phase, bytes_short in low.items():
        slope = (high[phase] - bytes_short) / (long - short)
        if slope > 0:
            limits.append(short + (capacity_bytes - bytes_short) / slope)
        elif bytes_short > capacity_bytes:
            limits.append(0)
    return max(0, int(min(limits, default=MAX_TOKENS) // TOKEN_GRANULARITY))


def predicted_frontier(config, mode: Mode, lora, capacity_bytes: int, path: str, optimizer: str = "adamw",
                       levers: Levers = Levers(), beyond_positions: bool = False,
                       host_capacity_bytes: int | None = None,
                       int8_outlier_columns: dict[str, float] | None = None) -> dict:
    """The largest sequence (a multiple of ``TOKEN_GRANULARITY``, batch 1) whose predicted peak fits
    ``capacity_bytes`` less ``ALLOCATOR_HEADROOM`` (``usable_bytes``), as plain JSON: ``tokens`` (0 when not
    even the smallest fits; at most the model's positions and ``MAX_TOKENS``, ``limited_by`` saying which bound
    held: ``memory``, ``positions`` or, with activations offloaded without a cap of their own
    (``Levers.offload_host_gib``), ``host memory``: what they take there within ``host_capacity_bytes``), its
    ``peak_bytes``, ``bytes_per_token``: what one more token costs there, and the lean path's ``levers`` pulled
    (``qlora_core.levers``). ``beyond_positions``: memory alone bounds it, past the positions the model was
    trained for (RoPE computes any position; published context records, Unsloth's, are counted so).
    ``int8_outlier_columns``: LLM.int8's outlier columns a layer, for an int8 mode (a shape's random weights:
    ``shapes.random_weights_int8_outliers``); recorded.

    The affine guess (``_affine_guess``) is confirmed by two predictions, one at it and one a step above;
    where it does not hold (BLOOM's quadratic attention) the answer comes from bisection."""
    @functools.cache  # the search, the answer and its slope revisit lengths: each is predicted once
    def peak(steps: int) -> int:
        return predicted_peak_bytes(config, mode, lora, steps * TOKEN_GRANULARITY, path, optimizer, levers,
                                    int8_outlier_columns)

    usable = int(capacity_bytes * (1 - ALLOCATOR_HEADROOM))
    fits = lambda steps: steps == 0 or peak(steps) <= usable  # noqa: E731
    positions = None if beyond_positions else getattr(config, "max_position_embeddings", None)
    bounds = {"positions": min(MAX_TOKENS, positions or MAX_TOKENS) // TOKEN_GRANULARITY}
    if levers.offload_activations and levers.offload_host_gib is None and host_capacity_bytes is not None:
        bounds["host memory"] = host_capacity_bytes // offloaded_bytes_per_step(config, mode, lora, path, levers)
    bound, limit = min(bounds.items(), key=lambda item: item[1])
    steps = min(_affine_guess(config, mode, lora, usable, path, optimizer, levers, int8_outlier_columns), limit)
    if not (fits(steps) and (steps == limit or not fits(steps + 1))):
        low, high = 0, limit + 1  # fits(low); high: beyond the search, or the first that fails
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        steps = low
    found = {"mode": mode.name, "path": path, "levers": levers.describe(), "beyond_positions": beyond_positions,
             "capacity_bytes": capacity_bytes, "usable_bytes": usable,
             "int8_outlier_columns": int8_outlier_columns}
    if steps == 0:
        return {**found, "tokens": 0, "peak_bytes": peak(1), "bytes_per_token": None, "limited_by": "memory"}
    slope = (peak(steps + 1) - peak(steps)) / TOKEN_GRANULARITY
    limited_by = bound if steps == limit and fits(limit + 1) else "memory"
    return {**found, "tokens": steps * TOKEN_GRANULARITY, "peak_bytes": peak(steps), "bytes_per_token": slope,
            "limited_by": limited_by}


def offloaded_bytes_per_step(config, mode: Mode, lora, path: str, levers: Levers) -> int:
    """Host bytes the offloaded activations of one ``TOKEN_GRANULARITY`` of tokens take (linear in the tokens)."""
    return memory_floor(config, mode, lora, TOKEN_GRANULARITY, 1, True, path=path,
                        levers=levers)["offloaded_activations_bytes"]

