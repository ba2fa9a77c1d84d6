"""What is alive at a step's peak, replayed from the CUDA allocator's history (``measure.memory_trace``)."""

from __future__ import annotations

import dataclasses

import pytest

from qlora_core.cell import CellSettings, run_cell
from qlora_core.lora import LoraSettings
from qlora_core.measure.memory_trace import Recording, alive_at_peak
from qlora_core.trainer import TrainSettings


def event(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size}


def test_the_replay_stops_at_the_highest_point_and_groups_what_is_alive_there_by_size():
    """Baseline 1,000 bytes, 50 of them freed; two blocks of 200 and one of 150 alive at the peak; 300 freed
    before it, 100 made after one of 200 was freed."""
    events = [event("free_requested", 9, 50),
              event("alloc", 1, 300), event("free_requested", 1, 300), event("free_completed", 1, 300),
              event("alloc", 2, 200), event("alloc", 3, 200), event("alloc", 4, 150), event("free_requested", 2, 200),
              event("alloc", 5, 100)]
    recording = Recording(max_entries=100, baseline_bytes=1000, snapshot={"device_traces": [events]})
    found = alive_at_peak(recording, tokens=50, device_index=0)
    assert found["peak_bytes"] == 1500 and found["baseline_freed_bytes"] == 50
    assert found["complete"] and found["events"] == 9
    assert found["groups"] == [{"block_bytes": 200, "count": 2, "bytes": 400, "bytes_per_token": 4.0},
                               {"block_bytes": 150, "count": 1, "bytes": 150, "bytes_per_token": 3.0}]
    assert alive_at_peak(recording, 50, 0, top=1)["other_bytes"] == 150
    assert not alive_at_peak(Recording(9, 1000, {"device_traces": [events]}), 50, 0)["complete"]


TRACED = CellSettings(mode="nf4-dq", shape="tiny-llama", path="lean", seq_len=128, batch_size=2, timing_warmup=0,
                      lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_steps=1, optimizer_state_upfront=True),
                      trace_memory=True)


def test_a_traced_cell_off_cuda_trains_as_ever_and_records_nothing():
    result = run_cell(dataclasses.replace(TRACED, device="cpu"))
    assert result["status"] == "ok" and "memory_at_peak" not in result


@pytest.mark.gpu
def test_the_replayed_peak_is_the_allocator_s_own_on_cuda():
    """The replay counts as the allocator does: its peak is the measured training peak to the byte, and the
    blocks alive there add up to it."""
    result = run_cell(dataclasses.replace(TRACED, device="cuda"))
    traced, memory = result["memory_at_peak"], result["memory"]
    assert traced["complete"] and traced["peak_bytes"] == memory["training_peak"]["peak_allocated_bytes"]
    alive = sum(group["bytes"] for group in traced["groups"]) + traced["other_bytes"]
    assert traced["baseline_bytes"] - traced["baseline_freed_bytes"] + alive == traced["peak_bytes"]
