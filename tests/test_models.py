"""Model sources, length checks, the bitsandbytes requirement, loading and preparing a base for LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tiny import tiny_cell_settings
from qlora_core.backends import ModeUnavailableError, require
from qlora_core.backends.bitsandbytes import disable_cpu_4bit_repacking
from qlora_core.lora import LoraSettings, attach_lora
from qlora_core.models import (
    ModelSourceError,
    check_sequence_length,
    load_config,
    load_model,
    max_sequence_length,
    prepare_for_training,
    resolve_model,
)
from qlora_core.modes import MODES, get_mode

CPU = torch.device("cpu")
#: The modes of the bitsandbytes backend, a dependency of the package (the optional ones: test_backend_hqq.py).
BITSANDBYTES = [m for m in MODES.values() if m.backend == "bitsandbytes"]


def linear4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


# --- sources -------------------------------------------------------------------------------------------------


def test_local_folder_source_reads_provenance(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    assert source.name_or_path == str(tiny_model_dir)
    assert source.label == tiny_model_dir.name
    assert source.provenance == {"source": "random weights", "seed": 0}
    assert source.describe()["provenance"] == source.provenance


@pytest.mark.parametrize("missing", ["/definitely/not/a/model", "./not-here", "a/b/c"])
def test_missing_model_path_raises(missing):
    with pytest.raises(ModelSourceError, match="no such local folder"):
        resolve_model(missing)


def test_owner_name_is_taken_as_hub_id():
    source = resolve_model("someone/some-model")
    assert source.label == "some-model"
    assert source.provenance == {"source": "hub:someone/some-model"}


def test_folder_without_config_raises(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unloadable_hub_id_raises_model_source_error():
    # HF_HUB_OFFLINE=1 (conftest): the config cannot be fetched, which must surface as our error type.
    with pytest.raises(ModelSourceError, match="cannot load the config"):
        load_config(resolve_model("nobody-here/no-such-model"))


# --- sequence length ------------------------------------------------------------------------------------------


def test_sequence_length_limit_comes_from_config(tiny_source):
    config = load_config(tiny_source)
    limit = max_sequence_length(config)
    assert limit == config.max_position_embeddings == 256
    check_sequence_length(config, limit)  # the limit itself is fine
    with pytest.raises(ValueError, match="exceeds"):
        check_sequence_length(config, limit + 1)
    with pytest.raises(ValueError, match="at least 2"):
        check_sequence_length(config, 1)


@pytest.mark.parametrize("field", ["seq_len", "eval_window"])
def test_prepare_inputs_refuses_too_long_sequences(tiny_model_dir, field):
    from qlora_core.cell import prepare_inputs

    settings = tiny_cell_settings(tiny_model_dir, "bf16", **{field: 512})
    if field == "eval_window":
        settings = dataclasses.replace(settings, eval_stride=256)
    with pytest.raises(ValueError, match="exceeds the model's limit of 256"):
        prepare_inputs(settings)


# --- bitsandbytes availability --------------------------------------------------------------------------------


@pytest.fixture
def without_bitsandbytes(hide_package):
    hide_package("bitsandbytes")


@pytest.mark.parametrize("mode", BITSANDBYTES, ids=[m.name for m in BITSANDBYTES])
def test_quantized_mode_without_bitsandbytes_is_unavailable(without_bitsandbytes, tiny_source, mode):
    with pytest.raises(ModeUnavailableError, match="needs bitsandbytes"):
        require(mode)
    with pytest.raises(ModeUnavailableError):
        load_model(tiny_source, mode, CPU)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_half_precision_modes_load_without_bitsandbytes(without_bitsandbytes, tiny_source, name):
    """With bitsandbytes missing, the unquantized modes still load, every weight in the mode's dtype."""
    mode = get_mode(name)
    assert require(mode) is None
    model = load_model(tiny_source, mode, CPU)
    assert {p.dtype for p in model.parameters()} == {mode.torch_compute_dtype}


# --- loading ----------------------------------------------------------------------------------------------------


def test_load_stores_weights_as_the_mode_says(tiny_source):
    bf16 = load_model(tiny_source, get_mode("bf16"), CPU)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    nf4 = load_model(tiny_source, get_mode("nf4"), CPU)
    layers = linear4bit_layers(nf4)
    # every linear layer of the 2 decoder layers (q, k, v, o, gate, up, down), not the output head
    assert len(layers) == 2 * 7
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert type(nf4.lm_head) is torch.nn.Linear


def test_disable_cpu_4bit_repacking_sets_flag_on_every_layer(tiny_source):
    model = load_model(tiny_source, get_mode("nf4-dq"), CPU)
    layers = linear4bit_layers(model)
    assert layers and all(layer.support_avx512bf16_for_cpu is False for layer in layers)  # load_model does it
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    disable_cpu_4bit_repacking(model)
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)


def test_disable_cpu_4bit_repacking_ignores_unquantized_models(tiny_source):
    model = load_model(tiny_source, get_mode("bf16"), CPU)
    disable_cpu_4bit_repacking(model)  # no 4-bit layer: nothing to do, no error
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "support_avx512bf16_for_cpu")


def lora_gradients(source, *, eval_forward_first: bool) -> dict[str, torch.Tensor]:
    mode = get_mode("nf4")
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model = load_model(source, mode, CPU)
    if eval_forward_first:  # what evaluating "before" does in a cell
        model.eval()
        with torch.no_grad():
            model(input_ids=batch)
    model = prepare_for_training(model, mode, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = attach_lora(model, LoraSettings(r=4, dropout=0.0))
    with torch.autocast("cpu", dtype=mode.torch_compute_dtype):
        model(input_ids=batch, labels=batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_eval_forward_before_training_leaves_4bit_gradients_intact(tiny_source):
    """The CPU repacking hazard: without the flag, gradients after a no-grad eval forward come out wrong."""
    fresh = lora_gradients(tiny_source, eval_forward_first=False)
    after_eval = lora_gradients(tiny_source, eval_forward_first=True)
    assert fresh.keys() == after_eval.keys()
    assert any(g.abs().sum() > 0 for g in fresh.values())
    for name in fresh:
        torch.testing.assert_close(after_eval[name], fresh[name], rtol=0, atol=0, msg=name)


# --- preparing for training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prepare_bf16_keeps_dtype_and_trains(tiny_source, checkpointing):
    mode = get_mode("bf16")
    model = prepare_for_training(load_model(tiny_source, mode, CPU), mode, gradient_checkpointing=checkpointing)
    assert model.training and all(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no silent fp32 upcast
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing is checkpointing
    if checkpointing:
        assert model.config.use_cache is False


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_prepare_quantized_upcasts_norms(tiny_source, name):
    mode = get_mode(name)
    loaded = load_model(tiny_source, mode, CPU)
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    model = prepare_for_training(loaded, mode, gradient_checkpointing=True)
    assert model.training
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert len(norms) == 2 * 2 + 1  # input + post-attention norm per layer, and the final norm
    assert all(norm.weight.dtype == torch.float32 for norm in norms)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_gradient_checkpointing
