"""One cell across two processes (torchrun, gloo on CPU): rank 0's result with every rank's memory and steps."""

from __future__ import annotations

import dataclasses

import pytest

from tiny import tiny_cell_settings
from qlora_core.cell import CellSettings, failure_result, run_cell
from qlora_core.cell_ranks import merge_ranks
from qlora_core.report import footnotes

#: Largest |mean NLL difference| (nats a token) between an evaluation of a checkpoint cell trained on 2 FSDP ranks
#: and on 1 process, each text. Measured on this 2-core AVX512-BF16 CPU (torch 2.13, one run a mode), after
#: training and merged: 2.6e-5 to 1.0e-4 (bf16), 8.7e-5 to 1.4e-4 (nf4), the training's own rounding (its losses
#: differ by as much); with no step (the same adapters; nf4) equal bit for bit. About 4x the largest, as the losses'
#: tolerance below (tests/test_distributed.py's LOSS_TOLERANCE).
EVAL_TOLERANCE = 5e-4


@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=3, num_processes=2), r"batch_size \(3\) must divide by num_processes \(2\)"),
    (dict(num_processes=0), "num_processes must be >= 1"),
    (dict(num_processes=2, strategy="zero3"), "unknown strategy 'zero3'; choose from ddp, fsdp"),
    (dict(num_processes=2, strategy="fsdp", mode="int8"), "mode 'int8' cannot be trained with fsdp"),
    (dict(num_processes=2, strategy="fsdp", shape="tiny-llama", mode="int8"),
     "mode 'int8' cannot be trained with fsdp"),
])
def test_settings_several_processes_cannot_run_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        CellSettings(mode=overrides.pop("mode", "bf16"), batch_size=overrides.pop("batch_size", 4), **overrides)


@pytest.mark.parametrize("mode", ["bf16", "nf4"])
def test_fsdp_takes_checkpoint_cells_in_the_modes_it_can_shard(mode):
    settings = CellSettings(mode=mode, batch_size=4, num_processes=2, strategy="fsdp")
    assert settings.shape is None and settings.eval_merged


def test_a_failed_or_silent_rank_fails_the_cell():
    settings = CellSettings(mode="bf16", batch_size=2, num_processes=2)
    ok = {"status": "ok", "memory": {}, "training": {"step_seconds": [0.1]}}
    oom = failure_result(settings, "oom", "OutOfMemoryError: CUDA out of memory")
    failed = merge_ranks(settings, {0: ok, 1: oom}, exit_code=1)
    assert failed["status"] == "oom" and failed["error"] == "rank 1: OutOfMemoryError: CUDA out of memory"
    crashed = merge_ranks(settings, {0: ok}, exit_code=-9)
    assert crashed["status"] == "crashed" and "rank(s) [1] wrote no result" in crashed["error"]


def test_two_processes_train_the_one_process_cell(tiny_model_dir, eval_text_file):
    """The same global batches shared by two gloo ranks: the losses of one process within float tolerance (no
    dropout: each rank would draw its own masks), one evaluation (rank 0's), and each rank's memory and step
    times beside it."""
    one = tiny_cell_settings(tiny_model_dir, "bf16", eval_text=str(eval_text_file), eval_merged=False)
    one = dataclasses.replace(one, lora=dataclasses.replace(one.lora, dropout=0.0))
    two = dataclasses.replace(one, num_processes=2)
    single, ranked = run_cell(one), run_cell(two)
    assert ranked["status"] == "ok", ranked.get("error")
    assert ranked["training"]["losses"] == pytest.approx(single["training"]["losses"], abs=5e-4)
    assert set(ranked["perplexity"]) == {"before", "after"}
    assert ranked["perplexity"]["before"] == single["perplexity"]["before"]  # the same base, evaluated once
    assert [rank["rank"] for rank in ranked["ranks"]] == [0, 1]
    for rank in ranked["ranks"]:
        assert rank["memory"]["training_peak"]["kind"] == "cpu_rss"
        assert len(rank["step_seconds"]) == one.train.max_steps
    assert ranked["settings"]["num_processes"] == 2
    assert ranked["floor"]["tokens_per_micro_batch"] == one.seq_len * one.batch_size // 2  # one process's rows
    assert any("trained on 2 processes; peak GiB by process" in note for note in footnotes([ranked]))


def test_two_fsdp_processes_train_the_one_process_shape_cell():
    """A shape cell (the tiny Llama in nf4) across two gloo ranks sharing it by FSDP: the one-process losses within
    the DDP cell's tolerance, the 4-bit weights stored in bf16 as the result's mode records, each rank's memory
    and steps beside it, and the floor of one rank: its shards, which are what rank 0 holds after set-up."""
    one = CellSettings(mode="nf4", shape="tiny-llama", seq_len=32, batch_size=2, timing_warmup=1, device="cpu",
                       lora=dataclasses.replace(tiny_cell_settings("", "nf4").lora, dropout=0.0),
                       train=tiny_cell_settings("", "nf4").train)
    two = dataclasses.replace(one, num_processes=2, strategy="fsdp")
    single, ranked = run_cell(one), run_cell(two)
    assert ranked["status"] == "ok", ranked.get("error")
    assert ranked["training"]["losses"] == pytest.approx(single["training"]["losses"], abs=5e-4)
    assert ranked["settings"]["strategy"] == "fsdp" and ranked["mode"]["quant_storage"] == "bfloat16"
    assert single["mode"]["quant_storage"] != "bfloat16"
    assert [rank["rank"] for rank in ranked["ranks"]] == [0, 1]
    assert ranked["floor"]["sharding"]["num_processes"] == 2 and "sharding" not in single["floor"]
    assert ranked["predicted_vs_measured"]["after_setup"]["ratio"] == 1.0  # its tensors' bytes, on the CPU
    (note,) = [note for note in footnotes([ranked]) if "trained on 2 processes" in note]
    assert "FSDP: each held its shard of every parameter" in note


@pytest.mark.parametrize("mode", ["bf16", "nf4"])
def test_two_fsdp_processes_evaluate_the_one_process_checkpoint_cell(tiny_model_dir, eval_text_file, mode):
    """A checkpoint cell across two gloo ranks sharing it by FSDP (no dropout): its evaluations once in the result,
    rank 0's, each over the one process's windows; before training (the whole base, on rank 0) the one process's
    figures exactly, after training (the shards, every rank in lock-step) and merged (the adapters gathered whole)
    within EVAL_TOLERANCE of them; the weights' quantization error rank 0's, as with one process."""
    one = tiny_cell_settings(tiny_model_dir, mode, eval_text=str(eval_text_file))
    one = dataclasses.replace(one, lora=dataclasses.replace(one.lora, dropout=0.0))
    single, ranked = run_cell(one), run_cell(dataclasses.replace(one, num_processes=2, strategy="fsdp"))
    assert ranked["status"] == "ok", ranked.get("error")
    assert ranked["training"]["losses"] == pytest.approx(single["training"]["losses"], abs=5e-4)
    assert set(ranked["perplexity"]) == {"before", "after", "merged"}
    assert ranked["perplexity"]["before"] == single["perplexity"]["before"]
    for when in ("after", "merged"):
        assert ranked["perplexity"][when].keys() == single["perplexity"][when].keys() == {"heldout", "eval_text"}
        for text, expected in single["perplexity"][when].items():
            figures = ranked["perplexity"][when][text]
            assert figures["n_tokens_scored"] == expected["n_tokens_scored"] > 0
            assert figures["n_windows"] == expected["n_windows"]
            assert figures["mean_nll"] == pytest.approx(expected["mean_nll"], abs=EVAL_TOLERANCE), (when, text)
    assert ranked["quant_error"] == single["quant_error"]
