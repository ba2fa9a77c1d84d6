"""The analytic memory floor against what tiny models actually hold: weights, adapters, optimizer state and the
tensors autograd saves for backward, term by term; and its behaviour at real sizes."""

from __future__ import annotations

import pytest
import torch

from tiny import mode_params

from qlora_core.backends.bitsandbytes import four_bit_bytes
from qlora_core.lora import LoraSettings, parameter_counts
from qlora_core.measure.floor import (PHASE_COMPONENTS, memory_floor, phase_components,
                                      predicted_vs_measured)
from qlora_core.measure.memory import weight_footprint
from qlora_core.models import load_config, load_model, prepare_for_training
from qlora_core.modes import MODES, get_mode
from qlora_core.optimizers import OPTIMIZERS
from qlora_core.paths import PATHS, attach_adapters, loss_function
from qlora_core.shapes import build_shape_model, shape_config
from qlora_core.trainer import LoraTrainer, TrainSettings
from qlora_core.units import GIB

CPU = torch.device("cpu")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BATCH, SEQ = 2, 24
FLOOR_SHAPES = ("tiny-llama", "tiny-bloom")


def floor(shape: str, mode: str, path: str, checkpointing: bool = True, seq_len: int = SEQ, lora=LORA, **kw):
    config = shape_config(shape) if isinstance(shape, str) else shape
    return memory_floor(config, get_mode(mode), lora, seq_len, BATCH, checkpointing, path=path, **kw)


def adapted(shape: str, mode: str, path: str, checkpointing: bool):
    mode_ = get_mode(mode)
    model = build_shape_model(shape, mode_, CPU)
    # the adapters as the path runs them: the lean path's take their input uncast (paths.lean_adapters)
    return attach_adapters(prepare_for_training(model, mode_, gradient_checkpointing=checkpointing, path=path), LORA,
                           path)


def saved_tensor_bytes(model, path: str) -> int:
    """Bytes of every distinct storage autograd saves for backward in one forward (parameters excluded)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss_function(path)(model, ids)
    return sum(saved.values())


# --- weights and adapters: exact ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", mode_params(MODES))
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2", "tiny-bloom"])
def test_weights_prediction_equals_the_built_models_footprint(shape, mode):
    predicted = floor(shape, mode, "lean")
    footprint = weight_footprint(build_shape_model(shape, get_mode(mode), CPU))
    for key in ("weights_bytes", "quantized_bytes", "quant_constants_bytes", "unquantized_bytes"):
        assert predicted[key] == footprint[key], key
    assert predicted["after_load_bytes"] == footprint["weights_bytes"]


@pytest.mark.parametrize("mode", ["bf16", "int8", "nf4-dq"])
def test_weights_prediction_equals_a_loaded_checkpoint(tiny_source, mode):
    predicted = memory_floor(load_config(tiny_source), get_mode(mode), LORA, SEQ, BATCH, True)
    assert predicted["weights_bytes"] == weight_footprint(load_model(tiny_source, get_mode(mode), CPU))["weights_bytes"]


def test_four_bit_bytes_headline_rates():
    """4.5 bits a weight plain, 4.127 with double quantization, for a layer of whole blocks (tables aside)."""
    n = 64 * 256 * 64
    data, constants = four_bit_bytes(n, double_quant=False)
    assert 8 * (data + constants - 64) / n == 4.5
    data, constants = four_bit_bytes(n, double_quant=True)
    assert 8 * (data + constants - 64 - 4 - 1024) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", mode_params(["bf16", "int8", "nf4-dq", "fp4", "hqq4"]))
@pytest.mark.parametrize("shape", FLOOR_SHAPES)
def test_setup_adapters_and_optimizer_state_are_exact(shape, mode, path):
    """After set-up the tensors are the stored weights, the path's fp32 upcasts (none for HQQ, which peft leaves
    in its dtypes) and the fp32 adapters; one AdamW step adds two fp32 moments a trainable value."""
    predicted = floor(shape, mode, path)
    model = adapted(shape, mode, path, checkpointing=True)
    assert weight_footprint(model)["weights_bytes"] == predicted["after_setup_bytes"]
    assert parameter_counts(model)["trainable_params"] == predicted["lora_params"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() * p.element_size() for p in trainable) == predicted["lora_param_bytes"]
    assert {p.dtype for p in trainable} == {torch.float32}
    upcasts = path == "reference" and get_mode(mode).is_quantized and get_mode(mode).backend != "hqq"
    assert (predicted["upcast_bytes"] > 0) is upcasts

    batches = iter(lambda: torch.zeros(BATCH, SEQ, dtype=torch.long), None)
    trainer = LoraTrainer(model, batches, TrainSettings(max_steps=1), get_mode(mode).torch_compute_dtype)
    trainer.train(1)
    moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert sum(t.numel() * t.element_size() for t in moments) == predicted["optimizer_state_bytes"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_state_is_predicted_exactly(optimizer):
    """Each optimizer the trainer offers has its state predicted to the byte after one step (on CPU the paged
    ones fall back to ordinary tensors of the same sizes); bitsandbytes' quantization maps are one table shared
    by every tensor, so they are left out."""
    predicted = floor("tiny-llama", "nf4-dq", "lean", optimizer=optimizer)
    model = adapted("tiny-llama", "nf4-dq", "lean", checkpointing=True)
    batches = iter(lambda: torch.zeros(BATCH, SEQ, dtype=torch.long), None)
    settings = TrainSettings(max_steps=1, optimizer=optimizer)
    trainer = LoraTrainer(model, batches, settings, get_mode("nf4-dq").torch_compute_dtype)
    trainer.train(1)
    state = [t for s in trainer.optimizer.state.values() for k, t in s.items()
             if torch.is_tensor(t) and k != "step" and not k.startswith("qmap")]
    assert sum(t.numel() * t.element_size() for t in state) == predicted["optimizer_state_bytes"]


# --- saved activations: per-layer accounting, checked against autograd -----------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", mode_params(["bf16", "int8", "nf4-dq", "hqq4"]))
@pytest.mark.parametrize("shape", FLOOR_SHAPES)
def test_saved_activations_match_autograds_saved_tensors(shape, mode, path):
    """Without checkpointing, the per-layer accounting, the head's and the loss's saved tensors add up to what
    autograd saves, tensor for tensor (HQQ's own matmul's inputs on the reference path included). The prediction
    may exceed it by the first layer's attention-input adapters' weight casts (autograd skips them: their input,
    from the frozen embeddings, needs no gradient) and is never below it."""
    predicted = floor(shape, mode, path, checkpointing=False, device_type="cpu")
    measured = saved_tensor_bytes(adapted(shape, mode, path, checkpointing=False), path)
    total = predicted["saved_activations_bytes"] + predicted["head_saved_bytes"] + predicted["loss_saved_bytes"]
    config = shape_config(shape)
    attention_input_casts = 3 * 2 * LORA.r * config.hidden_size  # q, k, v A matrices in bf16 (BLOOM: one fused)
    assert 0 <= total - measured <= attention_input_casts


def int8_held_input_bytes(model, path: str) -> int:
    """Bytes of every distinct storage bitsandbytes' int8 matmuls keep as ctx attributes after one forward:
    ``ctx.A`` (MatMul8bitFp, the CPU training path) or ``ctx.tensors`` (MatMul8bitLt: CAt, subA, A)."""
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_function(path)(model, ids)
    held: dict[int, int] = {}
    seen, nodes = set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("MatMul8bit"):
            kept = getattr(node, "tensors", None) or (node.A,)
            for tensor in (t for t in kept if t is not None):
                held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(held.values())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", FLOOR_SHAPES)
def test_int8_held_inputs_match_what_bitsandbytes_keeps(shape, path):
    """bitsandbytes' int8 matmuls keep their inputs outside autograd's saved tensors, so checkpointing cannot drop
    them: under checkpointing, after one forward, what they hold is the prediction, byte for byte (no outliers
    on CPU, whose training path has none). The lean path's int8 linears keep none (``paths.FrozenInt8Matmul``)."""
    predicted = floor(shape, "int8", path, checkpointing=True, device_type="cpu")
    held = int8_held_input_bytes(adapted(shape, "int8", path, checkpointing=True), path)
    assert predicted["int8_held_inputs_bytes"] == held
    assert (held > 0) == (path == "reference")
    assert floor(shape, "nf4-dq", path, device_type="cpu")["int8_held_inputs_bytes"] == 0


def test_int8_outlier_columns_add_their_copies():
    """Each int8 linear keeps its own copy of its input's outlier columns: ``columns`` values a token, at the
    input's dtype, for every int8 layer."""
    config = shape_config("tiny-llama")
    plain = floor("tiny-llama", "int8", "reference")
    with_outliers = floor("tiny-llama", "int8", "reference", int8_outlier_columns={"down_proj": 10, "o_proj": 4})
    residual, compute = plain["precision_bytes"]["residual"], plain["precision_bytes"]["compute"]
    extra = config.num_hidden_layers * BATCH * SEQ * (10 * residual + 4 * compute)
    assert with_outliers["int8_held_inputs_bytes"] - plain["int8_held_inputs_bytes"] == extra
    assert with_outliers["int8_outlier_columns"] == {"down_proj": 10, "o_proj": 4}


@pytest.mark.parametrize("path", PATHS)
def test_memory_grows_with_sequence_length(path):
    previous = None
    for seq_len in (64, 128, 256):
        current = floor("tiny-llama", "nf4-dq", path, seq_len=seq_len)
        if previous:
            for key in ("saved_activations_bytes", "layer_activation_bytes", "peak_bytes"):
                assert current[key] > previous[key], key
            assert current["weights_bytes"] == previous["weights_bytes"]
        previous = current


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["bf16", "nf4-dq"])
def test_checkpointing_reduces_saved_activations(mode, path):
    config = shape_config("Llama-3.1-8B")
    kept = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, False, path=path)
    checkpointed = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, True, path=path)
    assert checkpointed["saved_activations_bytes"] < kept["saved_activations_bytes"] / 10
    assert checkpointed["peak_bytes"] < kept["peak_bytes"]


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["bf16", "int8", "nf4-dq", "fp4"])
@pytest.mark.parametrize("shape", [*FLOOR_SHAPES, "Llama-3.1-8B"])
def test_phase_components_add_up_to_every_phase(shape, mode, path, checkpointing):
    """The memory picture stacks these components: each phase's must sum to its predicted bytes exactly."""
    seq_len, batch = (1024, 4) if shape == "Llama-3.1-8B" else (SEQ, BATCH)
    predicted = memory_floor(shape_config(shape), get_mode(mode), LoraSettings(r=16), seq_len, batch,
                             checkpointing, path=path)
    for phase, phase_bytes in predicted["phase_peak_bytes"].items():
        parts = phase_components(predicted, phase)
        assert list(parts) == list(PHASE_COMPONENTS)
        assert min(parts.values()) >= 0 and sum(parts.values()) == phase_bytes, phase
    assert sum(phase_components(predicted, predicted["peak_phase"]).values()) == predicted["peak_bytes"]


def test_phase_components_refuse_an_unknown_phase():
    with pytest.raises(ValueError, match="unknown phase"):
        phase_components(floor("tiny-llama", "bf16", "lean"), "warm-up")


# --- real sizes ---------------------------------------------------------------------------------------------------

#: Measured on one H200 (issue 5): Llama-3.1-8B shape, r=16 all-linear, 4 x 1024 tokens a step, gradient
#: checkpointing, train mode, the usual recipe (our reference path): GiB after load, peak. Rounded to 0.1 GiB.
#: int8: issue 10's measurement with this harness (non-reentrant checkpointing; 38.87 GiB), its random weights
#: making every column of the MLP's intermediate an outlier (``INT8_RANDOM_OUTLIERS``).
H200_8B_REFERENCE_GIB = {"nf4-dq": (5.3, 16.7), "bf16": (None, 22.4), "int8": (None, 38.9)}
INT8_RANDOM_OUTLIERS = {"int8": {"down_proj": shape_config("Llama-3.1-8B").intermediate_size}}
#: The floor is a prediction, not a fit: it reproduces those within this fraction (measured: <= 0.6 %).
H200_8B_REL_TOL = 0.03


@pytest.mark.parametrize("mode", list(H200_8B_REFERENCE_GIB))
def test_reference_prediction_reproduces_the_h200_8b_measurements(mode):
    predicted = memory_floor(shape_config("Llama-3.1-8B"), get_mode(mode), LoraSettings(), 1024, 4, True,
                             path="reference", int8_outlier_columns=INT8_RANDOM_OUTLIERS.get(mode))
    after_load, peak = H200_8B_REFERENCE_GIB[mode]
    assert predicted["peak_bytes"] / GIB == pytest.approx(peak, rel=H200_8B_REL_TOL)
    if after_load is not None:
        assert predicted["after_load_bytes"] / GIB == pytest.approx(after_load, rel=H200_8B_REL_TOL)


@pytest.mark.parametrize("mode", ["bf16", "int8", "nf4-dq"])
def test_lean_floor_is_below_the_reference_at_8b(mode):
    config = shape_config("Llama-3.1-8B")
    lean = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, True, path="lean")
    reference = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, True, path="reference")
    assert lean["peak_bytes"] < reference["peak_bytes"]
    assert lean["logits_phase_bytes"] < reference["logits_phase_bytes"] / 5  # one 512-token chunk, not 4096
    assert lean["upcast_bytes"] == 0


def test_70b_fits_one_h200_in_4bit_and_not_in_bf16():
    config = shape_config("Llama-3.1-70B")
    nf4 = memory_floor(config, get_mode("nf4-dq"), LoraSettings(), 1024, 4, True, path="lean")
    bf16 = memory_floor(config, get_mode("bf16"), LoraSettings(), 1024, 4, True, path="lean")
    assert nf4["peak_bytes"] < 60 * GIB
    assert bf16["weights_bytes"] > 130 * GIB and bf16["peak_bytes"] > 140 * GIB


def test_path_gap_names_where_the_reference_spends_more():
    """At 8B in nf4-dq the reference path's extra memory is its fp32 upcasts, its fp32 residual stream (twice
    the checkpoints) and its full-vocabulary loss."""
    from qlora_core.measure.floor import path_gap

    config, mode = shape_config("Llama-3.1-8B"), get_mode("nf4-dq")
    reference = memory_floor(config, mode, LoraSettings(), 1024, 4, True, path="reference")
    lean = memory_floor(config, mode, LoraSettings(), 1024, 4, True, path="lean")
    gap = path_gap(reference, lean)
    assert gap["weights_bytes"] == gap["lora_param_bytes"] == gap["optimizer_state_bytes"] == 0
    assert gap["upcast_bytes"] == reference["upcast_bytes"] > 1.5 * GIB  # embeddings and head, 2 x 0.5B values
    assert gap["saved_activations_bytes"] == lean["saved_activations_bytes"]  # 4 bytes a value instead of 2
    assert gap["logits_phase_bytes"] > 5 * GIB
    assert gap["peak_bytes"] == reference["peak_bytes"] - lean["peak_bytes"] > 8 * GIB


@pytest.mark.parametrize("mode", ["bf16", "int8", "nf4-dq", "fp4"])
def test_the_true_floor_is_the_least_any_path_holds(mode):
    """Both paths' predictions sit on or above one true floor; the lean path under checkpointing is that floor,
    int8 included (its int8 linears keep no inputs)."""
    config = shape_config("Llama-3.1-8B")
    floors = [memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, checkpointing, path=path)
              for path in PATHS for checkpointing in (True, False)]
    assert len({f["true_floor_bytes"] for f in floors}) == 1
    for predicted in floors:
        assert predicted["true_floor_bytes"] <= predicted["peak_bytes"]
    lean = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, True, path="lean")
    assert lean["true_floor_bytes"] == lean["peak_bytes"]
    reference = memory_floor(config, get_mode(mode), LoraSettings(), 1024, 4, True, path="reference")
    assert (reference["int8_held_inputs_bytes"] > 0) == (mode == "int8")


def test_the_peak_is_compared_with_the_true_floor_too():
    predicted = floor("tiny-llama", "nf4-dq", "reference")
    memory = {kind: {"kind": "cuda", "allocated_bytes": 0, "peak_allocated_bytes": 0} for kind in ("before_load",)}
    memory |= {"after_load": {"kind": "cuda", "allocated_bytes": predicted["after_load_bytes"]},
               "after_setup": {"kind": "cuda", "allocated_bytes": predicted["after_setup_bytes"]},
               "training_peak": {"kind": "cuda", "peak_allocated_bytes": predicted["peak_bytes"]}}
    rows = predicted_vs_measured(predicted, memory, 0, 0)
    assert rows["training_peak"]["ratio"] == 1.0
    assert rows["true_floor"]["predicted_bytes"] == predicted["true_floor_bytes"]
    assert rows["true_floor"]["ratio"] == predicted["peak_bytes"] / predicted["true_floor_bytes"] > 1
