"""The three suites of a cell. All three run in the cell's one process (a fresh one per cell), in separate
windows: the allocator's peak counters are reset after LoRA set-up (cache emptied first), so the training peak
is that of the training steps alone, and nothing reads or records memory while steps are timed. In the order
they run for each (model, mode):

- memory: the load (quantization included) is timed; weights as stored and the allocator's readings after
  load and after set-up go into extra_info. The training peak, the analytic floor's prediction of each point
  and the unexplained remainder are in the cell's full result (printed for a shape: run with -s to see it).
- step time: training steps timed one by one (the worker synchronizes CUDA inside each step, and the round
  trip is timed here); tokens/s and model FLOPs utilisation in extra_info. With --bench-profile-steps, more
  steps under the profiler after them, undone before the evaluation.
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


def test_memory(benchmark, bench_cell):
    _describe(benchmark, bench_cell, "memory: load and quantize (s)")
    weights = benchmark.pedantic(bench_cell.attempt, args=("load",), rounds=1, iterations=1)
    bench_cell.check(benchmark)
    bench_cell.prepare()  # evaluation before training, LoRA set-up
    benchmark.extra_info.update(weights=weights, memory_readings=bench_cell.call("memory_readings"))


def test_step_time(benchmark, bench_cell):
    _describe(benchmark, bench_cell, "step time (s)")
    bench_cell.prepare()
    warmup = bench_cell.settings.timing_warmup
    benchmark.pedantic(bench_cell.step, rounds=bench_cell.settings.train.max_steps - warmup, warmup_rounds=warmup,
                       iterations=1)
    bench_cell.check(benchmark)
    bench_cell.end_training()
    if bench_cell.settings.profile_steps:
        bench_cell.call("profile", bench_cell.settings.profile_steps)
    result = bench_cell.call("result")
    training = result["training"]
    if bench_cell.settings.shape:  # no perplexity test for a shape: the full result goes here
        benchmark.extra_info.update(cell=result, note=RANDOM_WEIGHTS_NOTE)
        if result["floor"]:
            print(f"\n{bench_cell.path.stem}:", *summary_lines(result["floor"], result["predicted_vs_measured"]),
                  sep="\n")
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
