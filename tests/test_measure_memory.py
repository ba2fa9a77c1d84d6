"""Weight footprint (bytes as stored, quantization constants included) and the memory snapshot."""

from __future__ import annotations

import math
import mmap

import pytest
import torch

from tiny import make_model_folder
from qlora_core.measure.memory import cap_memory, memory_snapshot, reset_peak, tensor_bytes, weight_footprint
from qlora_core.models import load_model, resolve_model
from qlora_core.backends.bitsandbytes import BNB_4BIT_BLOCKSIZE, BNB_DOUBLE_QUANT_BLOCKSIZE
from qlora_core.modes import get_mode

CPU = torch.device("cpu")
FLOAT32_BYTES = 4
#: bitsandbytes' look-up tables, one copy per quantized layer (float32): the 4-bit code has 2**4 entries, the
#: 8-bit code of double-quantized absmax constants 2**8.
CODE_4BIT_BYTES = 2**4 * FLOAT32_BYTES
CODE_8BIT_BYTES = 2**8 * FLOAT32_BYTES


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory):
    """One decoder layer 256 wide, tied embeddings: layers big enough (32k-131k weights) that double
    quantization's saving on absmax outweighs its extra 1 KiB table a layer, which the tiny model's are not."""
    folder = make_model_folder(
        tmp_path_factory.mktemp("models") / "wide-tied", hidden_size=256, num_hidden_layers=1,
        intermediate_size=512, tie_word_embeddings=True,
    )
    return resolve_model(str(folder))


def quantized_linear_numels(source) -> list[int]:
    """Weights of every linear layer the 8-/4-bit modes quantize (all but the output head), from a bf16 load."""
    model = load_model(source, get_mode("bf16"), CPU)
    return [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def expected_4bit_bytes(numels: list[int], double_quant: bool) -> tuple[int, int]:
    """(packed data bytes, constant bytes) by bitsandbytes' block arithmetic: two weights a byte; one float32
    absmax per block of 64, or with double quant one uint8 absmax per block plus a float32 absmax per 256
    blocks and a float32 offset, and the code tables."""
    data = constants = 0
    for n in numels:
        blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
        data += n // 2
        constants += CODE_4BIT_BYTES
        if double_quant:
            constants += blocks * 1 + math.ceil(blocks / BNB_DOUBLE_QUANT_BLOCKSIZE) * FLOAT32_BYTES
            constants += FLOAT32_BYTES + CODE_8BIT_BYTES
        else:
            constants += blocks * FLOAT32_BYTES
    return data, constants


def buffer_bytes(model) -> int:
    return sum(tensor_bytes(b) for b in {b.data_ptr(): b for b in model.buffers()}.values())


@pytest.mark.parametrize("which", ["tiny", "wide-tied"])
def test_bf16_is_two_bytes_per_parameter(tiny_source, wide_source, which):
    source = tiny_source if which == "tiny" else wide_source
    model = load_model(source, get_mode("bf16"), CPU)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    footprint = weight_footprint(model)
    assert footprint["total_params"] == n_params
    assert footprint["weights_bytes"] == 2 * n_params + buffer_bytes(model)  # rotary tables are float32 buffers
    assert footprint["quantized_bytes"] == footprint["quant_constants_bytes"] == footprint["quantized_params"] == 0
    assert footprint["bits_per_quantized_param"] is None
    if which == "wide-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
        state_dict_numel = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
        assert state_dict_numel > n_params  # a naive count would see the tied matrix twice


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_4bit_bytes_follow_block_arithmetic(wide_source, name):
    mode = get_mode(name)
    numels = quantized_linear_numels(wide_source)
    footprint = weight_footprint(load_model(wide_source, mode, CPU))
    data, constants = expected_4bit_bytes(numels, mode.double_quant)
    n = sum(numels)
    assert footprint["quantized_params"] == n
    assert footprint["quantized_bytes"] == data == n // 2
    assert footprint["quant_constants_bytes"] == constants
    assert footprint["bits_per_quantized_param"] == pytest.approx(8 * (data + constants) / n)

    # the headline figures, before the per-layer code tables: 4 + 32/64 = 4.5 bits, or with double quant
    # 4 + 8/64 + 32/(64*256) = 4.127 bits (layers here are whole multiples of 64*256 weights)
    tables = len(numels) * (CODE_4BIT_BYTES + (FLOAT32_BYTES + CODE_8BIT_BYTES if mode.double_quant else 0))
    headline = 4 + 8 / BNB_4BIT_BLOCKSIZE + 32 / (BNB_4BIT_BLOCKSIZE * BNB_DOUBLE_QUANT_BLOCKSIZE) \
        if mode.double_quant else 4 + 32 / BNB_4BIT_BLOCKSIZE
    assert 8 * (data + constants - tables) / n == pytest.approx(headline, rel=1e-12)
    assert footprint["bits_per_quantized_param"] == pytest.approx(headline + 8 * tables / n)


def test_tiny_model_4bit_bytes(tiny_source):
    numels = quantized_linear_numels(tiny_source)
    footprint = weight_footprint(load_model(tiny_source, get_mode("nf4"), CPU))
    data, constants = expected_4bit_bytes(numels, double_quant=False)
    assert (footprint["quantized_bytes"], footprint["quant_constants_bytes"]) == (data, constants)


def test_double_quant_saves_constants(wide_source):
    plain = weight_footprint(load_model(wide_source, get_mode("nf4"), CPU))
    nested = weight_footprint(load_model(wide_source, get_mode("nf4-dq"), CPU))
    assert nested["quant_constants_bytes"] < plain["quant_constants_bytes"]
    assert nested["quantized_bytes"] == plain["quantized_bytes"]
    assert nested["unquantized_bytes"] == plain["unquantized_bytes"]
    assert nested["bits_per_quantized_param"] < plain["bits_per_quantized_param"]


def test_4bit_keeps_unquantized_modules_in_compute_dtype(wide_source):
    bf16 = weight_footprint(load_model(wide_source, get_mode("bf16"), CPU))
    nf4 = weight_footprint(load_model(wide_source, get_mode("nf4"), CPU))
    n = sum(quantized_linear_numels(wide_source))
    # everything but the quantized linears (embeddings/head, norms, buffers) is stored as in bf16
    assert nf4["unquantized_bytes"] == bf16["weights_bytes"] - 2 * n
    assert nf4["total_params"] == bf16["total_params"]


def test_int8_is_one_byte_per_weight_plus_row_scales(wide_source):
    model = load_model(wide_source, get_mode("int8"), CPU)
    linears = [m for n, m in model.named_modules() if hasattr(m, "in_features") and n != "lm_head"]
    n = sum(m.in_features * m.out_features for m in linears)
    footprint = weight_footprint(model)
    assert footprint["quantized_params"] == n
    assert footprint["quantized_bytes"] == n
    assert footprint["quant_constants_bytes"] == sum(FLOAT32_BYTES * m.out_features for m in linears)


def test_memory_snapshot_on_cpu():
    reset_peak(CPU)  # a no-op on CPU: the RSS peak is the process's lifetime peak
    snapshot = memory_snapshot(CPU)
    assert snapshot["kind"] == "cpu_rss"
    assert snapshot["rss_bytes"] > 0
    assert snapshot["peak_rss_bytes"] >= snapshot["rss_bytes"] * 0.99  # two reads, a moment apart


def test_memory_snapshot_sees_an_allocation():
    before = memory_snapshot(CPU)
    # 64 MiB of anonymous pages mapped from the kernel and each one written: new resident memory whatever the
    # heap holds. (A torch tensor, and even a new 64 MiB bytes object, may land on pages an earlier test freed
    # but malloc kept resident, and leave RSS unchanged: seen after tests/test_cell.py.)
    block = mmap.mmap(-1, 64 * 2**20)
    for offset in range(0, len(block), mmap.PAGESIZE):
        block[offset] = 1
    after = memory_snapshot(CPU)
    assert after["rss_bytes"] - before["rss_bytes"] > 32 * 2**20
    assert after["peak_rss_bytes"] >= after["rss_bytes"] * 0.99
    block.close()


@pytest.mark.gpu
def test_memory_snapshot_on_cuda():
    device = torch.device("cuda")
    reset_peak(device)
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    snapshot = memory_snapshot(device)
    assert snapshot["kind"] == "cuda"
    assert snapshot["allocated_bytes"] >= block.numel()
    assert snapshot["peak_allocated_bytes"] >= snapshot["allocated_bytes"]
    assert snapshot["reserved_bytes"] >= snapshot["allocated_bytes"]
    del block


@pytest.mark.parametrize("device, index", [(torch.device("cuda"), 0), (torch.device("cuda:1"), 1)])
@pytest.mark.parametrize("cap, fraction", [(25, 0.25), (None, 1.0), (400, 1.0)])
def test_cap_memory_sets_the_fraction_of_the_numbered_device(monkeypatch, device, index, cap, fraction):
    """torch's memory fraction takes a numbered device (``cuda`` alone is refused), so the cap names it; no cap,
    or one beyond the device, lifts it. The CUDA calls are stood in for, with torch's own device check."""
    from types import SimpleNamespace

    from torch.cuda._utils import _get_device_index

    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=100 * (1 + _get_device_index(device))))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda share, device: calls.append((share, _get_device_index(device))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    cap_memory(device, None if cap is None else cap * (1 + index))
    # the cache is emptied before the cap is set: cached blocks would otherwise serve allocations beyond it
    assert calls == ["empty_cache", (fraction, index)]
    cap_memory(torch.device("cpu"), 25)
    assert len(calls) == 2  # nothing to cap off CUDA
