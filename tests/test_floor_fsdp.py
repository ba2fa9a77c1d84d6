"""The memory floor under FSDP (``measure.floor.fsdp_terms``) against what FSDP2 ranks hold: one process's floor
plus the units it gathers; each of 2 gloo ranks' shards byte for byte (the tiny model); a rank's heap peak over a
step, alone and beside one process's (1 and 2 ranks, on the CPU); one FSDP process's peak on CUDA (``gpu``)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import platform

import pytest
import torch

from tiny import make_model_folder

from qlora_core.cell import CellSettings
from qlora_core.distributed import launch
from qlora_core.lora import LoraSettings
from qlora_core.measure.floor import fsdp_addition_bounds, memory_floor, phase_components
from qlora_core.modes import get_mode
from qlora_core.paths import PATHS
from qlora_core.shapes import shape_config
from qlora_core.trainer import TrainSettings

CPU = torch.device("cpu")
RANKS = 2
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
SEQ, ROWS = 32, 2  # a rank's micro-batch on the tiny model


def test_one_fsdp_process_s_floor_is_one_process_s_plus_the_units_it_gathers():
    """One rank holds every shard whole: the components of one process's floor, and in each phase the units it
    gathers beside them: the root throughout; in a layer's backward the layer and the reduce-scatter input kept
    from the layer above (its own gradients stand in for its shard of them); at the loss on the lean path the
    head, gathered for the chunks' recompute. One rank prefetches nothing: it copies its shard, no all-gather."""
    config = shape_config("tiny-llama")
    for mode in ("bf16", "nf4-dq"):
        for path in PATHS:
            alone = memory_floor(config, get_mode(mode), LORA, SEQ, ROWS, True, path=path)
            sharded = memory_floor(config, get_mode(mode), LORA, SEQ, ROWS, True, path=path, strategy="fsdp")
            sharding = sharded["sharding"]
            phases = {"sharding", "phase_peak_bytes", "peak_bytes", "peak_phase", "true_floor_bytes",
                      "true_floor_phase"}
            assert {k: v for k, v in sharded.items() if k not in phases} == {
                k: v for k, v in alone.items() if k not in phases}
            units = sharding["unit_bytes"]
            assert sharding["gathered_bytes"] == {
                "loss": units["root"] + (units["head"] if path == "lean" else 0),
                "layer_backward": units["root"] + units["layer"] + sharding["reduce_scatter_bytes"],
                "optimizer_step": 0,
            }
            for phase, phase_bytes in alone["phase_peak_bytes"].items():
                assert sharded["phase_peak_bytes"][phase] == phase_bytes + sharding["gathered_bytes"][phase]
                assert sum(phase_components(sharded, phase).values()) == sharded["phase_peak_bytes"][phase]
            assert "sharding" not in alone and phase_components(alone, "loss")["fsdp_gathered_bytes"] == 0


def test_the_floor_refuses_a_mode_fsdp_cannot_shard():
    with pytest.raises(ValueError, match="mode 'int8' cannot be trained with fsdp"):
        memory_floor(shape_config("tiny-llama"), get_mode("int8"), LORA, SEQ, ROWS, True, strategy="fsdp")


# --- each rank's shards, byte for byte ----------------------------------------------------------------------------

#: (mode, path) of the set-ups whose shards the ranks hold: 4-bit weights stored in bf16 for FSDP, with the
#: reference path's fp32 upcasts and without, and half precision.
SHARD_RUNS = (("nf4-dq", "reference"), ("nf4-dq", "lean"), ("bf16", "lean"))


def held_by_rank(folders: dict[str, str]) -> dict[str, dict]:
    """In a launched rank: for the model in each of ``folders`` (by label) in each of SHARD_RUNS, sharded by FSDP
    as the trainer shards it, what this rank holds after set-up (``weight_footprint``: its shards, the
    quantization constants, the buffers) and of it the adapters' shards, and the optimizer's state after a step."""
    from qlora_core.measure.memory import held, optimizer_state_bytes, weight_footprint
    from qlora_core.models import load_model, prepare_for_training, resolve_model
    from qlora_core.paths import attach_adapters, loss_function
    from qlora_core.strategies import mode_for
    from qlora_core.trainer import LoraTrainer

    found = {}
    for label, folder in folders.items():
        for name, path in SHARD_RUNS:
            mode = mode_for(get_mode(name), "fsdp")
            model = load_model(resolve_model(folder), mode, CPU)
            model = attach_adapters(prepare_for_training(model, mode, gradient_checkpointing=True, path=path), LORA,
                                    path)
            batch = torch.randint(0, 256, (RANKS * ROWS, SEQ), generator=torch.Generator().manual_seed(0))
            trainer = LoraTrainer(model, iter(lambda: batch, None), TrainSettings(max_steps=1),
                                  mode.torch_compute_dtype, loss_fn=loss_function(path), strategy="fsdp")
            footprint = weight_footprint(trainer.training_model)
            adapters = [held(p) for p in trainer.trainable]
            trainer.train(1)
            found[f"{label} {name} {path}"] = {
                "weights_bytes": footprint["weights_bytes"],
                "quant_constants_bytes": footprint["quant_constants_bytes"],
                "lora_param_bytes": sum(t.numel() * t.element_size() for t in adapters),
                "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
            }
    return found


@pytest.fixture(scope="module")
def rank_shards(tiny_model_dir, tmp_path_factory) -> tuple[dict[str, str], list[dict]]:
    """The tiny Llama (vocabulary 259: its embeddings and head pad to 260 rows for 2 ranks), untied and tied,
    as each of 2 gloo ranks holds it (``held_by_rank``)."""
    tied = make_model_folder(tmp_path_factory.mktemp("fsdp") / "tiny-tied", tie_word_embeddings=True)
    folders = {"untied": str(tiny_model_dir), "tied": str(tied)}
    return folders, launch(held_by_rank, (folders,), num_processes=RANKS)


@pytest.mark.parametrize("mode, path", SHARD_RUNS)
@pytest.mark.parametrize("label", ["untied", "tied"])
def test_each_rank_holds_the_shards_the_floor_predicts(rank_shards, label, mode, path):
    """Every rank holds its padded shard of every parameter (weights, upcasts, adapters) and the quantization
    constants and buffers whole: after set-up, the floor's bytes exactly. The optimizer's state is made on the
    local shards, which rank 0 holds in full and the last rank without the padding: the floor's (rank 0's) on
    rank 0, no more on the other."""
    from qlora_core.models import load_config, resolve_model

    folders, ranks = rank_shards
    floor = memory_floor(load_config(resolve_model(folders[label])), get_mode(mode), LORA, SEQ, ROWS, True,
                         path=path, device_type="cpu", strategy="fsdp", num_processes=RANKS)
    held = [rank[f"{label} {mode} {path}"] for rank in ranks]
    for rank in held:
        assert rank["weights_bytes"] == floor["after_setup_bytes"] < floor["after_load_bytes"]
        assert rank["quant_constants_bytes"] == floor["quant_constants_bytes"]
        assert rank["lora_param_bytes"] == floor["lora_param_bytes"]
    assert held[0]["optimizer_state_bytes"] == floor["optimizer_state_bytes"] >= held[1]["optimizer_state_bytes"]


# --- a rank's heap over a step ------------------------------------------------------------------------------------

#: Set-ups (small-llama's shape with these changes, and a path) whose step peaks where FSDP's units matter: in a
#: middle layer's backward (it prefetches the layer below and keeps the layer above's reduce-scatter input), and
#: at the loss with tied embeddings (the root's, gathered throughout; the top layer prefetched by the root's
#: backward).
HEAP_SET_UPS = {
    "layers": (dict(num_hidden_layers=3), "lean"),
    "loss": (dict(num_hidden_layers=3, vocab_size=8192, tie_word_embeddings=True), "reference"),
}
HEAP_TOKENS = 256
HEAP_LORA = LoraSettings(r=16, alpha=32, dropout=0.0)
#: A rank's growth against the floor's, as test_floor_heap.py allows one process's. Measured on this 2-core CPU
#: (torch 2.13, one run of each rank): -1.5 % (1 rank) and -0.9 % (2) with the layers' peak, +1.7 % and +1.3 %
#: with the loss's; one process alone: -2.7 % and +1.8 %.
HEAP_REL_TOL = 0.05
#: What FSDP added to one process's peak against what the floor adds. Measured as for HEAP_REL_TOL: +1.4 % (1
#: rank) and +1.8 % (2) with the layers' peak, +1.0 % and -0.8 % with the loss's. On 2 ranks the layers' peak
#: moves up from the bottom layer to the middle one, which prefetches a whole layer (the bottom one prefetches
#: the embeddings) and holds one more layer's checkpointed input (the floor's phases hold every layer's): at 512
#: tokens a rank this made +4.9 %. Since the lean path's embeddings' output needs no gradient (b197ffa), the bottom
#: layer's backward makes no input gradient and holds less: one process's peak, there, fell (-2.7 % to -5.3 %
#: against the floor) while the 2 ranks' in the middle layer did not, so FSDP adds more: +5.0 % and +5.1 %
#: (2 ranks; CI's run +5.5 %), +1.4 % (1 rank, whose peak stays at the bottom). The floor does not model the
#: bottom layer apart (at 8B its peak moment is a layer's MLP backward or recompute, the same in every layer).
HEAP_ADDED_REL_TOL = 0.08


def heap_config(name: str):
    config = shape_config("small-llama")
    for key, value in HEAP_SET_UPS[name][0].items():
        setattr(config, key, value)
    return config


def heap_growth(name: str, strategy: str) -> int:
    """Growth of this process's heap peak over a micro-step (forward, loss, backward: HEAP_TOKENS tokens in
    bf16) of the HEAP_SET_UPS set-up ``name`` shared by ``strategy`` (``ddp`` in one process: unshared), after
    a first one made everything a step keeps but the adapters' gradients, unset as each step starts."""
    from test_floor_heap import HeapPeak, heap_bytes

    from qlora_core.models import prepare_for_training
    from qlora_core.paths import attach_adapters, loss_function
    from qlora_core.shapes import build_shape_model
    from qlora_core.trainer import LoraTrainer

    mode, path = get_mode("bf16"), HEAP_SET_UPS[name][1]
    model = prepare_for_training(build_shape_model(heap_config(name), mode, CPU), mode, gradient_checkpointing=True,
                                 path=path)
    trainer = LoraTrainer(attach_adapters(model, HEAP_LORA, path), iter(()), TrainSettings(), torch.bfloat16,
                          loss_fn=loss_function(path), strategy=strategy)
    ids = torch.randint(0, 256, (1, HEAP_TOKENS), generator=torch.Generator().manual_seed(0))

    def micro_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainer.training_model(ids)
        loss.backward()

    micro_step()
    for param in trainer.trainable:  # as a step starts (the optimizer's zero_grad)
        param.grad = None
    gc.collect()  # the first step's cycles (through FSDP's hooks) freed now, not by a collection in the measured one
    before = heap_bytes()
    with HeapPeak() as heap:
        micro_step()
    return heap.peak - before


def fsdp_heap_growths() -> dict[str, int]:
    """In a launched rank: ``heap_growth`` of every HEAP_SET_UPS set-up under FSDP."""
    return {name: heap_growth(name, "fsdp") for name in HEAP_SET_UPS}


@functools.cache
def one_process_growth(name: str) -> int:
    return heap_growth(name, "ddp")


def predicted_growth(name: str, strategy: str, num_processes: int) -> int:
    """What the floor's peak phase holds beyond what is there before a step: all but the weights as stored,
    their upcasts, the adapters and their optimizer state (not made by micro-steps)."""
    config, path = heap_config(name), HEAP_SET_UPS[name][1]
    floor = memory_floor(config, get_mode("bf16"), HEAP_LORA, HEAP_TOKENS, 1, True, path=path, device_type="cpu",
                         strategy=strategy, num_processes=num_processes)
    parts = phase_components(floor, floor["peak_phase"])
    before = sum(parts[key] for key in ("quantized_bytes", "quant_constants_bytes", "unquantized_bytes", "upcast_bytes"))
    return sum(parts.values()) - before - floor["lora_param_bytes"] - floor["optimizer_state_bytes"]


@pytest.fixture(scope="module", params=[1, RANKS], ids=lambda n: f"{n}-ranks")
def rank_heaps(request) -> tuple[int, list[dict[str, int]]]:
    """(ranks, each rank's ``fsdp_heap_growths``), the ranks launched together (gloo)."""
    return request.param, launch(fsdp_heap_growths, num_processes=request.param)


heap_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="reads glibc's heap (mallinfo2)")


@heap_only
@pytest.mark.parametrize("name", HEAP_SET_UPS)
def test_a_rank_s_heap_peak_is_the_floor_s(rank_heaps, name):
    ranks, growths = rank_heaps
    for rank in growths:
        assert rank[name] == pytest.approx(predicted_growth(name, "fsdp", ranks), rel=HEAP_REL_TOL)


@heap_only
@pytest.mark.parametrize("name", HEAP_SET_UPS)
def test_what_fsdp_adds_to_one_process_s_peak_is_what_the_floor_adds(rank_heaps, name):
    """Beside the same micro-step unshared in one process (one rank's rows): the units gathered and prefetched,
    the gradients unreduced, less what the shards save."""
    ranks, growths = rank_heaps
    added = predicted_growth(name, "fsdp", ranks) - predicted_growth(name, "ddp", 1)
    for rank in growths:
        assert rank[name] - one_process_growth(name) == pytest.approx(added, rel=HEAP_ADDED_REL_TOL)


# --- on CUDA ------------------------------------------------------------------------------------------------------

#: The FSDP cell's allocated peak against its floor (the target: the heap's tolerance, HEAP_REL_TOL); and the
#: phases that may hold the peak without FSDP, within this much of its predicted peak (``fsdp_addition_bounds``).
CUDA_REL_TOL = 0.05
#: Slack on those bounds: the allocator's rounding and the few small blocks (cuBLAS's, the loss's scalars) no
#: phase counts, some 1 MiB at the 1B shape.
BOUND_SLACK = 0.02


def test_what_fsdp_may_add_is_bounded_by_what_it_gathers_in_the_phases_that_may_hold_the_peak():
    """Without FSDP the peak is predicted in the loss, a layer's backward within CUDA_REL_TOL of it: FSDP adds at
    least the least it gathers in either, at most the most it gathers anywhere; the optimizer's step, far below,
    is no candidate."""
    alone = {"peak_bytes": 1000, "phase_peak_bytes": {"loss": 1000, "layer_backward": 980, "optimizer_step": 500}}
    fsdp = {"sharding": {"gathered_bytes": {"loss": 300, "layer_backward": 120, "optimizer_step": 0}}}
    assert fsdp_addition_bounds(fsdp, alone, CUDA_REL_TOL) == (120, 300)
    assert fsdp_addition_bounds(fsdp, alone, 0.01) == (300, 300)  # only the loss is near enough


def run_alone(settings: CellSettings) -> dict:
    """``run_cell`` in a worker process of its own (a fresh allocator; FSDP's process group of one ends with it)."""
    from qlora_core.worker import CellWorker

    with CellWorker() as worker:
        worker.bind(settings)
        return worker.call("run_all")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_one_fsdp_process_s_peak_on_cuda_is_the_floor_s(mode):
    """Llama-3.2-1B shape (tied embeddings: the root's, gathered throughout), lean path, 4 x 1024 tokens, r=16,
    one FSDP process on CUDA: its allocated peak within CUDA_REL_TOL of its floor, and what FSDP added to the same
    cell's peak without it between the least and the most the floor's phases say it gathers there
    (``fsdp_addition_bounds``). The difference of the two predicted peaks is no target: on the H200 at 7411488
    FSDP added to the bf16 cell the root's bytes within 1 MiB (its peak the loss, as DDP's, not a layer's
    backward as predicted), and that difference missed it by 9 % while the peak was within 5 %."""
    settings = CellSettings(mode=mode, shape="Llama-3.2-1B", path="lean", seq_len=1024, batch_size=4,
                            timing_warmup=2, device="cuda", lora=LoraSettings(), train=TrainSettings(max_steps=4),
                            strategy="fsdp")
    sharded, alone = run_alone(settings), run_alone(dataclasses.replace(settings, strategy="ddp"))
    rows = [result["predicted_vs_measured"]["training_peak"] for result in (sharded, alone)]
    assert rows[0]["measured_bytes"] == pytest.approx(rows[0]["predicted_bytes"], rel=CUDA_REL_TOL)
    least, most = fsdp_addition_bounds(sharded["floor"], alone["floor"], CUDA_REL_TOL)
    assert least * (1 - BOUND_SLACK) <= rows[0]["measured_bytes"] - rows[1]["measured_bytes"] <= most * (1 + BOUND_SLACK)
