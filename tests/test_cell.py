"""One cell (a model in a mode, loaded, evaluated, fine-tuned, evaluated again) and its self-describing result."""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import math
import platform

import pytest
import torch

from tiny import CELL_MODES, TINY_CELL, TINY_STEPS, tiny_cell_settings
from qlora_core.cell import Cell, CellSettings, NonFiniteError, preflight, prepare_inputs, resolve_device, run_cell
from qlora_core.data import DatasetError
from qlora_core.measure.perplexity import windows
from qlora_core.backends import ModeUnavailableError
from qlora_core.modes import get_mode, parse_modes
from qlora_core.results import SCHEMA
from qlora_core.shapes import shape_config
from qlora_core.trainer import TrainSettings

EVALUATIONS = ("before", "after")


@pytest.fixture(params=CELL_MODES)
def run(request, cell_runs):
    """(mode name, result, progress events) of one mode's session run."""
    result, events = cell_runs[request.param]
    return request.param, result, events


def test_status_schema_and_mode(run):
    mode, result, _ = run
    assert result["status"] == "ok"
    assert result["schema"] == SCHEMA
    assert result["mode"] == get_mode(mode).describe()
    assert result["device"] == "cpu"
    json.dumps(result, allow_nan=False)  # plain JSON, every figure finite


def test_settings_are_saved_verbatim(run, tiny_model_dir, eval_text_file):
    mode, result, _ = run
    settings = tiny_cell_settings(tiny_model_dir, mode, eval_text=str(eval_text_file))
    assert result["settings"] == settings.describe()
    assert CellSettings.from_dict(result["settings"]) == settings


def test_model_description(run, tiny_model_dir):
    _, result, _ = run
    model = result["model"]
    assert model["name_or_path"] == str(tiny_model_dir)
    assert model["label"] == tiny_model_dir.name
    assert model["provenance"] == {"source": "random weights", "seed": 0}
    assert model["model_type"] == "llama"


def test_environment_records_versions(run):
    _, result, _ = run
    env = result["environment"]
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        assert env["libraries"][package] == importlib.metadata.version(package)
    assert env["python"] == platform.python_version()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["gpu"] is None  # CPU run
    assert env["timestamp"]


def test_losses_and_timing(run):
    _, result, _ = run
    training = result["training"]
    assert len(training["losses"]) == len(training["step_seconds"]) == TINY_STEPS
    assert all(math.isfinite(loss) and loss > 0 for loss in training["losses"])
    assert training["timing"]["rounds"] == TINY_STEPS - TINY_CELL["timing_warmup"]
    assert training["tokens_per_step"] == TINY_CELL["batch_size"] * TINY_CELL["seq_len"]
    assert training["tokens_per_s"] == pytest.approx(training["tokens_per_step"] / training["timing"]["median_s"])
    assert training["peak_flops"] is None and training["mfu"] is None and training["hfu"] is None  # no CPU peak
    assert training["device_states"] is None  # no GPU clock to read on a CPU
    assert training["step_cuda_mallocs"] is None  # nor a CUDA allocator
    assert training["hardware_flops_per_token"] > training["flops_per_token"]  # checkpointing recomputes


def test_perplexity_before_and_after_with_protocol(run):
    _, result, _ = run
    n_tokens = TINY_CELL["eval_max_tokens"]
    expected_windows = len(windows(n_tokens, TINY_CELL["eval_window"], TINY_CELL["eval_stride"]))
    for when in EVALUATIONS:
        assert set(result["perplexity"][when]) == {"heldout", "eval_text"}
        for entry in result["perplexity"][when].values():
            assert entry["window"] == TINY_CELL["eval_window"] and entry["stride"] == TINY_CELL["eval_stride"]
            assert entry["n_tokens_scored"] == n_tokens - 1
            assert entry["n_windows"] == expected_windows
            assert math.isfinite(entry["perplexity"])
            assert entry["perplexity"] == pytest.approx(math.exp(entry["mean_nll"]))
    # three steps at lr 1e-2 teach a random model the quotes' byte statistics: held-out perplexity falls
    assert result["perplexity"]["after"]["heldout"]["perplexity"] < result["perplexity"]["before"]["heldout"]["perplexity"]


def test_memory_is_labelled_cpu_rss(run):
    _, result, _ = run
    assert set(result["memory"]) >= {"after_load", "after_setup", "training_peak"}
    for snapshot in result["memory"].values():
        assert snapshot["kind"] == "cpu_rss"
        assert snapshot["peak_rss_bytes"] >= snapshot["rss_bytes"] * 0.99 > 0


def test_weights_parameters_and_quant_error(run):
    mode, result, _ = run
    quantized = get_mode(mode).is_quantized
    assert (result["weights"]["bits_per_quantized_param"] is not None) is quantized
    assert 0 < result["parameters"]["trainable_params"] < result["parameters"]["total_params"]
    error = result["quant_error"]["relative_l2"]
    assert error < 2**-9 if not quantized else 0.05 < error < 0.15


def test_progress_events(run):
    _, result, events = run
    phases = [e["phase"] for e in events if "phase" in e]
    assert phases[0] == "data"
    for earlier, later in [("loading", "evaluating before"), ("evaluating before", "setting up LoRA"),
                           ("setting up LoRA", "evaluating after")]:
        assert phases.index(earlier) < phases.index(later)
    steps = [e for e in events if "step" in e]
    assert [e["step"] for e in steps] == list(range(1, TINY_STEPS + 1))
    assert all(e["of"] == TINY_STEPS for e in steps)
    assert [e["loss"] for e in steps] == result["training"]["losses"]


def test_modes_share_data_and_protocol(cell_results):
    """Modes differ only in weight storage: the same first batch, the same scored tokens."""
    results = list(cell_results.values())
    firsts = [r["training"]["losses"][0] for r in results]
    assert max(firsts) - min(firsts) < 0.05  # same random model and batch: first losses agree to quantization noise
    scored = {r["perplexity"]["before"]["heldout"]["n_tokens_scored"] for r in results}
    assert len(scored) == 1


def test_settings_round_trip_with_tuple_targets():
    from qlora_core.lora import LoraSettings

    settings = CellSettings(mode="nf4", lora=LoraSettings(target_modules=("q_proj", "v_proj")))
    assert CellSettings.from_dict(json.loads(json.dumps(settings.describe()))) == settings


# --- inputs are checked before any weights load -------------------------------------------------------------------


def test_prepare_inputs(tiny_model_dir):
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    inputs = prepare_inputs(settings)
    assert inputs.train_blocks.shape[1] == settings.seq_len
    assert inputs.train_blocks.shape[0] >= settings.batch_size
    assert set(inputs.token_sets) == {"heldout"}
    assert inputs.token_sets["heldout"].numel() == settings.eval_max_tokens


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(data="/no/such/rows.jsonl"), "no such file"),
        (dict(text_field="body"), "'body'"),
        (dict(batch_size=10**6), "exceeds"),
        (dict(eval_text="/no/such/eval.raw"), "no such evaluation text"),
    ],
)
def test_bad_inputs_fail_in_prepare(tiny_model_dir, overrides, match):
    with pytest.raises(DatasetError, match=match):
        prepare_inputs(tiny_cell_settings(tiny_model_dir, "bf16", **overrides))


def test_preflight_refuses_unavailable_mode(tiny_model_dir, hide_package):
    hide_package("bitsandbytes")
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    assert preflight(settings, parse_modes("bf16")).train_blocks.shape[1] == settings.seq_len
    with pytest.raises(ModeUnavailableError):
        preflight(settings, parse_modes("bf16,nf4"))


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_mode_fails_before_work(tiny_model_dir):
    from qlora_core.modes import UnknownModeError

    with pytest.raises(UnknownModeError):
        run_cell(dataclasses.replace(tiny_cell_settings(tiny_model_dir, "bf16"), mode="nf5"))


# --- GPU -----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_run_cell_on_cuda_reads_the_allocator(tiny_model_dir, mode):
    result = run_cell(tiny_cell_settings(tiny_model_dir, mode, device="cuda"))
    assert result["status"] == "ok" and result["device"] == "cuda"
    memory = result["memory"]
    assert {snapshot["kind"] for snapshot in memory.values()} == {"cuda"}
    assert memory["after_load"]["allocated_bytes"] > 0
    assert memory["training_peak"]["peak_allocated_bytes"] >= memory["after_load"]["allocated_bytes"]
    assert memory["after_load"]["reserved_bytes"] >= memory["after_load"]["allocated_bytes"]
    assert result["environment"]["gpu"]["name"] == torch.cuda.get_device_name(0)
    assert math.isfinite(result["perplexity"]["after"]["heldout"]["perplexity"])


# --- the real embedded model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_smollm2_in_nf4_dq():
    """End to end on the default model (SmolLM2-135M, fetched from PyPI and converted once into the cache:
    $QLORA_BENCH_CACHE or ~/.cache/qlora-bench), in the tutorial's mode."""
    from qlora_core.backends.bitsandbytes import BNB_4BIT_BLOCKSIZE, BNB_DOUBLE_QUANT_BLOCKSIZE
    from qlora_core.trainer import TrainSettings

    settings = CellSettings(mode="nf4-dq", model=None, seq_len=64, batch_size=2, timing_warmup=1, eval_window=128,
                            eval_stride=64, eval_max_tokens=256, eval_batch_size=4, device="cpu",
                            train=TrainSettings(max_steps=3))
    result = run_cell(settings)
    assert result["status"] == "ok"
    assert result["model"]["label"] == "smollm2"
    assert "Q4_1" in json.dumps(result["model"]["provenance"])

    # 4 + 8/64 + 32/(64*256) = 4.127 bits a weight, plus per layer the 16- and 256-entry float32 code tables
    # and the float32 offset; every decoder linear is quantized (the quant-error count is the same layers).
    weights = result["weights"]
    n, layers = weights["quantized_params"], result["quant_error"]["n_tensors"]
    headline = 4 + 8 / BNB_4BIT_BLOCKSIZE + 32 / (BNB_4BIT_BLOCKSIZE * BNB_DOUBLE_QUANT_BLOCKSIZE)
    tables = 8 * layers * 4 * (2**4 + 2**8 + 1) / n
    assert weights["bits_per_quantized_param"] == pytest.approx(headline + tables, abs=2e-3)
    assert 4.12 < weights["bits_per_quantized_param"] < 4.16
    # SmolLM2-135M: 30 layers of 7 linears, ~106M weights in them
    assert layers == 30 * 7 and 100e6 < n < 110e6

    assert all(math.isfinite(loss) for loss in result["training"]["losses"])
    for evaluation in result["perplexity"].values():
        heldout = evaluation["heldout"]
        assert math.isfinite(heldout["perplexity"]) and heldout["n_tokens_scored"] == 255
    # a pretrained model knows English: far below the 49k-token vocabulary's uniform perplexity
    assert result["perplexity"]["before"]["heldout"]["perplexity"] < 500


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    """The tiny model with one weight matrix all NaN, as a corrupt checkpoint would give."""
    from safetensors.torch import load_file, save_file

    from tiny import make_model_folder

    folder = make_model_folder(tmp_path_factory.mktemp("models") / "nan-llama")
    weights = load_file(folder / "model.safetensors")
    name = next(key for key in weights if key.endswith("mlp.down_proj.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_nan_perplexity_fails_the_cell_naming_the_figure(nan_model_dir):
    cell = Cell(tiny_cell_settings(nan_model_dir, "bf16"))
    cell.load()
    with pytest.raises(NonFiniteError, match="perplexity before on heldout is nan: not finite"):
        cell.evaluate("before")


def test_a_nan_training_loss_fails_at_its_step(tiny_model_dir):
    settings = tiny_cell_settings(tiny_model_dir, "bf16")
    settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, learning_rate=float("inf")))
    cell = Cell(settings)
    cell.load()
    cell.setup_training()
    cell.step()  # the loss before the first update is finite; the infinite update poisons the next one
    with pytest.raises(NonFiniteError, match="training loss at step 2 is nan: not finite"):
        cell.step()


def test_no_full_garbage_collection_over_the_model_lands_in_a_timed_step(tiny_model_dir):
    """During a step what was alive before it (libraries, model, optimizer) is frozen out of collections; after
    it, and after a failed step, it is the collector's again."""
    cell = Cell(tiny_cell_settings(tiny_model_dir, "bf16"))
    cell.load()
    cell.setup_training()
    frozen_outside = gc.get_freeze_count()
    frozen_inside = []
    take_step = cell.state.trainer.step
    cell.state.trainer.step = lambda: frozen_inside.append(gc.get_freeze_count()) or take_step()
    cell.step()
    assert frozen_inside[0] > frozen_outside + 100_000  # torch, transformers, the model: a full collection's work
    assert gc.get_freeze_count() == frozen_outside

    def failing_step():
        raise RuntimeError("out of memory")

    cell.state.trainer.step = failing_step
    with pytest.raises(RuntimeError):
        cell.step()
    assert gc.get_freeze_count() == frozen_outside


# --- a cell of zero steps: load, evaluations and set-up, no training ------------------------------------------------


def zero_step_settings(model_dir, mode: str = "nf4", **overrides) -> CellSettings:
    settings = tiny_cell_settings(model_dir, mode, **overrides)
    return dataclasses.replace(settings, train=dataclasses.replace(settings.train, max_steps=0))


def test_zero_steps_need_no_step_to_time():
    from qlora_core.trainer import TrainSettings

    CellSettings(mode="nf4", timing_warmup=5, train=TrainSettings(max_steps=0))  # nothing to time: no warm-up
    with pytest.raises(ValueError, match="steps \\(2\\) must exceed the timing warm-up \\(2"):
        CellSettings(mode="nf4", timing_warmup=2, train=TrainSettings(max_steps=2))


def test_a_cell_of_zero_steps_says_it_timed_none(tiny_model_dir):
    events: list[dict] = []
    settings = zero_step_settings(tiny_model_dir)
    result = run_cell(settings, report=events.append)
    assert result["status"] == "ok"
    json.dumps(result, allow_nan=False)
    training = result["training"]
    assert training["losses"] == [] and training["step_seconds"] == []
    assert training["timing"] is None and training["tokens_per_s"] is None
    assert training["mfu"] is None and training["hfu"] is None
    assert training["device_states"] is None and training["step_cuda_mallocs"] is None
    # what one step would have trained on, and the FLOPs a token would have cost: figures of the set-up
    assert training["tokens_per_step"] == settings.batch_size * settings.seq_len
    assert training["hardware_flops_per_token"] > training["flops_per_token"] > 0
    assert not [event for event in events if "step" in event]
    assert set(result["memory"]) >= {"after_load", "after_setup", "training_peak"}
    assert set(result["perplexity"]) == {"before", "after", "merged"}
    assert result["compile"] is None


def test_a_compiled_cell_of_zero_steps_compiled_nothing(tiny_model_dir):
    settings = dataclasses.replace(zero_step_settings(tiny_model_dir, eval_merged=False), compile=True)
    result = run_cell(settings)
    assert result["status"] == "ok"
    assert result["compile"]["first_step_s"] is None and result["compile"]["unique_graphs"] == 0


def shape_cell(**overrides) -> CellSettings:
    return CellSettings(**{"mode": "bf16", "shape": "tiny-llama", "path": "lean", "seq_len": 64, "batch_size": 2,
                           "timing_warmup": 1, "device": "cpu", "train": TrainSettings(max_steps=2), **overrides})


def test_eager_attention_trains_the_sdpa_loss_and_says_it_has_no_floor():
    """``attention``: the model switched to transformers' eager attention trains the same losses as its fused
    attention (the same arithmetic, another order), records what it ran, and records no floor, which assumes
    fused attention; unknown names are refused before anything loads."""
    eager = run_cell(shape_cell(attention="eager"))
    as_loaded = run_cell(shape_cell())
    assert (eager["model"]["attn_implementation"], as_loaded["model"]["attn_implementation"]) == ("eager", "sdpa")
    assert eager["settings"]["attention"] == "eager" and as_loaded["settings"]["attention"] is None
    assert eager["floor"] is None and eager["predicted_vs_measured"] is None and as_loaded["floor"] is not None
    assert eager["training"]["losses"] == pytest.approx(as_loaded["training"]["losses"], rel=1e-4)
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose from sdpa, eager"):
        shape_cell(attention="flash")


@pytest.mark.gpu
def test_eager_attention_makes_the_attention_matrix_that_sdpa_does_not():
    """Llama-3.2-1B shape at 1 x 4,096 tokens: eager attention keeps each recomputed layer's softmax output,
    [heads, tokens, tokens] in bf16, which the fused kernels never make, so its training peak exceeds SDPA's by
    at least that matrix; the losses are SDPA's."""
    settings = shape_cell(shape="Llama-3.2-1B", seq_len=4096, batch_size=1, device="cuda")
    sdpa, eager = run_cell(settings), run_cell(dataclasses.replace(settings, attention="eager"))
    assert (sdpa["model"]["attn_implementation"], eager["model"]["attn_implementation"]) == ("sdpa", "eager")
    heads = shape_config("Llama-3.2-1B").num_attention_heads
    peak = {name: result["memory"]["training_peak"]["peak_allocated_bytes"] for name, result in
            (("sdpa", sdpa), ("eager", eager))}
    assert peak["eager"] - peak["sdpa"] >= heads * 4096 * 4096 * 2
    assert eager["training"]["losses"] == pytest.approx(sdpa["training"]["losses"], rel=1e-2)
