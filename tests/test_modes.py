"""The mode registry: lookup errors, self-description, explicit backend configs, registering variants."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qlora_core import backends
from qlora_core.backends import ModeUnavailableError
from qlora_core.backends.bitsandbytes import BNB_4BIT_BLOCKSIZE, BNB_DOUBLE_QUANT_BLOCKSIZE
from qlora_core.modes import (
    BASELINE_MODE,
    MODES,
    Mode,
    UnknownModeError,
    get_mode,
    installed_modes,
    parse_modes,
    register,
)

FOUR_BIT = [m for m in MODES.values() if m.is_4bit]
#: The registry as the package defines it, taken when this module is collected (before any test registers).
BUILT_IN_MODES = dict(MODES)


@pytest.fixture
def restore_registry():
    """Whatever a test registers is removed afterwards, so the registry every other test sees is the real one."""
    before = dict(MODES)
    yield
    MODES.clear()
    MODES.update(before)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(UnknownModeError) as error:
        get_mode("nf3")
    message = str(error.value)
    assert "nf3" in message
    for name in MODES:
        assert name in message
    assert isinstance(error.value, ValueError)  # callers catching ValueError (the CLI) see it too


def test_parse_modes():
    assert [m.name for m in parse_modes("bf16, nf4-dq")] == ["bf16", "nf4-dq"]
    assert [m.name for m in parse_modes(["int8"])] == ["int8"]
    assert parse_modes("all") == installed_modes() == [m for m in MODES.values() if backends.installed(m)]
    with pytest.raises(UnknownModeError):
        parse_modes("bf16,bogus")


@pytest.fixture
def without_hqq(hide_package):
    """An installation without the optional hqq package."""
    hide_package("hqq")


def test_all_means_the_modes_this_installation_can_run(without_hqq):
    """Without hqq, 'all' (and the sweep's default) is every other mode, and the sweep names what it left out; a
    mode named explicitly is still taken, and refused with what it needs when it is run."""
    from qlora_core.cli import default_modes, not_installed_line

    hqq_modes = [m.name for m in MODES.values() if m.backend == "hqq"]
    assert hqq_modes == ["hqq4", "hqq8"]
    assert [m.name for m in parse_modes("all")] == [name for name in MODES if name not in hqq_modes]
    assert [m.name for m in default_modes("gpu")] == [m.name for m in parse_modes("all")]
    assert not_installed_line() == ("left out (not installed: hqq): hqq4, hqq8; README.md says how to install "
                                    "them")
    (hqq4,) = parse_modes("hqq4")
    with pytest.raises(ModeUnavailableError, match="mode 'hqq4' needs hqq: pip install hqq"):
        backends.require(hqq4)


@pytest.mark.parametrize("names", ["", ",", " ", " , ", []])
def test_parse_modes_refuses_an_empty_list(names):
    with pytest.raises(ValueError, match="no modes given"):
        parse_modes(names)


def test_parse_modes_refuses_a_mode_given_twice():
    with pytest.raises(ValueError, match="given twice: bf16"):
        parse_modes("bf16,nf4, bf16")


def test_baseline_is_registered_and_unquantized():
    assert not get_mode(BASELINE_MODE).is_quantized


@pytest.mark.parametrize("mode", MODES.values(), ids=list(MODES))
def test_describe_is_complete_json(mode):
    description = mode.describe()
    field_names = {f.name for f in dataclasses.fields(Mode)}
    assert field_names <= description.keys()
    assert description["name"] == mode.name
    assert description["quantized"] == mode.is_quantized
    assert json.loads(json.dumps(description)) == description  # plain JSON, nothing lost
    if mode.is_4bit:
        assert description["blocksize"] == BNB_4BIT_BLOCKSIZE
        expected_dq = BNB_DOUBLE_QUANT_BLOCKSIZE if mode.double_quant else None
        assert description["double_quant_blocksize"] == expected_dq
    else:
        assert "blocksize" not in description


@pytest.mark.parametrize("mode", FOUR_BIT, ids=[m.name for m in FOUR_BIT])
def test_4bit_quantization_config_is_explicit(mode):
    config = mode.quantization_config()
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == mode.weight_format
    assert config.bnb_4bit_use_double_quant is mode.double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16  # not transformers' float32 default
    assert config.bnb_4bit_quant_storage == torch.uint8
    assert "lm_head" in config.llm_int8_skip_modules


def test_int8_quantization_config_is_explicit():
    mode = get_mode("int8")
    config = mode.quantization_config()
    assert config.load_in_8bit and not config.load_in_4bit
    assert config.llm_int8_threshold == mode.int8_threshold == 6.0
    assert isinstance(config.llm_int8_threshold, float)
    assert "lm_head" in config.llm_int8_skip_modules
    assert mode.torch_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_modes_have_no_quantization_config(name, dtype):
    mode = get_mode(name)
    assert mode.quantization_config() is None
    assert mode.load_dtype == dtype == mode.torch_compute_dtype


@pytest.mark.parametrize("name, nbits", [("hqq4", 4), ("hqq8", 8)])
def test_hqq_modes_quantize_after_loading_and_describe_their_groups(name, nbits):
    """transformers loads an HQQ mode unquantized (its HqqConfig path is unusable in transformers 5): no config;
    the description says the bits, the group size and axis, bf16 compute, the head left unquantized."""
    mode = get_mode(name)
    assert mode.quantization_config() is None and mode.is_quantized and not mode.is_4bit
    description = mode.describe()
    assert (description["nbits"], description["group_size"], description["axis"]) == (nbits, 64, 1)
    assert description["quantized_after_load"] is True
    assert mode.torch_compute_dtype == mode.load_dtype == torch.bfloat16
    assert mode.skip_modules == ("lm_head",)


def test_the_4bit_pairs_differ_only_in_double_quant():
    for fmt in ("fp4", "nf4"):
        plain, nested = get_mode(fmt), get_mode(f"{fmt}-dq")
        assert dataclasses.replace(nested, name=plain.name, double_quant=False) == plain


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_format="nf4", compute_dtype="float8"), "compute dtype"),
        (dict(weight_format="bf16", compute_dtype="bfloat16", double_quant=True), "double quantization"),
        (dict(weight_format="int8", compute_dtype="bfloat16", backend="bitsandbytes"), "threshold"),
        (dict(weight_format="nf4", compute_dtype="bfloat16"), "needs a backend"),
        (dict(weight_format="bf16", compute_dtype="bfloat16", backend="bitsandbytes"), "needs a backend"),
        (dict(weight_format="nf4", compute_dtype="bfloat16", backend="gptq"), "unknown backend 'gptq'"),
        (dict(weight_format="hqq4", compute_dtype="bfloat16", backend="hqq"), "group size"),
        (dict(weight_format="nf4", compute_dtype="bfloat16", backend="bitsandbytes", group_size=64), "group size"),
        (dict(weight_format="hqq4", compute_dtype="bfloat16", backend="hqq", group_size=0), "group size"),
    ],
)
def test_invalid_mode_definitions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mode(name="bad", **kwargs)


def test_register_variant_with_replace(restore_registry):
    variant = register(dataclasses.replace(get_mode("nf4"), name="nf4-fp16", compute_dtype="float16"))
    assert get_mode("nf4-fp16") is variant
    assert parse_modes("all")[-1] is variant  # CLI choices derive from the registry
    config = variant.quantization_config()
    assert config.bnb_4bit_compute_dtype == torch.float16
    assert config.bnb_4bit_quant_type == "nf4"
    assert variant.describe()["compute_dtype"] == "float16"


def test_registered_variant_trains_without_touching_the_trainer(restore_registry, tiny_source):
    """The trainer takes a compute dtype and a model: a new mode needs no change there."""
    import itertools

    from qlora_core.lora import LoraSettings, attach_lora
    from qlora_core.models import load_model, prepare_for_training
    from qlora_core.trainer import LoraTrainer, TrainSettings

    variant = register(dataclasses.replace(get_mode("nf4"), name="nf4-fp16", compute_dtype="float16"))
    model = load_model(tiny_source, variant, torch.device("cpu"))
    model = attach_lora(prepare_for_training(model, variant, gradient_checkpointing=False), LoraSettings(r=4))
    batch = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer = LoraTrainer(model, itertools.repeat(batch), TrainSettings(max_steps=2), variant.torch_compute_dtype)
    records = trainer.train()
    assert [r.step for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in records)


def test_duplicate_registration_is_refused(restore_registry):
    original = get_mode("nf4")
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(original, compute_dtype="float16"))
    assert get_mode("nf4") is original
    register(dataclasses.replace(original, name="nf4-copy"))
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(original, name="nf4-copy"))


def test_registry_cleanup_fixture_restored_the_registry():
    """Runs after the registering tests above (file order): none of their variants leaked."""
    assert not {"nf4-fp16", "nf4-copy"} & MODES.keys()
    # the registry is back as this module found it, in order, and the CLI's '--modes all' offers exactly that
    assert list(MODES) == list(BUILT_IN_MODES)
    assert all(MODES[name] is mode for name, mode in BUILT_IN_MODES.items())
    assert [m.name for m in parse_modes("all")] == [n for n, m in BUILT_IN_MODES.items() if backends.installed(m)]
