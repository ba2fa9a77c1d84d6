"""Self-describing results: the environment a number was measured in, and atomic JSON files.

Every result file carries the mode's full description, the model and its provenance, the settings, the
machine and library versions and the git commit, so tables and plots can be rendered from JSON alone.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SCHEMA = "qlora-bench/cell/1"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "qlora-bench")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the qlora-bench checkout this code runs from, with ``-dirty`` for local changes
    (``$QLORA_BENCH_COMMIT`` where the code travels without its git history, as to a lent GPU machine)."""
    if os.environ.get("QLORA_BENCH_COMMIT"):
        return os.environ["QLORA_BENCH_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here, capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Machine, accelerator, library versions and commit, as plain JSON."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return env


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON via a temporary file in the same folder and an atomic rename: readers see the
    old file or the complete new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, allow_nan=True)
            out.write("\n")
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
    return path


def publish_folder(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging)`` on a sibling temporary folder, then rename it to ``folder``: a crash never leaves
    a half-written ``folder`` (an existing one is replaced only once the new one is complete)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_results(paths: list[str | os.PathLike]) -> list[dict]:
    """Cell results from files or folders (every ``*.json`` in a folder), skipping files of other schemas."""
    results = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            data = json.loads(file.read_text())
            if isinstance(data, dict) and data.get("schema") == SCHEMA:
                results.append(data)
    return results
