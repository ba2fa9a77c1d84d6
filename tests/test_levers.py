"""The lean path's memory levers (qlora_core/levers.py): the same loss and gradients with each pulled, what the
offload moves to the host as the memory model counts it, and the model's terms and checks."""

from __future__ import annotations

import dataclasses

import bitsandbytes as bnb
import pytest
import torch

from qlora_core.cell import CellSettings, run_cell
from qlora_core.levers import (ActivationOffload, Levers, decoder_mlps, power_of_two_pieces, tile_mlps,
                               with_offload)
from qlora_core.lora import LoraSettings
from qlora_core.measure.floor import memory_floor, offloaded_split, phase_components
from qlora_core.modes import get_mode
from qlora_core.paths import chunked_causal_lm_loss
from qlora_core.shapes import shape_config
from qlora_core.trainer import TrainSettings
from test_paths import adapted

#: Offloaded copies are exact, so offloading changes nothing; tiling reorders no reduction a token sees (the MLP
#: is per token), but a matmul over a tile may block its sums differently from one over the whole batch.
TILED_GRADIENT_REL_TOL = 1e-2


def loss_and_gradient(model, loss_fn, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model, ids)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def ids(rows: int = 2, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, 320, (rows, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_offloading_changes_neither_loss_nor_gradients(mode):
    batch = ids()
    plain = loss_and_gradient(adapted("tiny-llama", mode, "lean"), chunked_causal_lm_loss, batch)
    offload = ActivationOffload(min_bytes=0)
    offloaded = loss_and_gradient(adapted("tiny-llama", mode, "lean"), with_offload(chunked_causal_lm_loss, offload),
                                  batch)
    assert offload.offloaded_bytes > 0
    assert offloaded[0] == plain[0]
    assert torch.equal(offloaded[1], plain[1])


@pytest.mark.parametrize("numel, smallest, pieces", [
    (3 * 2**30 // 2 + 5, 2**19, [2**30, 2**29, 5]),  # 3 GiB and 5 elements: exact, not rounded up to 4 GiB
    (2**20, 2**19, [2**20]), (2**19 - 1, 2**19, [2**19 - 1]), (11, 1, [8, 2, 1]), (11, 0, [8, 2, 1]), (0, 4, [])])
def test_host_copies_go_in_power_of_two_pieces_that_add_up_exactly(numel, smallest, pieces):
    assert power_of_two_pieces(numel, smallest) == pieces
    assert sum(pieces) == numel and all(piece & (piece - 1) == 0 for piece in pieces[:-1])


def test_a_saved_tensor_comes_back_whole_from_its_pieces_whatever_its_layout():
    """A non-contiguous tensor of 2 x 3 x 7 elements comes back from pieces of 32, 8 and 2 elements."""
    offload = ActivationOffload(min_bytes=4)  # 2 float32 elements
    tensor = torch.arange(42, dtype=torch.float32).reshape(2, 7, 3).transpose(1, 2)
    packed = offload.pack(tensor)
    assert [piece.numel() for piece in packed.pieces] == [32, 8, 2]
    assert torch.equal(offload.unpack(packed), tensor) and offload.offloaded_bytes == 42 * 4


@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_a_tiled_mlp_gives_the_untiled_loss_and_gradients(mode):
    batch = ids()
    plain_loss, plain_gradient = loss_and_gradient(adapted("tiny-llama", mode, "lean"), chunked_causal_lm_loss, batch)
    model = tile_mlps(adapted("tiny-llama", mode, "lean"), 24)  # 128 tokens: tiles of 24 leave a ragged last one
    tiled_loss, tiled_gradient = loss_and_gradient(model, chunked_causal_lm_loss, batch)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-3)
    assert (tiled_gradient - plain_gradient).norm() <= TILED_GRADIENT_REL_TOL * plain_gradient.norm()


def test_tiling_keeps_module_names_so_adapters_save_as_before():
    model = adapted("tiny-llama", "bf16", "lean")
    names = [name for name, _ in model.named_parameters()]
    tile_mlps(model, 16)
    assert [name for name, _ in model.named_parameters()] == names
    assert len(decoder_mlps(model)) == 2  # tiny-llama's two layers


def test_tiling_refuses_a_model_without_gated_mlps():
    with pytest.raises(ValueError, match="mlp tiling needs decoder layers"):
        tile_mlps(adapted("tiny-bloom", "bf16", "lean"), 16)


def test_the_offload_moves_what_the_memory_model_says_it_does():
    """Every layer's input (the first's too: the lean path's embeddings' output needs no gradient), the final
    norm's fp32 input and the loss chunk's hidden states,
    counted by the hooks (anything of at least 4 KiB: the norm's reciprocal RMS and the labels, smaller here and
    a few bytes a token at scale, stay on the GPU in the model as in the hooks' default threshold) against the
    floor's term."""
    rows, seq = 2, 64
    offload = ActivationOffload(min_bytes=4096)
    loss_and_gradient(adapted("tiny-llama", "bf16", "lean"), with_offload(chunked_causal_lm_loss, offload),
                      ids(rows, seq))
    floor = memory_floor(shape_config("tiny-llama"), get_mode("bf16"), LoraSettings(r=4, alpha=8, dropout=0.0), seq,
                         rows, True, path="lean", device_type="cpu", levers=Levers(offload_activations=True))
    assert offload.offloaded_bytes == floor["offloaded_activations_bytes"]


def test_each_lever_lowers_the_predicted_peak_of_a_long_sequence():
    config, mode, lora = shape_config("Llama-3.1-8B"), get_mode("nf4-dq"), LoraSettings()
    peak = {levers: memory_floor(config, mode, lora, 65536, 1, True, path="lean", levers=levers)
            for levers in (Levers(), Levers(True), Levers(False, 4096), Levers(True, 4096))}
    plain, offload, tiled, both = (peak[levers]["peak_bytes"] for levers in peak)
    assert plain > offload > both and plain > tiled > both
    # the offload takes every layer's input (h e bytes a token a layer) off the GPU, and the recompute brings
    # one back
    layer_input = 65536 * 4096 * 2
    assert plain - offload == pytest.approx(31 * layer_input, rel=0.1)
    parts = phase_components(peak[Levers(True)], "layer_backward")
    # in backward: no layer's input but the one brought back, and RoPE's cos and sin (head width 128)
    assert parts["saved_activations_bytes"] == 2 * 65536 * 128 * 2
    assert peak[Levers(True)]["brought_back_bytes"] == layer_input
    assert sum(parts.values()) == peak[Levers(True)]["phase_peak_bytes"]["layer_backward"]
    assert peak[Levers()]["offloaded_activations_bytes"] == 0


def test_levers_belong_to_the_lean_path_with_checkpointing():
    with pytest.raises(ValueError, match="levers of the lean path"):
        CellSettings(mode="bf16", shape="tiny-llama", offload_activations=True)
    with pytest.raises(ValueError, match="turn checkpointing on"):
        CellSettings(mode="bf16", shape="tiny-llama", path="lean", mlp_tile_tokens=64, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="mlp_tile_tokens must be >= 1"):
        Levers(mlp_tile_tokens=0)
    assert Levers(True, 4096).label() == "-offload-mlp-tile4096" and Levers().label() == ""


def test_a_cell_with_both_levers_trains_and_records_them():
    settings = CellSettings(mode="nf4-dq", shape="tiny-llama", path="lean", seq_len=64, batch_size=2,
                            timing_warmup=1, device="cpu", offload_activations=True, mlp_tile_tokens=32,
                            lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_steps=2))
    result = run_cell(settings)
    plain = run_cell(dataclasses.replace(settings, offload_activations=False, mlp_tile_tokens=None))
    assert result["status"] == "ok"
    assert result["settings"]["offload_activations"] and result["settings"]["mlp_tile_tokens"] == 32
    assert result["floor"]["levers"] == {"offload_activations": True, "mlp_tile_tokens": 32, "offload_host_gib": None,
                                         "int8_matmul": "llm-int8"}
    assert result["training"]["losses"] == pytest.approx(plain["training"]["losses"], rel=1e-2)
    assert result["training"]["hardware_flops_per_token"] > plain["training"]["hardware_flops_per_token"]


@pytest.mark.gpu
@pytest.mark.parametrize("levers", [Levers(True), Levers(False, 1024), Levers(True, 1024)], ids=Levers.label)
def test_each_lever_lowers_the_measured_peak_on_cuda(levers):
    """Llama-3.2-1B shape at 1 x 16,384 tokens, where one layer's backward is the predicted peak with and without
    the levers (at 4,096 tokens it is the loss chunk's logits, which tiling leaves alone: the first run of this
    test on the H200, 2026-12-03, measured the same peak to the byte): each lever lowers the allocator's
    training peak, within the memory model's target of its prediction, and the loss stays the plain cell's."""
    settings = CellSettings(mode="nf4-dq", shape="Llama-3.2-1B", path="lean", seq_len=16384, batch_size=1,
                            timing_warmup=1, device="cuda", train=TrainSettings(max_steps=2))
    plain = run_cell(settings)
    pulled = run_cell(dataclasses.replace(settings, **levers.describe()))
    assert {plain["floor"]["peak_phase"], pulled["floor"]["peak_phase"]} == {"layer_backward"}
    plain_peak = plain["predicted_vs_measured"]["training_peak"]
    pulled_peak = pulled["predicted_vs_measured"]["training_peak"]
    assert pulled_peak["measured_bytes"] < plain_peak["measured_bytes"]
    assert 0.9 <= pulled_peak["ratio"] <= 1.10
    assert pulled["training"]["losses"] == pytest.approx(plain["training"]["losses"], rel=1e-2)


def test_a_capped_offload_keeps_what_does_not_fit_and_the_floor_says_which():
    """With a cap of 3.5 layer inputs on tiny-llama (2 layers), both layers' inputs go to the host, then of the
    head only what still fits, whole tensors in the order saved: not the final norm's fp32 input (two layer
    inputs' worth would pass the cap), the loss chunk's hidden states (one). The hooks and the floor agree to the
    byte, and the loss and gradients are those of no offload."""
    rows, seq, config = 2, 64, shape_config("tiny-llama")
    layer_input = rows * seq * config.hidden_size * 2
    cap = int(3.5 * layer_input)
    levers = Levers(offload_activations=True, offload_host_gib=cap / 2**30)
    offload = ActivationOffload(min_bytes=4096, max_bytes=levers.offload_host_bytes)
    batch = ids(rows, seq)
    plain = loss_and_gradient(adapted("tiny-llama", "bf16", "lean"), chunked_causal_lm_loss, batch)
    capped = loss_and_gradient(adapted("tiny-llama", "bf16", "lean"), with_offload(chunked_causal_lm_loss, offload),
                               batch)
    assert capped[0] == plain[0] and torch.equal(capped[1], plain[1])
    floor = memory_floor(config, get_mode("bf16"), LoraSettings(r=4, alpha=8, dropout=0.0), seq, rows, True,
                         path="lean", device_type="cpu", levers=levers)
    uncapped = memory_floor(config, get_mode("bf16"), LoraSettings(r=4, alpha=8, dropout=0.0), seq, rows, True,
                            path="lean", device_type="cpu", levers=Levers(offload_activations=True))
    assert offload.offloaded_bytes == floor["offloaded_activations_bytes"]
    assert floor["offloaded_activations_bytes"] == 3 * layer_input < cap < uncapped["offloaded_activations_bytes"]


def test_the_split_offloads_whole_tensors_in_order_while_they_fit():
    assert offloaded_split(4, 10, [8, 3, 3], None) == (4, 14)
    assert offloaded_split(4, 10, [8, 3, 3], 25) == (2, 3)  # 5 left: the 8 stays, one 3 goes
    assert offloaded_split(4, 10, [8, 3, 3], 9) == (0, 8)
    assert offloaded_split(4, 10, [8, 3, 3], 2) == (0, 0)


def test_a_capped_offload_shares_a_long_sequence_between_host_and_gpu():
    """The 70B shape at 90,000 tokens: its layers' inputs outgrow a 100 GiB host; capped there, the ones left
    stay on the GPU, which then holds more than with all offloaded and less than with none."""
    config, mode, lora = shape_config("Llama-3.1-70B"), get_mode("nf4-dq"), LoraSettings()
    floors = {levers: memory_floor(config, mode, lora, 90_000, 1, True, path="lean", levers=levers)
              for levers in (Levers(False, 4096), Levers(True, 4096), Levers(True, 4096, 100.0))}
    none, every, capped = floors.values()
    assert every["offloaded_activations_bytes"] > 100 * 2**30 >= capped["offloaded_activations_bytes"]
    assert none["peak_bytes"] > capped["peak_bytes"] > every["peak_bytes"]
    layer_input = 90_000 * config.hidden_size * 2
    kept = config.num_hidden_layers - 100 * 2**30 // layer_input
    assert capped["saved_activations_bytes"] == kept * layer_input


def test_a_host_cap_needs_the_offload_and_names_itself():
    with pytest.raises(ValueError, match="needs offload_activations"):
        Levers(offload_host_gib=10.0)
    assert Levers(True, None, 100.0).label() == "-offload-host100gib"
    assert Levers(True, None, 100.0).offload_host_bytes == 100 * 2**30


def test_the_true_floor_of_a_lever_cell_assumes_its_levers():
    """A lever cell's measured peak is compared with a floor that offloads and tiles too (else the boundaries the
    host holds would sit in the floor, above what the GPU held): the lean path with its levers is that floor."""
    config, mode, lora = shape_config("Llama-3.1-8B"), get_mode("nf4-dq"), LoraSettings()
    plain = memory_floor(config, mode, lora, 65536, 1, True, path="lean")
    both = memory_floor(config, mode, lora, 65536, 1, True, path="lean", levers=Levers(True, 4096))
    assert both["true_floor_bytes"] == both["peak_bytes"] < plain["true_floor_bytes"] == plain["peak_bytes"]


def routed_int8_matmuls(model) -> set[str]:
    """How each LLM.int8 linear of ``model`` computes, as its ``FrozenInt8Matmul`` routing says."""
    return {module.forward.args[1] for module in model.modules() if isinstance(module, bnb.nn.Linear8bitLt)}


def test_the_dequantized_int8_matmul_is_bitsandbytes_own_cpu_training_path():
    """On a CPU bitsandbytes trains int8 linears by dequantizing their weight (``MatMul8bitFp``), which the lever
    does on any device: there the lever changes nothing, bit for bit, and every int8 linear is routed through it."""
    batch = ids()
    plain = adapted("tiny-llama", "int8", "lean")
    assert routed_int8_matmuls(plain) == {"llm-int8"}
    plain_loss, plain_gradient = loss_and_gradient(plain, chunked_causal_lm_loss, batch)
    lever = Levers(int8_matmul="dequantized")
    dequantized, loss_fn = lever.apply(adapted("tiny-llama", "int8", "lean"), chunked_causal_lm_loss)
    assert routed_int8_matmuls(dequantized) == {"dequantized"} and loss_fn is chunked_causal_lm_loss
    loss, gradient = loss_and_gradient(dequantized, loss_fn, batch)
    assert loss == plain_loss
    torch.testing.assert_close(gradient, plain_gradient, rtol=0, atol=0)


def test_the_int8_matmul_is_the_int8_mode_s_on_the_lean_path():
    with pytest.raises(ValueError, match="unknown int8 matmul 'int4'; choose from llm-int8, dequantized"):
        Levers(int8_matmul="int4")
    with pytest.raises(ValueError, match="lean path's"):
        CellSettings(mode="int8", shape="tiny-llama", int8_matmul="dequantized")
    with pytest.raises(ValueError, match="mode 'nf4-dq' has none"):
        CellSettings(mode="nf4-dq", shape="tiny-llama", path="lean", int8_matmul="dequantized")
    lever = CellSettings(mode="int8", shape="tiny-llama", path="lean", gradient_checkpointing=False,
                         int8_matmul="dequantized").levers  # no memory lever: checkpointing is not needed
    assert lever.int8_dequantized and not lever.memory_levers and lever.label() == "-int8-dequantized"


def test_the_dequantized_int8_matmul_has_no_quantizing_transient_in_the_floor():
    """On CUDA LLM.int8's down projections quantize an MLP-wide input in the recompute (fp16 copy, int8 values,
    outlier mask), which the floor holds at 8B and 16,384 tokens; the dequantized matmul holds only a
    dequantized weight, as the 4-bit modes do, so its floor is lower and the rest of its terms are the same."""
    config, mode, lora = shape_config("Llama-3.1-8B"), get_mode("int8"), LoraSettings()
    plain = memory_floor(config, mode, lora, 16384, 1, True, path="lean")
    lever = memory_floor(config, mode, lora, 16384, 1, True, path="lean", levers=Levers(int8_matmul="dequantized"))
    assert lever["peak_bytes"] < plain["peak_bytes"]
    assert lever["levers"]["int8_matmul"] == "dequantized"
    persistent = ("weights_bytes", "lora_param_bytes", "saved_activations_bytes")
    assert {term: lever[term] for term in persistent} == {term: plain[term] for term in persistent}


def test_an_int8_cell_with_the_dequantized_matmul_records_how_it_computed():
    settings = CellSettings(mode="int8", shape="tiny-llama", path="lean", seq_len=64, batch_size=2,
                            timing_warmup=1, device="cpu", int8_matmul="dequantized",
                            lora=LoraSettings(r=4, alpha=8), train=TrainSettings(max_steps=2))
    result = run_cell(settings)
    plain = run_cell(dataclasses.replace(settings, int8_matmul="llm-int8"))
    assert result["status"] == "ok" and result["settings"]["int8_matmul"] == "dequantized"
    assert result["int8_matmul_dtype"] == "bfloat16" and plain["int8_matmul_dtype"] == "float16"
    assert result["int8_outliers"] is None
    assert result["training"]["losses"] == plain["training"]["losses"]  # a CPU: bitsandbytes' own path


@pytest.mark.gpu
def test_the_dequantized_int8_matmul_on_cuda_trains_like_llm_int8_in_less_memory():
    """Llama-3.2-1B shape in int8 at 1 x 4,096 tokens on the lean path: the dequantized matmul's loss is LLM.int8's
    but for the input's int8 rounding, its training peak no higher, and within the memory model's target of its
    own prediction."""
    settings = CellSettings(mode="int8", shape="Llama-3.2-1B", path="lean", seq_len=4096, batch_size=1,
                            timing_warmup=1, device="cuda", train=TrainSettings(max_steps=2))
    plain = run_cell(settings)
    lever = run_cell(dataclasses.replace(settings, int8_matmul="dequantized"))
    assert lever["int8_matmul_dtype"] == "bfloat16" and lever["int8_outliers"] is None
    plain_peak = plain["predicted_vs_measured"]["training_peak"]
    lever_peak = lever["predicted_vs_measured"]["training_peak"]
    assert lever_peak["measured_bytes"] <= plain_peak["measured_bytes"]
    assert 0.9 <= lever_peak["ratio"] <= 1.10
    assert lever["training"]["losses"] == pytest.approx(plain["training"]["losses"], rel=1e-2)
