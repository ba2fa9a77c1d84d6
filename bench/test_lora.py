"""The three suites of a cell, in the order they run for each (model, mode):

- memory: a separate process loads the model (timed), sets up LoRA and takes a few steps; weights as stored
  and the allocator's view after load, after set-up and at the training peak go into extra_info.
- step time: training steps timed one by one (the worker synchronizes CUDA inside each step, and the round
  trip is timed here); tokens/s and model FLOPs utilisation in extra_info.
- perplexity: before fine-tuning, after the timed steps, and after merging into a dequantized bf16 base, with
  the protocol beside each number; the cell's full result goes into extra_info["cell"].
"""

from __future__ import annotations


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
        weights=weights, memory=result["memory"], parameters=result["parameters"], mode_description=result["mode"]
    )


def test_step_time(benchmark, bench_cell, request):
    _describe(benchmark, bench_cell, "step time (s)")
    option = request.config.option
    benchmark.pedantic(bench_cell.step, rounds=option.bench_steps, warmup_rounds=option.bench_warmup, iterations=1)
    bench_cell.check(benchmark)
    bench_cell.call("end_training")
    training = bench_cell.call("result")["training"]
    benchmark.extra_info.update(
        tokens_per_step=training["tokens_per_step"],
        tokens_per_s=training["tokens_per_s"],
        mfu=training["mfu"],
        worker_timing=training["timing"],
        noisy=training["timing"]["noisy"],
        losses=training["losses"],
    )


def test_perplexity(benchmark, bench_cell):
    _describe(benchmark, bench_cell, "perplexity: evaluation pass (s)")
    if bench_cell.steps_taken < bench_cell.settings.train.max_steps:
        bench_cell.train_to_end()
    benchmark.pedantic(bench_cell.attempt, args=("evaluate", "after"), rounds=1, iterations=1)
    bench_cell.check(benchmark)
    if bench_cell.settings.eval_merged:
        bench_cell.call("evaluate_merged")
    result = bench_cell.call("result")
    benchmark.extra_info.update(perplexity=result["perplexity"], cell=result)
