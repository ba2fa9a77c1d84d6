"""The predicted context frontier: the longest sequence whose predicted peak fits a capacity, one step longer
does not, for affine models (the solved answer) and BLOOM (its attention is quadratic: bisection)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlora_core.lora import LoraSettings
from qlora_core.levers import Levers
from qlora_core.measure.frontier import (ALLOCATOR_HEADROOM, TOKEN_GRANULARITY, offloaded_bytes_per_step,
                                         predicted_frontier, predicted_peak_bytes)
from qlora_core.modes import get_mode
from qlora_core.shapes import random_weights_int8_outliers, shape_config
from qlora_core.units import GIB

LORA = LoraSettings(r=16, alpha=32)


@pytest.mark.parametrize("shape, mode, path, capacity_gib", [
    ("Llama-3.1-8B", "nf4-dq", "lean", 24), ("Llama-3.1-8B", "int8", "reference", 48),
    ("tiny-bloom", "bf16", "reference", 0.01),
])
def test_the_frontier_fits_and_one_step_more_does_not(shape, mode, path, capacity_gib):
    """Fits what the capacity leaves once the allocator's headroom is set aside (``ALLOCATOR_HEADROOM``)."""
    config, capacity = shape_config(shape), int(capacity_gib * GIB)
    found = predicted_frontier(config, get_mode(mode), LORA, capacity, path)
    tokens, usable = found["tokens"], found["usable_bytes"]
    assert usable == int(capacity * (1 - ALLOCATOR_HEADROOM))
    assert tokens > 0 and tokens % TOKEN_GRANULARITY == 0
    assert found["peak_bytes"] == predicted_peak_bytes(config, get_mode(mode), LORA, tokens, path) <= usable
    assert predicted_peak_bytes(config, get_mode(mode), LORA, tokens + TOKEN_GRANULARITY, path) > usable
    assert found["bytes_per_token"] > 0


def test_more_memory_buys_more_tokens_and_the_lean_path_most():
    config, mode = shape_config("Llama-3.1-8B"), get_mode("nf4-dq")
    lean = [predicted_frontier(config, mode, LORA, gib * GIB, "lean")["tokens"] for gib in (24, 48, 80)]
    reference = [predicted_frontier(config, mode, LORA, gib * GIB, "reference")["tokens"] for gib in (24, 48, 80)]
    assert lean == sorted(lean) and reference == sorted(reference)
    assert all(l > r for l, r in zip(lean, reference))


def test_a_capacity_below_the_weights_fits_nothing():
    found = predicted_frontier(shape_config("Llama-3.1-8B"), get_mode("bf16"), LORA, 10 * GIB, "lean")
    assert found["tokens"] == 0 and found["bytes_per_token"] is None and found["peak_bytes"] > 10 * GIB


def test_the_command_prints_the_table_and_writes_json(tmp_path):
    run = subprocess.run([sys.executable, "-m", "qlora_core.cli", "frontier", "--shapes", "tiny-llama", "--modes",
                          "bf16,nf4", "--paths", "lean", "--capacity-gib", "0.01,0.02", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "predicted context frontier" in run.stdout
    assert (tmp_path / "frontier.png").stat().st_size > 0
    document = json.loads((tmp_path / "frontier.json").read_text())
    assert document["schema"] == "qlora-bench/frontier/1" and "prediction" in document["kind"]
    assert [(f["mode"], f["capacity_bytes"]) for f in document["frontiers"]] == [
        (mode, int(gib * GIB)) for mode in ("bf16", "nf4") for gib in (0.01, 0.02)]


@pytest.mark.parametrize("option, value, says", [("--shapes", "no-such-shape", "no-such-shape"),
                                                  ("--capacity-gib", "24,-1", "must be a finite number > 0"),
                                                  ("--probes", "at,beside", "unknown probes ['beside']")])
def test_the_command_refuses_bad_input_in_one_line(option, value, says):
    args = {"--shapes": "tiny-llama", "--capacity-gib": "1", option: value}
    run = subprocess.run([sys.executable, "-m", "qlora_core.cli", "frontier", *[x for kv in args.items() for x in kv]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr


def test_a_model_s_positions_bound_the_frontier_before_memory_does():
    found = predicted_frontier(shape_config("tiny-llama"), get_mode("bf16"), LORA, 1 * GIB, "lean")
    assert found["tokens"] == shape_config("tiny-llama").max_position_embeddings
    assert found["limited_by"] == "positions"
    assert predicted_frontier(shape_config("Llama-3.1-8B"), get_mode("bf16"), LORA, 24 * GIB, "lean")["limited_by"] \
        == "memory"


def test_levers_lengthen_the_frontier_and_host_memory_bounds_an_offloaded_one():
    config, mode = shape_config("Llama-3.1-8B"), get_mode("nf4-dq")
    plain = predicted_frontier(config, mode, LORA, 24 * GIB, "lean")
    both = Levers(offload_activations=True, mlp_tile_tokens=4096)
    pulled = predicted_frontier(config, mode, LORA, 24 * GIB, "lean", levers=both)
    assert pulled["tokens"] > 2 * plain["tokens"] and pulled["levers"] == both.describe()
    assert pulled["bytes_per_token"] < plain["bytes_per_token"] / 2
    beyond = predicted_frontier(config, mode, LORA, 80 * GIB, "lean", levers=both, beyond_positions=True)
    assert beyond["tokens"] > config.max_position_embeddings and beyond["limited_by"] == "memory"
    assert beyond["beyond_positions"] and not pulled["beyond_positions"]  # its probes go as far (frontier_probes)
    host = 64 * GIB
    bounded = predicted_frontier(config, mode, LORA, 80 * GIB, "lean", levers=both, beyond_positions=True,
                                 host_capacity_bytes=host)
    assert bounded["limited_by"] == "host memory" and bounded["tokens"] < beyond["tokens"]
    per_step = offloaded_bytes_per_step(config, mode, LORA, "lean", both)
    assert bounded["tokens"] == host // per_step * TOKEN_GRANULARITY
    # capped at the host's size, the offload leaves the rest on the GPU: memory bounds it again, further out
    capped = predicted_frontier(config, mode, LORA, 80 * GIB, "lean", levers=Levers(True, 4096, 64.0),
                                beyond_positions=True, host_capacity_bytes=host)
    assert capped["limited_by"] == "memory" and bounded["tokens"] < capped["tokens"] < beyond["tokens"]
    assert capped["levers"]["offload_host_gib"] == 64.0


def test_a_shape_s_int8_frontier_counts_the_outliers_its_random_weights_make():
    """Random weights make every column of the MLP's intermediate an LLM.int8 outlier, a copy per layer the
    reference path's int8 matmuls keep: its frontier on a shape is shorter with them; the lean path's int8
    linears keep none, so its frontier is the same. Other families: none assumed."""
    config, int8 = shape_config("Llama-3.1-8B"), get_mode("int8")
    outliers = random_weights_int8_outliers(config)
    assert outliers == {"down_proj": config.intermediate_size}
    assert random_weights_int8_outliers(shape_config("tiny-bloom")) is None
    for path, shorter in (("reference", True), ("lean", False)):
        plain, counted = (predicted_frontier(config, int8, LORA, 48 * GIB, path, int8_outlier_columns=columns)
                          for columns in (None, outliers))
        assert (counted["tokens"] < plain["tokens"]) is shorter and counted["tokens"] <= plain["tokens"]
        assert counted["int8_outlier_columns"] == outliers
