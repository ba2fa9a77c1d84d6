"""The backend seam: every quantized mode names a registered backend, and what the rest of the harness asks of a
backend comes back right for each storage, and as "not mine" for plain tensors."""

from __future__ import annotations

import pytest
import torch

from tiny import mode_params
from qlora_core import backends
from qlora_core.backends.base import Backend
from qlora_core.models import load_model
from qlora_core.modes import MODES, get_mode
from qlora_core.shapes import build_shape_model

CPU = torch.device("cpu")
QUANTIZED = [mode for mode in MODES.values() if mode.is_quantized]
#: How the memory model names each quantized format's storage (``backends.layer_storage``).
STORAGE = {"int8": "int8", "fp4": "4bit", "nf4": "4bit", "hqq4": "hqq4", "hqq8": "hqq8"}


def test_every_quantized_mode_names_a_registered_backend_and_half_precision_none():
    for mode in MODES.values():
        backend = backends.backend_of(mode)
        assert (backend is None) == (not mode.is_quantized)
        assert backend is None or isinstance(backend, Backend) and backends.BACKENDS[backend.name] is backend
    assert {mode.backend for mode in QUANTIZED} <= set(backends.BACKENDS)


@pytest.mark.parametrize("name", mode_params(m.name for m in QUANTIZED))
def test_a_built_layer_answers_for_its_storage(name):
    """The storage the memory model names, its constants and its dequantized weight, for one quantized linear
    (its one parameter with constants: bitsandbytes' ``weight``, HQQ's ``W_q``); the plain output head is
    nobody's."""
    mode = get_mode(name)
    model = build_shape_model("tiny-llama", mode, CPU)
    layer, head = model.model.layers[0].mlp.down_proj, model.lm_head
    assert backends.layer_storage(layer) == STORAGE[mode.weight_format]
    assert backends.layer_storage(head) == "dense"
    (stored,) = [p for p in layer.parameters() if backends.quant_constants(p)]
    assert not backends.quant_constants(head.weight)
    assert backends.logical_numel(stored) == layer.in_features * layer.out_features
    weight = backends.dequantized_weight(layer)
    assert weight.shape == (layer.out_features, layer.in_features) and weight.dtype == torch.float32
    data, constants = backends.backend_of(mode).stored_bytes(backends.layer_storage(layer), layer.in_features,
                                                             layer.out_features, mode)
    assert data == stored.numel() * stored.element_size()
    assert constants == sum(t.numel() * t.element_size() for t in backends.quant_constants(stored))


def test_int8_outliers_after_an_eval_forward(tiny_source):
    """bitsandbytes' int8 kernel records the outlier columns it found (CPU eval runs it; CPU training does not);
    a model without int8 linears has none."""
    model = load_model(tiny_source, get_mode("int8"), CPU)
    with torch.no_grad():
        model(input_ids=torch.arange(16).unsqueeze(0))
    found = backends.outliers(model)
    assert set(found["columns"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(0 <= share <= 1 for share in found["share"].values())
    assert backends.outliers(load_model(tiny_source, get_mode("bf16"), CPU)) is None
