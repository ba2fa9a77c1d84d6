"""Shared fixtures: an offline byte-level tokenizer, tiny random Llama folders, one ``run_cell`` result per mode.

Everything here runs on CPU without the Hugging Face Hub. Tests marked ``gpu`` skip (with a reason) where CUDA
is missing, tests marked ``hqq`` where the optional hqq package is; tests marked ``slow`` run the real embedded
model and are part of the default run.
"""

from __future__ import annotations

import os

# Before torch is imported anywhere: 2 threads on the 2-core machines made a small fwd+bwd ~80x slower than 1
# (shared/notes/stack-facts.md). Child processes of the sweep tests inherit these through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import CELL_MODES, make_model_folder, make_tokenizer, tiny_cell_settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests where CUDA is missing and ``hqq`` tests where the optional hqq package is: declared once
    here, never inferred from an exception."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("hqq") is None:
        skips["hqq"] = pytest.mark.skip(reason="needs the optional hqq package (README: pip install the [hqq] extra)")
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture
def hide_package(monkeypatch):
    """``hide_package(name)``: from then on ``importlib.util.find_spec(name)`` answers None, as on an installation
    without that package (what ``backends.require`` and ``backends.installed`` ask)."""
    hidden: set[str] = set()
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return hidden.add


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
