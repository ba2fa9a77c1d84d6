"""Tiny offline models and settings shared by the tests (importable as ``tiny``; conftest.py cannot be imported
by name because bench/ has a conftest.py of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Sizes of the tiny model every CPU test loads: 64 wide keeps 4-bit blocks (64 weights) whole.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256)
#: Settings that make ``run_cell`` on the tiny model take about a second.
TINY_CELL = dict(seq_len=32, batch_size=2, timing_warmup=1, eval_window=32, eval_stride=16, eval_max_tokens=128,
                 eval_batch_size=4, device="cpu")
TINY_STEPS = 3


def make_tokenizer():
    """A byte-level tokenizer that needs no download: the 256 byte symbols, no merges, plus bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def llama_config(tokenizer, **sizes):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def make_model_folder(folder: Path, **overrides) -> Path:
    """Save a random Llama (TINY sizes unless overridden) with the byte-level tokenizer into ``folder``."""
    from qlora_core.models import save_random_model

    tokenizer = make_tokenizer()
    return save_random_model(llama_config(tokenizer, **{**TINY, **overrides}), folder, tokenizer)


def tiny_cell_settings(model_dir: Path, mode: str, **overrides):
    from qlora_core.cell import CellSettings
    from qlora_core.lora import LoraSettings
    from qlora_core.trainer import TrainSettings

    values = {**TINY_CELL, **overrides}
    return CellSettings(
        mode=mode, model=str(model_dir), lora=LoraSettings(r=4, alpha=8),
        train=TrainSettings(max_steps=TINY_STEPS, learning_rate=1e-2), **values,
    )


#: Modes whose run_cell results the cell and report tests share (the baseline plus 4-bit with/without dq).
CELL_MODES = ("bf16", "nf4", "nf4-dq")


def mode_params(names) -> list:
    """pytest parameters of the registered modes called ``names``, the HQQ ones marked ``hqq`` (skipped where the
    optional package is missing: conftest.py)."""
    from qlora_core.modes import get_mode

    return [pytest.param(name, id=name, marks=[pytest.mark.hqq] if get_mode(name).backend == "hqq" else [])
            for name in names]
