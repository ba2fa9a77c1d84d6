"""Self-describing results: the environment a number was measured in, and atomic JSON files.

Every result file carries the mode's full description, the model and its provenance, the settings, the
machine and library versions and the git commit, so tables and plots can be rendered from JSON alone.
"""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

SCHEMA = "qlora-bench/cell/1"
#: bench/'s test of the separate memory pass, whose pytest-benchmark record joins its cell's result.
MEMORY_PASS_TEST = "test_memory"
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def non_finite(data, key: str = "") -> list[str]:
    """Dotted keys (list items by index) of the NaN and infinite floats in a JSON tree, e.g.
    ``["perplexity.after.heldout.perplexity"]``."""
    if isinstance(data, dict):
        return [found for name, value in data.items() for found in non_finite(value, f"{key}.{name}" if key else name)]
    if isinstance(data, (list, tuple)):
        return [found for i, value in enumerate(data) for found in non_finite(value, f"{key}.{i}")]
    return [key] if isinstance(data, float) and not math.isfinite(data) else []


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON via a temporary file in the same folder and an atomic rename: readers see the
    old file or the complete new one, never half of it. NaN and infinity raise ``ValueError`` (they are not
    JSON, and a figure that is not finite must fail its cell, not enter a table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, allow_nan=False)
            out.write("\n")
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
    return path


class NotWritableError(ValueError):
    """A results folder that cannot be written (under a file, read-only, no permission)."""


def check_writable(folder: str | os.PathLike) -> None:
    """Raise ``NotWritableError`` unless results can be written in ``folder``, without leaving a trace: the
    folder, or its nearest existing parent when it does not exist yet, must be a folder where a file can be
    created (probed with a temporary one, since permission bits do not tell about read-only mounts)."""
    folder = Path(folder).absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise NotWritableError(f"cannot write results in {folder}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise NotWritableError(f"cannot write results in {folder}: {existing}: {error.strerror}") from None


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
    """Cell results from files or folders (every ``*.json`` directly in a folder, not in sub-folders).

    Two formats are read: cell results (``SCHEMA``, one per file, as the sweep and ``bench/`` write them) and
    pytest-benchmark JSON written by ``bench/`` (``cells_from_benchmark``); other files are skipped. When
    several files describe the same cell (same model label, mode and settings), as a ``bench/`` run's
    ``--bench-out`` folder and its ``--benchmark-json`` do, the one holding more information is kept.
    """
    results = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            data = json.loads(file.read_text())
            if isinstance(data, dict) and data.get("schema") == SCHEMA:
                results.append(data)
            elif is_benchmark_json(data):
                results += cells_from_benchmark(data)
    return _dedupe(results)


def model_label(result: dict) -> str:
    """The short model name tables use: the result's own label, else the one its settings imply (a shape's
    name, a folder's name), with the training path when it is not the reference one, so the two paths of one
    model and mode stay two rows."""
    from qlora_core.default_model import DEFAULT_MODEL

    settings = result.get("settings", {})
    label = (
        (result.get("model") or {}).get("label")
        or settings.get("shape")
        or Path(settings.get("model") or DEFAULT_MODEL).name
    )
    path = settings.get("path", "reference")
    return label if path == "reference" else f"{label} ({path} path)"


def is_benchmark_json(data) -> bool:
    """A pytest-benchmark ``--benchmark-json`` file (any suite's; only bench/'s yield cells)."""
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "machine_info" in data


def cells_from_benchmark(data: dict) -> list[dict]:
    """The cell results inside a pytest-benchmark JSON written by ``bench/``.

    The three benchmarks of one cell share their pytest parameter id. The perplexity benchmark carries the
    full cell result (``extra_info["cell"]``); to it are attached the same cell's memory pass (a separate
    process, ``extra_info["memory"]`` and ``["weights"]``) as ``memory_pass``, and pytest-benchmark's own
    statistics of the timed steps (seconds, round trip to the worker included) as
    ``training.benchmark_stats``. A cell that failed leaves no full result, only ``status`` and ``error`` in
    the extra_info of the benchmark that saw it fail: it becomes a failure result, as the sweep writes.
    """
    by_cell: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        key = bench.get("param") or bench.get("extra_info", {}).get("mode")
        by_cell.setdefault(key, []).append(bench)
    environment_ = data["machine_info"].get("qlora_bench")
    results = []
    for benches in by_cell.values():
        result = _cell_from_benchmarks(benches, environment_)
        if result is not None:
            results.append(result)
    return results


def _cell_from_benchmarks(benches: list[dict], environment_: dict | None) -> dict | None:
    memory_pass = [b for b in benches if b["name"].startswith(f"{MEMORY_PASS_TEST}[")]
    cell_benches = [b for b in benches if b not in memory_pass]
    infos = [bench.get("extra_info", {}) for bench in cell_benches]
    cell = next((copy.deepcopy(info["cell"]) for info in infos if "cell" in info), None)
    if cell is None:
        failed = next((info for info in infos if "status" in info and "settings" in info), None)
        if failed is None:
            return None
        return {"schema": SCHEMA, "status": failed["status"],
                "mode": {"name": failed["mode"]},
                "settings": failed["settings"], "error": failed.get("error"), "environment": environment_}
    cell.setdefault("environment", environment_)
    for bench in memory_pass:
        info = bench.get("extra_info", {})
        cell["memory_pass"] = {key: info[key] for key in ("memory", "weights", "settings", "status", "error")
                               if key in info}
        if "memory" in info:
            cell["memory_pass"]["load_s"] = bench["stats"]["median"]  # its benchmarked call: load, one round
    for bench, info in zip(cell_benches, infos):
        if "worker_timing" in info and cell.get("training"):
            stats = bench["stats"]
            cell["training"]["benchmark_stats"] = {
                "median_s": stats["median"], "iqr_s": stats["iqr"], "stddev_s": stats["stddev"],
                "mean_s": stats["mean"], "min_s": stats["min"], "max_s": stats["max"], "rounds": stats["rounds"],
            }
    return cell


def _cell_key(result: dict) -> tuple | None:
    """What identifies a cell across files; None for a result that does not say (never deduplicated)."""
    if "settings" not in result or "name" not in result.get("mode", {}):
        return None
    return model_label(result), result["mode"]["name"], json.dumps(result["settings"], sort_keys=True)


def _information(value) -> int:
    """How many values a JSON document holds (leaves of its tree)."""
    if isinstance(value, dict):
        return sum(map(_information, value.values()))
    if isinstance(value, list):
        return sum(map(_information, value))
    return 1


def _dedupe(results: list[dict]) -> list[dict]:
    """One result per cell, at the place of its first file, the fullest one where several describe it."""
    kept: list[dict] = []
    index: dict[tuple, int] = {}
    for result in results:
        key = _cell_key(result)
        if key is None or key not in index:
            if key is not None:
                index[key] = len(kept)
            kept.append(result)
        elif _information(result) > _information(kept[index[key]]):
            kept[index[key]] = result
    return kept
