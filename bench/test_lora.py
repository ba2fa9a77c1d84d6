"""The three suites of a cell, in the order they run for each (model, mode):

- memory: a separate process loads the model (timed), sets up LoRA and takes a few steps; weights as stored
  and the allocator's view after load, after set-up and at the training peak go into extra_info, beside the
  analytic floor's prediction of each and the unexplained remainder (printed too: run with -s to see it).
- step time: training steps timed one by one (the worker synchronizes CUDA inside each step, and the round
  trip is timed here); tokens/s and model FLOPs utilisation in extra_info.
- perplexity: before fine-tuning, after the timed steps, and after merging into a dequantized bf16 base, with
  the protocol beside each number; the cell's full result goes into extra_info["cell"]. A shape (random
  weights: memory and time only) skips it, and its full result goes with the step time instead.
"""

from __future__ import annotations

import pytest

from qlora_core.measure.floor import summary_lines
from qlora_core.shapes import RANDOM_WEIGHTS_NOTE


def _describe(benchmark, cell, group: str) -> None:
    benchmark.group = group
    benchmark.extra_info["mode"] = cell.settings.mode
    benchmark.extra_info["settings"] = cell.settings.describe()


def test_memory(benchmark, memory_cell):
    _describe(benchmark, memory_cell, "memory: load and quantize (s)")
    weights = benchmark.pedantic(memory_cell.attempt, args=("load",), rounds=1, iterations=1)
    memory_cell.check(benchmark)
    memory_cell.call("setup_training")
    memory_cell.train_to_end()
    result = memory_cell.call("result")
    benchmark.extra_info.update(
        weights=weights, memory=result["memory"], parameters=result["parameters"], mode_description=result["mode"],
        floor=result["floor"], predicted_vs_measured=result["predicted_vs_measured"], note=result["note"],
    )
    if result["floor"]:
        print(f"\n{memory_cell.path.stem}:", *summary_lines(result["floor"], result["predicted_vs_measured"]),
              sep="\n")


def test_step_time(benchmark, bench_cell, request):
    _describe(benchmark, bench_cell, "step time (s)")
    option = request.config.option
    benchmark.pedantic(bench_cell.step, rounds=option.bench_steps, warmup_rounds=option.bench_warmup, iterations=1)
    bench_cell.check(benchmark)
    bench_cell.call("end_training")
    result = bench_cell.call("result")
    training = result["training"]
    if bench_cell.settings.shape:  # no perplexity test for a shape: the full result goes here
        benchmark.extra_info.update(cell=result, note=RANDOM_WEIGHTS_NOTE)
    benchmark.extra_info.update(
        tokens_per_step=training["tokens_per_step"],
        tokens_per_s=training["tokens_per_s"],
        mfu=training["mfu"],
        worker_timing=training["timing"],
        noisy=training["timing"]["noisy"],
        losses=training["losses"],
    )


def test_perplexity(benchmark, bench_cell):
    if bench_cell.settings.shape:
        pytest.skip(f"{bench_cell.settings.shape}: {RANDOM_WEIGHTS_NOTE}")
    _describe(benchmark, bench_cell, "perplexity: evaluation pass (s)")
    if bench_cell.steps_taken < bench_cell.settings.train.max_steps:
        bench_cell.train_to_end()
    benchmark.pedantic(bench_cell.attempt, args=("evaluate", "after"), rounds=1, iterations=1)
    bench_cell.check(benchmark)
    if bench_cell.settings.eval_merged:
        bench_cell.call("evaluate_merged")
    result = bench_cell.call("result")
    benchmark.extra_info.update(perplexity=result["perplexity"], cell=result)
