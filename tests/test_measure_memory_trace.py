"""What is alive at a step's peak, replayed from the CUDA allocator's history (``measure.memory_trace``)."""

from __future__ import annotations

import dataclasses

import pytest

from qlora_core.cell import CellSettings, run_cell
from qlora_core.lora import LoraSettings
from qlora_core.measure.memory_trace import MIN_BLOCK_BYTES, Recording, alive_at_peak, block_bytes
from qlora_core.trainer import TrainSettings


def event(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size}


def test_requests_count_as_the_allocator_s_blocks():
    """The history records what was asked for; the allocator counts blocks of 512-byte multiples, 512 at least
    (a 4-byte scalar takes 512: three of them were the whole gap between replay and allocator on the H200)."""
    assert [block_bytes(n) for n in (4, 512, 513, 1024, 3 * 2**20 + 1)] == [512, 512, 1024, 1024, 3 * 2**20 + 512]


def test_the_replay_stops_at_the_highest_point_and_groups_what_is_alive_there_by_size():
    """In blocks of 512 bytes (``k``): baseline 10 k, 1 k of them freed; two blocks of 4 k and one of 3 k alive
    at the peak; 6 k freed before it, 2 k made after one of 4 k was freed. A request of 3 k - 100 bytes counts
    as the 3 k block the allocator makes."""
    k = MIN_BLOCK_BYTES
    events = [event("free_requested", 9, k),
              event("alloc", 1, 6 * k), event("free_requested", 1, 6 * k), event("free_completed", 1, 6 * k),
              event("alloc", 2, 4 * k), event("alloc", 3, 4 * k), event("alloc", 4, 3 * k - 100),
              event("free_requested", 2, 4 * k), event("alloc", 5, 2 * k)]
    recording = Recording(max_entries=100, baseline_bytes=10 * k, snapshot={"device_traces": [events]})
    found = alive_at_peak(recording, tokens=k, device_index=0)
    assert found["peak_bytes"] == 20 * k and found["baseline_freed_bytes"] == k
    assert found["complete"] and found["events"] == 9
    assert found["groups"] == [{"block_bytes": 4 * k, "count": 2, "bytes": 8 * k, "bytes_per_token": 4.0},
                               {"block_bytes": 3 * k, "count": 1, "bytes": 3 * k, "bytes_per_token": 3.0}]
    assert alive_at_peak(recording, k, 0, top=1)["other_bytes"] == 3 * k
    assert not alive_at_peak(Recording(9, 10 * k, {"device_traces": [events]}), k, 0)["complete"]


TRACED = CellSettings(mode="nf4-dq", shape="tiny-llama", path="lean", seq_len=128, batch_size=2, timing_warmup=0,
                      lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_steps=1, optimizer_state_upfront=True),
                      trace_memory=True)


def test_a_traced_cell_off_cuda_trains_as_ever_and_records_nothing():
    result = run_cell(dataclasses.replace(TRACED, device="cpu"))
    assert result["status"] == "ok" and "memory_at_peak" not in result


@pytest.mark.gpu
def test_the_replayed_peak_is_the_allocator_s_own_on_cuda():
    """The replay counts as the allocator does: its peak is the measured training peak (less, by under a MiB,
    only where the allocator handed out a cached block whole: ``block_bytes``), and the blocks alive there add
    up to it."""
    result = run_cell(dataclasses.replace(TRACED, device="cuda"))
    traced, memory = result["memory_at_peak"], result["memory"]
    assert traced["complete"]
    assert 0 <= memory["training_peak"]["peak_allocated_bytes"] - traced["peak_bytes"] < 2**20
    alive = sum(group["bytes"] for group in traced["groups"]) + traced["other_bytes"]
    assert traced["baseline_bytes"] - traced["baseline_freed_bytes"] + alive == traced["peak_bytes"]
