"""Shared fixtures: an offline byte-level tokenizer, tiny random Llama folders, one ``run_cell`` result per mode.

Everything here runs on CPU without the Hugging Face Hub. Tests marked ``gpu`` skip (with a reason) where CUDA
is missing; tests marked ``slow`` run the real embedded model and are part of the default run.
"""

from __future__ import annotations

import os

# Before torch is imported anywhere: 2 threads on the 2-core machines made a small fwd+bwd ~80x slower than 1
# (shared/notes/stack-facts.md). Child processes of the sweep tests inherit these through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

#: Sizes of the tiny model every CPU test loads: 64 wide keeps 4-bit blocks (64 weights) whole.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256)
#: Settings that make ``run_cell`` on the tiny model take about a second.
TINY_CELL = dict(seq_len=32, batch_size=2, timing_warmup=1, eval_window=32, eval_stride=16, eval_max_tokens=128,
                 eval_batch_size=4, device="cpu")
TINY_STEPS = 3


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA is missing: declared once here, never inferred from an exception."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, 64 wide, byte-level vocab of 259) saved as a Hugging Face folder."""
    return make_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_source(tiny_model_dir):
    from qlora_core.models import resolve_model

    return resolve_model(str(tiny_model_dir))


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


@pytest.fixture(scope="session")
def eval_text_file(tmp_path_factory) -> Path:
    """A small evaluation text with Windows line ends (as the shared WikiText-2 copy has)."""
    path = tmp_path_factory.mktemp("eval") / "eval.raw"
    paragraphs = [" = Testing = ", " Every figure is rendered from result JSON only . ",
                  " A tiny model measures the harness , not the modes . "] * 4
    path.write_bytes("\r\n".join(paragraphs).encode())
    return path


@pytest.fixture(scope="session")
def cell_runs(tiny_model_dir, eval_text_file) -> dict[str, tuple[dict, list[dict]]]:
    """``run_cell`` on the tiny model once per mode in CELL_MODES, in this process: mode -> (result, events)."""
    from qlora_core.cell import run_cell

    runs = {}
    for mode in CELL_MODES:
        events: list[dict] = []
        settings = tiny_cell_settings(tiny_model_dir, mode, eval_text=str(eval_text_file))
        runs[mode] = (run_cell(settings, report=events.append), events)
    return runs


@pytest.fixture(scope="session")
def cell_results(cell_runs) -> dict[str, dict]:
    """mode name -> its ``run_cell`` result (see ``cell_runs``)."""
    return {mode: result for mode, (result, _) in cell_runs.items()}
