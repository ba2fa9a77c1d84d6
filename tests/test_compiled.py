"""The compiled path (issue 14): the lean path's step through torch.compile, compared with the same step eager."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from tiny import tiny_cell_settings
from qlora_core.cell import CellSettings, run_cell
from qlora_core.report import footnotes
from qlora_core.trainer import GraphBreakSites, compile_report, compiled_if

#: Largest |loss difference| (nats) between the compiled and the eager lean path over the tiny cell's 3 steps:
#: inductor fuses and orders the bf16 arithmetic differently. Measured on this 2-core CPU (torch 2.13, nf4):
#: 8e-5, 3e-4, 9e-4 (growing with the steps, as Adam spreads rounding into the adapters); about 5x that.
LOSS_TOLERANCE = 5e-3


def test_a_compiled_cell_needs_a_warm_up_step():
    with pytest.raises(ValueError, match="its first step compiles"):
        CellSettings(mode="nf4", compile=True, timing_warmup=0)


def test_the_compiled_lean_path_trains_as_the_eager_one(tiny_model_dir):
    """The same losses within tolerance, the first step's compile time and the graph breaks in the result and
    the report. A few minutes on one CPU thread: inductor compiles forward and backward."""
    eager = tiny_cell_settings(tiny_model_dir, "nf4", path="lean", eval_merged=False)
    eager = dataclasses.replace(eager, lora=dataclasses.replace(eager.lora, dropout=0.0))
    plain, compiled = run_cell(eager), run_cell(dataclasses.replace(eager, compile=True))
    assert compiled["status"] == "ok", compiled.get("error")
    assert compiled["training"]["losses"] == pytest.approx(plain["training"]["losses"], abs=LOSS_TOLERANCE)
    report = compiled["compile"]
    assert plain["compile"] is None and report["unique_graphs"] >= 1
    assert report["first_step_s"] == compiled["training"]["step_seconds"][0]
    assert report["first_step_s"] > compiled["training"]["timing"]["median_s"]  # compilation in the first
    # one graph, no break: the lean path's embeddings' output needs no gradient (paths.drop_input_gradients),
    # whose requires_grad_() hook broke the step in two before
    assert report["graph_breaks"] == {} and report["unique_graphs"] == 1
    note = next(note for note in footnotes([compiled]) if "compiled (torch.compile): first step" in note)
    cache = report["inductor_cache"]
    assert sum(cache.values()) >= 2  # forward and backward each compiled, or loaded from the cache
    assert (f"with compilation (inductor's code for {sum(cache.values())} forward and backward graphs, "
            f"{cache['hit']} from torch's compile cache), 1 graph; graph breaks: none.") in note


def test_the_layers_scope_trains_as_the_eager_one_and_says_so(tiny_model_dir):
    """Each checkpointed decoder layer compiled on its own: the same losses as eager, no graph break (transformers'
    hub-kernel wrappers, with the ``kernels`` package installed as here, set a global inside each layer, which
    torch.compile refuses inside a checkpointed region unless ``compiled_if`` lets it skip replaying it), and the
    report's note names the scope."""
    eager = tiny_cell_settings(tiny_model_dir, "nf4", path="lean", eval_merged=False)
    eager = dataclasses.replace(eager, lora=dataclasses.replace(eager.lora, dropout=0.0))
    plain, compiled = run_cell(eager), run_cell(dataclasses.replace(eager, compile=True, compile_scope="layers"))
    assert compiled["status"] == "ok", compiled.get("error")
    assert compiled["training"]["losses"] == pytest.approx(plain["training"]["losses"], abs=LOSS_TOLERANCE)
    assert compiled["compile"]["graph_breaks"] == {}
    note = next(note for note in footnotes([compiled]) if "compiled (torch.compile" in note)
    assert "each decoder layer" in note


def test_the_layers_scope_compiles_the_same_graphs_at_any_depth_and_evaluates_eager():
    """Four checkpointed decoder layers, two graphs: the first layer's, whose input (the embeddings' output) needs
    no gradient on the lean path, and one the other three share. An evaluation's forwards, without gradients,
    compile nothing more."""
    from qlora_core.lora import LoraSettings
    from qlora_core.models import prepare_for_training
    from qlora_core.modes import get_mode
    from qlora_core.paths import attach_adapters, loss_function
    from qlora_core.shapes import build_shape_model, shape_config
    from qlora_core.trainer import LoraTrainer, TrainSettings

    config = shape_config("tiny-llama")
    config.num_hidden_layers = 4
    mode = get_mode("nf4")
    model = build_shape_model(config, mode, torch.device("cpu"))
    model = attach_adapters(prepare_for_training(model, mode, gradient_checkpointing=True, path="lean"),
                            LoraSettings(r=4, alpha=8, dropout=0.0), "lean")
    batches = iter(lambda: torch.ones(2, 16, dtype=torch.long), None)
    trainer = LoraTrainer(model, batches, TrainSettings(max_steps=2), mode.torch_compute_dtype,
                          loss_fn=loss_function("lean"), compile=True, compile_scope="layers")
    trainer.train(2)
    assert compile_report()["unique_graphs"] == 2
    with trainer.evaluating(), torch.no_grad(), torch.autocast("cpu", dtype=mode.torch_compute_dtype):
        model(torch.ones(1, 8, dtype=torch.long))
    assert compile_report()["unique_graphs"] == 2


def test_the_layers_scope_needs_decoder_layers_and_compile():
    with pytest.raises(ValueError, match="Linear has no decoder layers to compile"):
        compiled_if(torch.nn.Linear(2, 2), True, "default", "layers")
    with pytest.raises(ValueError, match="compile scope 'layers' needs compile"):
        CellSettings(mode="nf4", compile_scope="layers")
    with pytest.raises(ValueError, match="unknown compile scope 'model'"):
        CellSettings(mode="nf4", compile=True, compile_scope="model")
    for mode in ("reduce-overhead", "max-autotune"):  # CUDA graphs of the layers failed on an H100 (trainer.py)
        with pytest.raises(ValueError, match=f"scope 'layers' cannot take compile mode '{mode}'"):
            CellSettings(mode="nf4", compile=True, compile_mode=mode, compile_scope="layers")
    CellSettings(mode="nf4", compile=True, compile_mode="max-autotune-no-cudagraphs", compile_scope="layers")


def test_a_compile_mode_is_torch_s_and_needs_compile():
    with pytest.raises(ValueError, match="needs compile"):
        CellSettings(mode="nf4", compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        CellSettings(mode="nf4", compile=True, compile_mode="fast")


@pytest.mark.parametrize("mode, passed, copies", [
    ("default", None, False),
    ("reduce-overhead", "reduce-overhead", True),
    ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", False),
])
def test_the_trainer_compiles_in_the_mode_asked_and_copies_the_losses_a_cuda_graph_overwrites(
        monkeypatch, mode, passed, copies):
    """torch.compile gets the mode (torch's own default where none is asked); under a mode with CUDA graphs each
    micro-batch's loss is copied out of the graph's memory before the next replay (its mark) overwrites it."""
    import torch

    from qlora_core.trainer import LoraTrainer, TrainSettings

    asked, marks = {}, []

    def compile_(module, mode=None):
        asked["mode"] = mode
        return module

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = torch.nn.Linear(4, 1)
    batches = iter(lambda: torch.ones(2, 4), None)
    trainer = LoraTrainer(model, batches, TrainSettings(max_steps=1, grad_accum=2), torch.bfloat16,
                          loss_fn=lambda model, x: model(x).float().mean(), compile=True, compile_mode=mode)
    assert asked["mode"] == passed and trainer.cuda_graphs == copies
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(torch.ones(2, 4)).float().mean().item()  # both micro-batches' loss: the step comes after
    record = trainer.step()
    assert len(marks) == (2 if copies else 0) and record.loss == pytest.approx(before, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode, compile_scope", [("default", "step"), ("reduce-overhead", "step"),
                                                         ("default", "layers")])
def test_the_compiled_lean_path_trains_as_the_eager_one_on_cuda(tiny_model_dir, compile_mode, compile_scope):
    """As on CPU, on the GPU: inductor's CUDA kernels (Triton) instead of its C++ ones; with ``reduce-overhead``
    the step replayed as CUDA graphs; each layer compiled; checkpointed, as the bench runs it."""
    eager = tiny_cell_settings(tiny_model_dir, "nf4", path="lean", eval_merged=False, device="cuda")
    eager = dataclasses.replace(eager, lora=dataclasses.replace(eager.lora, dropout=0.0))
    plain, compiled = run_cell(eager), run_cell(dataclasses.replace(eager, compile=True, compile_mode=compile_mode,
                                                                    compile_scope=compile_scope))
    assert compiled["status"] == "ok", compiled.get("error")
    assert compiled["training"]["losses"] == pytest.approx(plain["training"]["losses"], abs=LOSS_TOLERANCE)
    assert compiled["compile"]["unique_graphs"] >= 1


def test_the_compile_report_says_whether_the_code_came_from_torch_s_compile_cache(tmp_path, monkeypatch):
    """The same step compiled in an empty cache, then again (dynamo's state reset, as a new process would start):
    first every forward and backward graph's code is compiled, then every one is loaded from the cache, so a
    second run's first step skips inductor's compilation."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    x = torch.randn(4, 8)
    outcomes = []
    for _ in range(2):
        compiled, _ = compiled_if(model, True, "default")  # resets dynamo and the counters
        compiled(x).sum().backward()
        outcomes.append(compile_report()["inductor_cache"])
    assert outcomes == [{"hit": 0, "miss": 2, "bypass": 0}, {"hit": 2, "miss": 0, "bypass": 0}]


class _BreaksTwice(torch.nn.Module):
    """A step that leaves the graph twice: at an operator whose output's shape depends on the data (the line
    after ``def``), and where its author asks (the next)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[x.nonzero().squeeze(1)]
        torch._dynamo.graph_break()
        return (kept * 2).sum()


def test_the_compile_report_says_where_each_graph_break_is_and_prints_nothing(capfd):
    compiled, _ = compiled_if(_BreaksTwice(), True, "default")
    compiled(torch.tensor([0.0, 1.0, 2.0]))
    report = compile_report()
    forward = _BreaksTwice.forward.__code__.co_firstlineno
    here = Path(__file__).name
    sites = {reason: [site.rsplit("/", 1)[-1] for site in found]
             for reason, found in report["graph_break_sites"].items()}
    assert sites == {"Dynamic shape operator": [f"{here}:{forward + 1}"],
                     "Call to `torch._dynamo.graph_break()`": [f"{here}:{forward + 2}"]}
    assert "Graph break" not in capfd.readouterr().err  # torch's own log stays off unless TORCH_LOGS asks


def test_a_graph_break_site_is_named_from_its_package_on_wherever_it_is_installed(tmp_path, monkeypatch):
    staged = tmp_path / "staged-site"  # bitsandbytes staged outside site-packages, as on the GPU machine
    monkeypatch.syspath_prepend(str(staged))
    sites = GraphBreakSites()
    for file, line in ((staged / "bitsandbytes" / "functional.py", 1673), (tmp_path / "elsewhere.py", 7)):
        message = f"Graph break in user code at {file}:{line}\nGraph Break Reason: Dynamic shape operator\n"
        sites.emit(logging.LogRecord("graph_breaks", logging.DEBUG, __file__, 0, message, None, None))
    assert sites.sites("Dynamic shape operator") == ["bitsandbytes/functional.py:1673", f"{tmp_path}/elsewhere.py:7"]
    assert sites.sites("Call to `torch._dynamo.graph_break()`") == []
