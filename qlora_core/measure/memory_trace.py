"""What is alive at a step's peak: the CUDA allocator's own history of one step, replayed to its peak.

A predicted peak that misses the measured one says by how much, not where. ``recorded`` keeps the caching
allocator's history (``torch.cuda.memory._record_memory_history``: every allocation and free) over the calls
inside it, and ``alive_at_peak`` replays that history to the moment the allocated bytes were highest and groups
the blocks alive then by size, each also in bytes per token, so a block of ``4.0 x hidden`` bytes a token reads
as one fp32 hidden-wide tensor. No stacks are recorded: with Python stacks on (torch 2.11, Python 3.12, on the
H200), a checkpoint's recomputation in backward failed inside the autograd engine ("returned NULL without setting
an exception"), and sizes in bytes a token say what a block is in a model whose widths are known.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import torch

#: History entries the allocator keeps (a ring: the oldest go first); a step of an 8B model with tiled MLPs
#: at 100k tokens makes a few hundred thousand.
MAX_ENTRIES = 2_000_000
#: Groups kept in the summary, largest first (the rest are summed).
TOP_GROUPS = 40
#: The caching allocator's smallest block and the multiple it rounds every request up to (bytes).
MIN_BLOCK_BYTES = 512


def block_bytes(requested: int) -> int:
    """The block the allocator counts for a request of ``requested`` bytes (its history records the request):
    rounded up to ``MIN_BLOCK_BYTES``. A block it takes whole from its cache, unsplit because the rest would be
    too small to keep (under 1 MiB of a large block), counts that rest too: the history cannot show it."""
    return max(MIN_BLOCK_BYTES, -(-requested // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)


@dataclass
class Recording:
    """Filled when ``recorded`` exits: the allocator's snapshot, the bytes allocated when recording began, and
    the history's capacity (entries)."""

    max_entries: int
    baseline_bytes: int = 0
    snapshot: dict = field(default_factory=dict)


@contextlib.contextmanager
def recorded(device: torch.device, max_entries: int = MAX_ENTRIES):
    """Record the CUDA allocator's history on ``device`` over the body; yields a ``Recording`` filled on exit."""
    recording = Recording(max_entries)
    torch.cuda.synchronize(device)
    recording.baseline_bytes = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(context=None, max_entries=max_entries)
    try:
        yield recording
        torch.cuda.synchronize(device)
        recording.snapshot = torch.cuda.memory._snapshot(device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def _replay(events: list[dict], baseline_bytes: int, until: int | None = None):
    """Allocated bytes after each event up to ``until`` (all: None), as the allocator counts them (in
    ``block_bytes``; a block stops counting when its free is requested, even while a stream it was recorded on
    still uses it); returns (the
    index of the highest point, its bytes, the blocks made since recording began alive after event ``until`` by
    address, and the bytes freed by then of blocks made before)."""
    allocated, highest, highest_at, baseline_freed = baseline_bytes, baseline_bytes, -1, 0
    alive: dict[int, int] = {}  # address -> block bytes
    for index, event in enumerate(events if until is None else events[:until + 1]):
        size = block_bytes(event["size"])
        if event["action"] == "alloc":
            allocated += size
            alive[event["addr"]] = size
            if allocated > highest:
                highest, highest_at = allocated, index
        elif event["action"] == "free_requested":
            allocated -= size
            if alive.pop(event["addr"], None) is None:
                baseline_freed += size
    return highest_at, highest, alive, baseline_freed


def alive_at_peak(recording: Recording, tokens: int, device_index: int, top: int = TOP_GROUPS) -> dict:
    """The recorded history replayed to its peak: ``peak_bytes`` (baseline included, to compare with the
    allocator's own peak), ``baseline_bytes``, ``baseline_freed_bytes`` (of the blocks made before recording,
    those freed before the peak), ``events`` and ``complete`` (False when the ring dropped early
    entries: the replay then misses what those made), and ``groups``: the blocks made during the recording and
    alive at the peak, by block size (``block_bytes``), each with its ``count``, ``bytes`` and ``bytes_per_token`` of one block,
    largest total first; the ``top`` largest kept, the rest summed in ``other_bytes``."""
    events = recording.snapshot.get("device_traces", [[]])[device_index]
    peak_at, peak_bytes, _, _ = _replay(events, recording.baseline_bytes)
    _, _, alive, baseline_freed = _replay(events, recording.baseline_bytes, until=peak_at)
    counts = collections.Counter(alive.values())
    ordered = sorted(counts.items(), key=lambda item: item[0] * item[1], reverse=True)
    return {
        "peak_bytes": peak_bytes,
        "baseline_bytes": recording.baseline_bytes,
        "baseline_freed_bytes": baseline_freed,
        "events": len(events),
        "complete": len(events) < recording.max_entries,
        "tokens": tokens,
        "groups": [{"block_bytes": size, "count": count, "bytes": size * count, "bytes_per_token": size / tokens}
                   for size, count in ordered[:top]],
        "other_bytes": sum(size * count for size, count in ordered[top:]),
    }
