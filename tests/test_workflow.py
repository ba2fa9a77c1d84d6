"""The fine-tuning workflow (qlora_core/workflow.py) on CPU: a tiny random Llama in INT8 and NF4-DQ, and one run
on the embedded SmolLM2 (``slow``).

Tolerances on logits: the tiny model's logits are below 1 in magnitude, and everything runs under bf16 autocast,
whose step at 0.5-1 is 2**-8 = 0.0039. Measured (Nov 2026, this CPU, 37-token probe, after 4 steps at lr 1e-2):
reloaded vs trained and merged-bf16 vs base-plus-adapter differ by at most one bf16 step at that magnitude
(nf4-dq 0.0039, int8 0.0078), while the adapter itself moves the logits by 0.31-0.36 (Dec 2026: int8 and
nf4-dq, micro-batches padded to the longest row or to 64 tokens). ``LOGITS_ATOL`` = 4 steps
leaves room for another CPU's kernels and still fails when an adapter is lost or merged into the wrong weights.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from qlora_core import workflow, workflow_table
from qlora_core.cli import main
from qlora_core.lora import LoraSettings, merge_into_bf16
from qlora_core.models import load_dequantized, load_model, resolve_model
from qlora_core.modes import BASELINE_MODE, get_mode

CPU = torch.device("cpu")
#: Modes the CPU tests run: LLM.int8 and the 4-bit mode of the tutorial (NF4, double quant, bf16 compute).
WORKFLOW_MODES = ("int8", "nf4-dq")
#: Four steps, a checkpoint every two, a learning rate that moves a rank-4 adapter visibly in that time.
TINY_SETTINGS = workflow.FinetuneSettings(batch_size=2, grad_accum=1, warmup_steps=0, max_steps=4, save_steps=2,
                                          learning_rate=1e-2, max_length=32)
TINY_LORA = LoraSettings(r=4, alpha=8)
LOGITS_ATOL = 4 * 2**-8
#: A fixed probe: 37 byte tokens.
PROBE = torch.arange(3, 40).unsqueeze(0)


def tiny_finetune(source, mode, out: Path, **overrides) -> workflow.FinetuneRun:
    return workflow.finetune(source, mode, out, device=CPU, settings=overrides.pop("settings", TINY_SETTINGS),
                             lora=TINY_LORA, max_new_tokens=8, **overrides)


@torch.no_grad()
def probe_logits(model, mode) -> torch.Tensor:
    """Logits [1, 37, vocab] of the probe, in eval mode under autocast in the mode's compute dtype."""
    model.eval()
    with torch.autocast(CPU.type, dtype=mode.torch_compute_dtype):
        return model(input_ids=PROBE).logits.float()


@pytest.fixture(scope="module", params=WORKFLOW_MODES, ids=lambda name: name)
def mode(request):
    return get_mode(request.param)


@pytest.fixture(scope="module")
def trained(tiny_source, mode, tmp_path_factory):
    """One uninterrupted tiny run per mode: (FinetuneRun, its output folder)."""
    out = tmp_path_factory.mktemp(f"finetune-{mode.name}")
    return tiny_finetune(tiny_source, mode, out), out


# ---- training and checkpoints ----


def test_summary_describes_the_run(trained, mode):
    run, out = trained
    summary = json.loads((out / workflow.SUMMARY_NAME).read_text())
    assert summary["schema"] == workflow.FINETUNE_SCHEMA
    assert summary["mode"] == mode.describe()
    assert summary["model"]["provenance"] == {"source": "random weights", "seed": 0}
    assert [s["step"] for s in summary["training"]["steps"]] == [1, 2, 3, 4]
    assert all(loss > 0 for loss in summary["training"]["losses"])
    assert summary["training"]["wall_s"] > 0
    assert len(summary["training"]["step_seconds"]) == TINY_SETTINGS.max_steps
    assert summary["training"]["step_time"]["rounds"] == TINY_SETTINGS.max_steps - 1  # the first is warm-up
    assert 0 < summary["training"]["step_time"]["median_s"] <= summary["training"]["wall_s"]
    assert summary["memory"]["training_peak"]["kind"] == "cpu_rss"
    assert 0 < summary["parameters"]["trainable_params"] < summary["parameters"]["total_params"]
    assert summary["environment"]["libraries"]["peft"]


def test_checkpoints_hold_the_adapter_and_no_full_weights(trained):
    run, out = trained
    assert run.summary["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    for name in run.summary["checkpoints"]:
        folder = out / name
        names = {path.name for path in folder.iterdir()}
        assert "adapter_model.safetensors" in names and "adapter_config.json" in names
        assert not [n for n in names if n.startswith(("model", "pytorch_model"))], names
        assert workflow.checkpoint_is_complete(folder)
    assert (out / workflow.ADAPTER_DIR_NAME / "adapter_model.safetensors").is_file()


def test_adapter_and_checkpoints_are_readable_as_the_umask_allows(trained):
    """The final adapter was 0700 with 0600 weights (mkdtemp, safetensors), checkpoints' weights 0600."""
    import os
    import stat

    _, out = trained
    mask = os.umask(0)
    os.umask(mask)
    for folder in [out / workflow.ADAPTER_DIR_NAME, *workflow.list_checkpoints(out)]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, folder
        for path in folder.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_step_timer_synchronizes_once_a_step(monkeypatch):
    """Each optimizer step's time is read after the device has finished that step's kernels."""
    from types import SimpleNamespace

    synced = []
    monkeypatch.setattr(workflow, "synchronize", synced.append)
    timer = workflow.StepTimer(CPU)
    timer.on_train_begin(None, SimpleNamespace(), None)
    for _ in range(3):
        timer.on_step_end(None, SimpleNamespace(), None)
    assert synced == [CPU] * 4  # the start, then one per step
    assert len(timer.seconds) == 3 and all(seconds >= 0 for seconds in timer.seconds)
    assert timer.stats()["rounds"] == 2
    assert workflow.StepTimer(CPU).stats() is None


def test_flops_count_the_parameters_once(trained, tmp_path, monkeypatch):
    """The base Trainer walked every module to count parameters for each micro-batch's FLOPs; the count is the
    same, taken once."""
    from transformers import Trainer, TrainingArguments

    run, _ = trained
    trainer = workflow.WorkflowTrainer(model=run.model, args=TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    batch = {"input_ids": PROBE.repeat(2, 1)}
    expected = Trainer.floating_point_ops(trainer, batch)
    counts = []
    count_parameters = type(run.model.base_model.model).num_parameters
    monkeypatch.setattr(type(run.model.base_model.model), "num_parameters",
                        lambda model, **kwargs: counts.append(kwargs) or count_parameters(model, **kwargs))
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [expected] * 3
    assert counts == [{"exclude_embeddings": True}]


def test_training_arguments_do_not_filter_the_loss(mode, tmp_path):
    """The NaN/inf filter read every micro-batch's loss on the host (a device sync each) and hid a non-finite
    loss behind the running mean."""
    assert TINY_SETTINGS.training_arguments(tmp_path, mode, CPU).logging_nan_inf_filter is False


@pytest.mark.parametrize("name, transformers_name", [("adamw", "adamw_torch"), ("adamw_fused", "adamw_torch_fused"),
                                                    ("paged_adamw8bit", "paged_adamw_8bit")])
def test_the_workflow_takes_the_sweeps_optimizer_names(mode, tmp_path, name, transformers_name):
    """One vocabulary: finetune names its optimizer as the sweep does, and hands the Trainer transformers' name."""
    settings = replace(TINY_SETTINGS, optim=name)
    assert settings.training_arguments(tmp_path, mode, CPU).optim == transformers_name
    with pytest.raises(ValueError, match="unknown optimizer 'paged_adamw_8bit'"):
        replace(TINY_SETTINGS, optim="paged_adamw_8bit")


def test_micro_batches_are_padded_to_a_few_lengths_without_changing_the_loss(tiny_source):
    """Padding to a multiple of ``PAD_TO_MULTIPLE_OF`` leaves few distinct lengths (each new one re-plans cuDNN's
    attention on a GPU) and, masked out of attention and labels, the same loss as padding to the longest row."""
    from transformers import DataCollatorForLanguageModeling

    tokenizer = workflow.load_tokenizer(tiny_source)
    rows = workflow.tokenize_rows(tokenizer, ["Two things are infinite:", "the universe and human stupidity."],
                                  max_length=48)
    padded = workflow.training_collator(tokenizer)(rows)
    longest = DataCollatorForLanguageModeling(tokenizer, mlm=False)(rows)
    assert padded["input_ids"].shape[1] == workflow.PAD_TO_MULTIPLE_OF > longest["input_ids"].shape[1]
    assert (padded["labels"][padded["attention_mask"] == 0] == -100).all()
    model = load_model(tiny_source, get_mode(BASELINE_MODE), CPU).float().eval()
    with torch.no_grad():
        losses = [model(**batch).loss for batch in (padded, longest)]
    torch.testing.assert_close(*losses)


def test_callback_removes_full_weights_and_marks_complete(tmp_path):
    from types import SimpleNamespace

    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    full = ["model.safetensors", "pytorch_model-00001-of-00002.bin"]
    for name in [*full, "adapter_model.safetensors", workflow.TRAINER_STATE]:
        (folder / name).write_bytes(b"x" * 10)
    callback = workflow.AdapterOnlyCheckpointCallback()
    state = SimpleNamespace(global_step=7, is_world_process_zero=True)
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, control=None)
    assert sorted(callback.removed) == [f"checkpoint-7/{name}" for name in full]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["adapter_model.safetensors", workflow.TRAINER_STATE, workflow.COMPLETE_MARKER])
    assert workflow.checkpoint_is_complete(folder)


def _truncate_adapter(folder: Path) -> None:
    adapter = folder / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])


@pytest.mark.parametrize("damage", [
    lambda folder: (folder / workflow.COMPLETE_MARKER).unlink(),  # killed before the marker was written
    _truncate_adapter,  # overwritten in part after it was marked
    lambda folder: (folder / workflow.TRAINER_STATE).unlink(),  # no state to resume the schedule from
    lambda folder: (folder / workflow.COMPLETE_MARKER).write_text("{"),  # marker itself cut short
], ids=["no-marker", "truncated-adapter", "no-trainer-state", "torn-marker"])
def test_incomplete_checkpoint_is_not_taken_for_one(trained, tmp_path, damage):
    _, out = trained
    for step in (2, 4):
        shutil.copytree(out / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    damage(tmp_path / "checkpoint-4")
    assert not workflow.checkpoint_is_complete(tmp_path / "checkpoint-4")
    assert workflow.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert workflow.discard_incomplete_checkpoints(tmp_path) == ["checkpoint-4"]


def test_marker_of_another_step_does_not_count(trained, tmp_path):
    _, out = trained
    shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-6")
    assert not workflow.checkpoint_is_complete(tmp_path / "checkpoint-6")


class StopAfter(TrainerCallback):
    """Ends training after ``step`` optimizer steps, as an interruption would (after that step's save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_continues_from_last_complete_checkpoint(tiny_source, mode, trained, tmp_path):
    """Interrupted after step 2, with a half-written checkpoint-3 left behind: the resumed run ignores (and
    deletes) it, continues from checkpoint-2 and ends with the uninterrupted run's losses."""
    reference, _ = trained
    tiny_finetune(tiny_source, mode, tmp_path, callbacks=[StopAfter(2)])
    assert workflow.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / workflow.COMPLETE_MARKER).unlink()

    resumed = tiny_finetune(tiny_source, mode, tmp_path, resume=True)
    assert resumed.summary["training"]["resumed_from"] == "checkpoint-2"
    assert resumed.summary["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "checkpoint-3").exists()
    # Steps 1-2 come from the restored trainer state, 3-4 from the resumed run (data order and dropout RNG restored).
    torch.testing.assert_close(resumed.summary["training"]["losses"], reference.summary["training"]["losses"],
                               rtol=1e-5, atol=1e-6)


def test_finetune_refuses_to_overwrite_checkpoints(tiny_source, mode, trained):
    _, out = trained
    with pytest.raises(ValueError, match="already holds checkpoints"):
        tiny_finetune(tiny_source, mode, out)


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (ns)."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_resume_of_a_finished_run_changes_nothing(tiny_source, tiny_model_dir, mode, trained, tmp_path, capsys):
    """Resuming a run that reached --max-steps trained past it, wrote checkpoint-5 and replaced the adapter."""
    _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = folder_state(run)
    with pytest.raises(workflow.RunAlreadyFinished) as finished:
        tiny_finetune(tiny_source, mode, run, resume=True)
    assert finished.value.step == TINY_SETTINGS.max_steps
    assert main(["finetune", "--mode", mode.name, "--model", str(tiny_model_dir), "--device", "cpu", "--out",
                 str(run), "--resume", "--max-steps", str(TINY_SETTINGS.max_steps)]) == 0
    assert capsys.readouterr().out == f"{run}: already finished at step {TINY_SETTINGS.max_steps}; nothing changed\n"
    assert folder_state(run) == before


def test_resume_past_the_last_step_without_a_summary_is_refused(tiny_source, mode, trained, tmp_path):
    """The run stopped after its last checkpoint, before the final adapter and summary: training again would
    go past max_steps."""
    _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / workflow.SUMMARY_NAME).unlink()
    before = folder_state(run)
    with pytest.raises(ValueError, match=f"checkpoint-4 already reaches max_steps {TINY_SETTINGS.max_steps}"):
        tiny_finetune(tiny_source, mode, run, resume=True)
    assert folder_state(run) == before


def test_rows_of_one_token_are_refused_before_any_model_load(tmp_path, capsys):
    """--max-length 1 trained nothing (loss 0, grad-norm 0) and exited 0."""
    out = tmp_path / "ft"
    assert main(["finetune", "--mode", "nf4-dq", "--model", str(tmp_path / "no-model"), "--out", str(out),
                 "--max-length", "1"]) == 2
    assert capsys.readouterr().err == ("qlora-bench: error: max_length must be >= 2 (a row of one token has nothing "
                                       "to predict and trains nothing), got 1\n")  # not the missing model
    assert not out.exists()
    assert workflow.FinetuneSettings(max_length=2).max_length == 2


@pytest.mark.parametrize("profile_steps", [-1, 3])
def test_profiling_every_step_or_fewer_than_none_is_refused(profile_steps):
    """Profiled steps are left out of the step-time statistics: at least one step must stay unprofiled."""
    with pytest.raises(ValueError, match="profile_steps must be >= 0 and leave a step unprofiled"):
        workflow.FinetuneSettings(max_steps=3, profile_steps=profile_steps)


# ---- reload, generate, merge ----


def test_reload_reproduces_trained_outputs(tiny_source, mode, trained):
    run, out = trained
    expected = probe_logits(run.model, mode)
    base = probe_logits(load_model(tiny_source, mode, CPU), mode)
    assert (expected - base).abs().max() > 10 * LOGITS_ATOL, "the adapter barely moved the outputs: test is void"
    for adapter in (out / workflow.ADAPTER_DIR_NAME, out / "checkpoint-4"):
        reloaded = workflow.load_for_inference(tiny_source, mode, adapter, CPU)
        torch.testing.assert_close(probe_logits(reloaded, mode), expected, rtol=0, atol=LOGITS_ATOL)


def test_generation_is_the_greedy_continuation(tiny_source, mode, trained):
    """``generate`` returns the new text only: at each position the argmax token of the model's logits, until
    ``max_new_tokens`` or eos, under autocast in the mode's compute dtype; the model's train/eval mode is kept."""
    run, out = trained
    tokenizer = workflow.load_tokenizer(tiny_source)
    model = workflow.load_for_inference(tiny_source, mode, out / "checkpoint-4", CPU)
    # no KV cache: generate then computes each step over the whole sequence exactly as the loop below does,
    # so the two argmaxes cannot differ by rounding
    model.generation_config.use_cache = False
    ids = tokenizer(workflow.TUTORIAL_PROMPT, return_tensors="pt")["input_ids"]
    new: list[int] = []
    with torch.no_grad(), torch.autocast(CPU.type, dtype=mode.torch_compute_dtype):
        for _ in range(8):
            sequence = torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)
            new.append(int(model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0, -1].argmax()))
            if new[-1] == model.generation_config.eos_token_id:
                break
    model.train()
    completion = workflow.generate(model, tokenizer, workflow.TUTORIAL_PROMPT, max_new_tokens=8,
                                   compute_dtype=mode.torch_compute_dtype)
    assert completion == tokenizer.decode(new, skip_special_tokens=True)
    assert model.training
    # the summary's sample is the trained model's own continuation of the tutorial's prompt
    assert run.summary["sample"]["prompt"] == workflow.TUTORIAL_PROMPT
    assert run.summary["sample"]["completion"] == workflow.generate(
        run.model, tokenizer, workflow.TUTORIAL_PROMPT, max_new_tokens=8, compute_dtype=mode.torch_compute_dtype)


def test_merged_bf16_outputs_match_unmerged(tiny_source, mode, trained, tmp_path):
    _, out = trained
    adapter = out / workflow.ADAPTER_DIR_NAME
    merged_dir = workflow.merge_to_bf16(tiny_source, mode, adapter, tmp_path / "merged", device=CPU)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "a staging folder was left behind"
    assert not (merged_dir / "adapter_config.json").exists()
    merged_source = resolve_model(str(merged_dir))
    assert merged_source.provenance["merged"]["mode"] == mode.describe()
    merged = load_model(merged_source, get_mode(BASELINE_MODE), CPU)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    unmerged = probe_logits(workflow.load_for_inference(tiny_source, mode, adapter, CPU), mode)
    torch.testing.assert_close(probe_logits(merged, mode), unmerged, rtol=0, atol=LOGITS_ATOL)


def test_merge_report_flags_the_quantized_merge_lossy(tiny_source, mode, trained, tmp_path):
    _, out = trained
    report = workflow.merge_and_report(tiny_source, mode, out / workflow.ADAPTER_DIR_NAME, tmp_path / "merged",
                                       device=CPU, check_tokens=256, window=64, stride=32, into_quantized=True)
    assert report["tolerance"]["within"], report["merged"]["relative_delta"]
    assert report["merged_into_quantized"]["lossy"] is True
    assert report["merged_into_quantized"]["relative_delta"] >= 0
    assert json.loads((tmp_path / "merged" / workflow.MERGE_REPORT_NAME).read_text())["schema"] == workflow.MERGE_SCHEMA


def test_merge_into_original_weights(tiny_source, mode, trained, tmp_path):
    _, out = trained
    merged_dir = workflow.merge_to_bf16(tiny_source, mode, out / workflow.ADAPTER_DIR_NAME, tmp_path / "merged",
                                        device=CPU, base="original")
    assert resolve_model(str(merged_dir)).provenance["merged"]["base"] == "original"


def test_one_merge_for_a_trained_model_and_its_saved_adapter(tiny_source, mode, trained):
    """A cell merges its trained PeftModel, the merge command a saved adapter: one merge, the same weights."""
    run, out = trained
    from_model = merge_into_bf16(tiny_source, mode, run.model, CPU).state_dict()
    from_folder = merge_into_bf16(tiny_source, mode, out / workflow.ADAPTER_DIR_NAME, CPU).state_dict()
    assert from_model.keys() == from_folder.keys()
    for name, weight in from_model.items():
        assert torch.equal(weight, from_folder[name]), name


def test_unknown_merge_base_is_refused(tiny_source, mode, trained, tmp_path):
    _, out = trained
    with pytest.raises(ValueError, match="unknown merge base"):
        workflow.merge_to_bf16(tiny_source, mode, out / workflow.ADAPTER_DIR_NAME, tmp_path / "m", device=CPU,
                               base="fp32")


def test_lean_path_trains_the_same_loss_and_divides_by_the_steps_tokens(tiny_source, mode, tmp_path):
    """``--path lean``: the first step's loss is the reference path's (the same rows and adapters; the lean path
    under bf16 autocast), and two micro-batches of one row give the loss of one micro-batch of both (the sum
    over the step's scored tokens, as transformers divides the model's own loss)."""
    lean = replace(TINY_SETTINGS, path="lean", max_steps=2, save_steps=1)
    one_batch = tiny_finetune(tiny_source, mode, tmp_path / "lean", settings=lean).summary
    two_micro = tiny_finetune(tiny_source, mode, tmp_path / "lean-accum",
                              settings=replace(lean, batch_size=1, grad_accum=2)).summary
    reference = tiny_finetune(tiny_source, mode, tmp_path / "reference",
                              settings=replace(TINY_SETTINGS, max_steps=2, save_steps=1)).summary
    assert one_batch["settings"]["path"] == "lean" and one_batch["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    first = [summary["training"]["steps"][0] for summary in (one_batch, two_micro, reference)]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=1e-2)
    assert first[1]["grad_norm"] == pytest.approx(first[0]["grad_norm"], rel=5e-2)
    assert first[0]["loss"] == pytest.approx(first[2]["loss"], rel=2e-2)


def test_the_workflow_s_int8_linears_can_compute_dequantized_on_the_lean_path(tiny_source, tmp_path):
    """``--int8-matmul dequantized``: on a CPU bitsandbytes trains int8 linears with the weight dequantized
    already, so the workflow's losses are the lean path's own, bit for bit, and the summary records the choice."""
    lean = replace(TINY_SETTINGS, path="lean", max_steps=2, save_steps=1)
    int8 = get_mode("int8")
    plain = tiny_finetune(tiny_source, int8, tmp_path / "plain", settings=lean).summary
    dequantized = tiny_finetune(tiny_source, int8, tmp_path / "dequantized",
                                settings=replace(lean, int8_matmul="dequantized")).summary
    assert dequantized["settings"]["int8_matmul"] == "dequantized" and plain["settings"]["int8_matmul"] == "llm-int8"
    assert [step["loss"] for step in dequantized["training"]["steps"]] == [
        step["loss"] for step in plain["training"]["steps"]]


def test_the_dequantized_int8_matmul_is_refused_off_the_lean_path_or_the_int8_mode(tiny_source, tmp_path):
    with pytest.raises(ValueError, match="lean path's"):
        workflow.FinetuneSettings(int8_matmul="dequantized")
    lean = workflow.FinetuneSettings(path="lean", int8_matmul="dequantized")
    with pytest.raises(ValueError, match="mode 'nf4-dq' has none"):
        tiny_finetune(tiny_source, get_mode("nf4-dq"), tmp_path / "nf4-dq", settings=lean)
    assert not (tmp_path / "nf4-dq").exists()


# ---- command line ----


def test_cli_runs_the_workflow(tiny_model_dir, tiny_source, tmp_path, capsys):
    """finetune, generate and merge as commands, with BLOOM-style explicit target modules."""
    mode = get_mode(WORKFLOW_MODES[-1])
    common = ["--mode", mode.name, "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(["finetune", *common, "--out", str(tmp_path / "ft"), "--max-steps", "2", "--save-steps", "1",
                 "--grad-accum", "1", "--max-length", "32", "--lora-r", "4", "--target-modules", "q_proj,v_proj",
                 "--max-new-tokens", "4", "--profile-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and workflow.TUTORIAL_PROMPT in printed
    summary = json.loads((tmp_path / "ft" / workflow.SUMMARY_NAME).read_text())
    assert summary["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert summary["settings"] == replace(workflow.FinetuneSettings(), max_steps=2, save_steps=1, grad_accum=1,
                                          max_length=32, profile_steps=1).describe()
    # the last step ran under the profiler, and the step-time statistics leave it out
    training = summary["training"]
    assert training["profile"]["calls"] == 1 and training["profile"]["top_host_ops"]
    assert len(training["step_seconds"]) == 2 and training["step_time"]["rounds"] == 1
    assert training["step_time"]["median_s"] == training["step_seconds"][0]
    assert main(["generate", *common, "--adapter", str(tmp_path / "ft" / "checkpoint-2"), "--prompt", "Hi",
                 "--max-new-tokens", "4"]) == 0
    expected = workflow.generate_from_adapter(tiny_source, mode, tmp_path / "ft" / "checkpoint-2", device=CPU,
                                              prompt="Hi", max_new_tokens=4)
    assert capsys.readouterr().out == f"Hi{expected}\n"  # the prompt, then that adapter's 4-token continuation
    assert main(["merge", *common, "--adapter", str(tmp_path / "ft" / "adapter"), "--out", str(tmp_path / "merged"),
                 "--check-tokens", "128"]) == 0
    # the merge changed exactly the adapted projections of the weights the adapter was trained on
    merged = load_model(resolve_model(str(tmp_path / "merged")), get_mode(BASELINE_MODE), CPU).state_dict()
    base = load_dequantized(tiny_source, mode, CPU).state_dict()
    assert merged.keys() == base.keys()
    changed = {name.rsplit(".", 2)[-2] for name in base if not torch.equal(merged[name], base[name])}
    assert changed == {"q_proj", "v_proj"}
    capsys.readouterr()
    # the report finds the summary and the merge report in the folder and renders them side by side
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert "0 cells, 1 finetune summary and 1 merge report from 2 files" in capsys.readouterr().out
    row = pd.read_csv(tmp_path / "report" / "workflow.csv").iloc[0]
    check = json.loads((tmp_path / "merged" / workflow.MERGE_REPORT_NAME).read_text())
    assert (row["mode"], row["steps"]) == (mode.name, 2)
    assert row["step_s"] == pytest.approx(summary["training"]["step_time"]["median_s"])
    assert row["ppl_merged"] == pytest.approx(check["merged"]["perplexity"]["perplexity"])
    assert abs(row["merge_delta"]) == pytest.approx(check["merged"]["relative_delta"])
    assert "## Classic workflow" in (tmp_path / "report" / "report.md").read_text()
    assert (row["rows_by_micro_batches"], row["path"], row["checkpointing"]) == ("2 x 1", "reference", "yes")
    assert row["torch_threads"] == summary["environment"]["torch_threads"]
    # a variant of the same run differs in its set-up columns, and one sample is noted once
    variant = copy.deepcopy(summary) | {"path": "variant/summary.json"}
    variant["settings"] |= {"batch_size": 8, "gradient_checkpointing": False, "path": "lean"}
    frame = workflow_table.workflow_frame([summary | {"path": "ft/summary.json"}, variant], [])
    assert sorted(zip(frame["rows_by_micro_batches"], frame["path"], frame["checkpointing"])) == [
        ("2 x 1", "reference", "yes"), ("8 x 1", "lean", "no")]
    assert sum(note.startswith(f"{mode.name} sample:") for note in workflow_table.notes(frame)) == 1


# ---- the embedded model ----


@pytest.mark.slow
def test_whole_workflow_on_smollm2(tmp_path):
    """Fine-tune SmolLM2-135M in NF4-DQ for two short steps, reload from a checkpoint, generate, merge to bf16
    and check the merge; about a minute on one CPU thread."""
    source, mode = resolve_model(None), get_mode("nf4-dq")
    settings = replace(workflow.FinetuneSettings(), max_steps=2, save_steps=1, grad_accum=1, warmup_steps=0,
                       max_length=32)
    run = workflow.finetune(source, mode, tmp_path / "ft", device=CPU, settings=settings, max_new_tokens=8)
    assert run.summary["checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert run.summary["model"]["provenance"]["name"] == "SmolLM2-135M-Instruct"
    del run
    # the final adapter is the last checkpoint's: the same greedy text from either
    from_checkpoint = workflow.generate_from_adapter(source, mode, tmp_path / "ft" / "checkpoint-2", device=CPU,
                                                     max_new_tokens=8)
    assert from_checkpoint == workflow.generate_from_adapter(source, mode, tmp_path / "ft" / "adapter", device=CPU,
                                                             max_new_tokens=8)
    report = workflow.merge_and_report(source, mode, tmp_path / "ft" / "adapter", tmp_path / "merged", device=CPU,
                                       check_tokens=256, window=64, stride=32, into_quantized=True)
    assert report["tolerance"]["within"], report["merged"]["relative_delta"]
    assert report["merged_into_quantized"]["lossy"] is True



@pytest.mark.parametrize("path, scope", [("reference", "step"), ("lean", "step"), ("lean", "layers")])
def test_the_compiled_step_trains_as_the_eager_one(tiny_source, tmp_path, monkeypatch, path, scope):
    """``finetune --compile`` (and ``--compile-scope``): the same losses as the eager step within the compiled
    cell's tolerance (tests/test_compiled.py), what torch.compile made of the step in the summary, and the sample
    decoded without compiling anything (layers compiled in place would). nf4-dq, no dropout (inductor's dropout
    draws other masks); a few minutes on one CPU thread."""
    import pandas as pd
    from test_compiled import LOSS_TOLERANCE
    from torch._dynamo.utils import counters

    graphs_while_decoding = []

    def counting_generate(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        completion = generate(*args, **kwargs)
        graphs_while_decoding.append(counters["stats"]["unique_graphs"] - before)
        return completion

    generate = workflow.generate
    monkeypatch.setattr(workflow, "generate", counting_generate)

    mode = get_mode("nf4-dq")
    settings = replace(TINY_SETTINGS, path=path, max_steps=3, save_steps=3)
    eager_lora = replace(TINY_LORA, dropout=0.0)
    eager = workflow.finetune(tiny_source, mode, tmp_path / "eager", device=CPU, settings=settings,
                              lora=eager_lora, max_new_tokens=2).summary
    compiled = workflow.finetune(tiny_source, mode, tmp_path / "compiled", device=CPU,
                                 settings=replace(settings, compile=True, compile_scope=scope), lora=eager_lora,
                                 max_new_tokens=2).summary
    assert compiled["training"]["losses"] == pytest.approx(eager["training"]["losses"], abs=LOSS_TOLERANCE)
    report = compiled["training"]["compile"]
    assert eager["training"]["compile"] is None and report["unique_graphs"] >= 1
    assert graphs_while_decoding == [0, 0]  # the eager run's sample, then the compiled run's
    assert report["first_step_s"] == compiled["training"]["step_seconds"][0]
    assert isinstance(report["graph_breaks"], dict) and compiled["settings"]["compile"] is True
    frame = workflow_table.workflow_frame([eager | {"path": "eager"}, compiled | {"path": "compiled"}], [])
    first_step = dict(zip(frame["summary"], frame["compile_first_step_s"]))
    assert first_step["compiled"] == report["first_step_s"] and pd.isna(first_step["eager"])


def test_a_compile_mode_needs_compile():
    with pytest.raises(ValueError, match="needs compile"):
        replace(TINY_SETTINGS, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="unknown compile mode"):
        replace(TINY_SETTINGS, compile=True, compile_mode="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["reference", "lean"])
def test_the_step_replayed_as_cuda_graphs_trains_as_the_eager_one(tiny_source, tmp_path, path):
    """``finetune --compile --compile-mode reduce-overhead`` on CUDA: each padded length's step captured and
    replayed as CUDA graphs, the same losses as the eager step within the compiled cell's tolerance."""
    from test_compiled import LOSS_TOLERANCE

    cuda, mode = torch.device("cuda"), get_mode("nf4-dq")
    settings = replace(TINY_SETTINGS, path=path, max_steps=3, save_steps=3)
    lora = replace(TINY_LORA, dropout=0.0)
    eager = workflow.finetune(tiny_source, mode, tmp_path / "eager", device=cuda, settings=settings, lora=lora,
                              max_new_tokens=2).summary
    graphs = workflow.finetune(tiny_source, mode, tmp_path / "graphs", device=cuda, lora=lora, max_new_tokens=2,
                               settings=replace(settings, compile=True, compile_mode="reduce-overhead")).summary
    assert graphs["training"]["losses"] == pytest.approx(eager["training"]["losses"], abs=LOSS_TOLERANCE)
    assert graphs["settings"]["compile_mode"] == "reduce-overhead"
