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
from dataclasses import dataclass, field
from pathlib import Path

from qlora_core.result_model import SCHEMA, CellResult, Model, ResultError
from qlora_core.result_model import SCHEMA_PREFIX as CELL_SCHEMA_PREFIX  # any version: a newer one is refused by name

#: The manifest a sweep or bench/ run writes as ``run.json`` in its folder.
RUN_SCHEMA = "qlora-bench/run/1"
#: ``qlora-bench frontier``'s predictions.
FRONTIER_SCHEMA = "qlora-bench/frontier/1"
#: The classic workflow's records: ``finetune``'s summary and ``merge``'s report (``qlora_core.workflow``).
FINETUNE_SCHEMA = "qlora-bench/finetune/1"
MERGE_SCHEMA = "qlora-bench/merge/1"
#: bench/'s memory suite; in runs before 2026-12 a separate process, whose record joins its cell's result.
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
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "allocator_conf": allocator_conf(),
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


#: The environment variables that configure PyTorch's CUDA caching allocator (the second is the newer name).
ALLOCATOR_CONF_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_conf() -> str | None:
    """The CUDA caching allocator's configuration this process was started with (e.g.
    ``expandable_segments:True``), None for PyTorch's defaults. It changes what a capacity holds: under a memory
    cap, the allocator's fragmentation decides how close to the cap allocations can come."""
    values = [os.environ[name] for name in ALLOCATOR_CONF_VARIABLES if os.environ.get(name)]
    return ",".join(values) or None


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (from Linux's ``cpuinfo``), else the architecture: host-bound steps (small models,
    int8's synchronizing matmuls) run as fast as this CPU launches kernels, so two hosts of one GPU can differ."""
    try:
        with open(cpuinfo, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def share_as_umask_allows(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the permissions the umask allows (e.g. 0755 folders and 0644 files
    under umask 022): ``tempfile.mkdtemp`` creates 0700 and safetensors writes 0600, so on a shared runner
    others could not read an adapter or merged model. Executable files stay executable."""
    mask = _umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


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
    a half-written ``folder`` (an existing one is replaced only once the new one is complete). The folder gets
    the permissions the umask allows (``share_as_umask_allows``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write(staging)
        share_as_umask_allows(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_cell_result(result: dict, path: str | os.PathLike) -> Path:
    """Write a cell result (``cell.py``'s JSON) as ``write_json_atomic`` does, once ``CellResult.from_json``
    accepts it as valid: a malformed result fails where it is written (``ResultError``, naming the field), not
    when the run is reported, and leaves nothing at ``path``. Valid, not reportable: a cell of zero steps is
    written (the report skips it)."""
    CellResult.from_json(result, str(path), reportable=False)
    return write_json_atomic(result, path)


def read_results(paths: list[str | os.PathLike]) -> list[CellResult]:
    """The cell results under ``paths`` (files, or folders read recursively): ``read_paths(paths).results``."""
    return read_paths(paths).results


def read_runs(paths: list[str | os.PathLike]) -> list[dict]:
    """The run manifests (``RUN_SCHEMA``, each with its file as ``"path"``) under ``paths``, in file order."""
    return read_paths(paths).runs


@dataclass
class Reading:
    """What ``read_paths`` found: the cells and run manifests, and every file it looked at.

    Attributes:
        results: cell results, typed, one per cell (see ``read_paths``).
        runs: run manifests, each with ``"path"`` (its file) added.
        sources: files that gave at least one cell or manifest.
        skipped: (file, reason) for files meant for qlora-bench that could not be used (invalid JSON, a cell
            or manifest with fields missing): the caller warns about each.
        finetunes: the classic workflow's ``finetune`` summaries (``FINETUNE_SCHEMA``), each with ``"path"``.
        merges: its ``merge`` reports (``MERGE_SCHEMA``), each with ``"path"``.
        frontiers: the frontiers of ``qlora-bench frontier`` documents (``FRONTIER_SCHEMA``), one dict each: the
            frontier's own keys plus its document's ``"document"`` (file), ``"commit"``, ``"probe_allocator_conf"``
            (absent: the document predates the key) and ``"command"``.
        others: JSON files of other tools or other qlora-bench records (adapter configs, probe manifests): not
            results, not an error.
        repeated: cells measured again with the same model, mode and settings (another run), of which only one
            is kept: the caller says so.
    """

    results: list[CellResult] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    finetunes: list[dict] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)
    frontiers: list[dict] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    repeated: int = 0


def _json_files(path: Path) -> list[Path]:
    """``path`` itself, or every ``*.json`` under the folder, sorted; hidden files and folders (staging copies
    of atomic writes) are left out."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [path]
    return [file for file in sorted(path.rglob("*.json"))
            if not any(part.startswith(".") for part in file.relative_to(path).parts)]


def read_paths(paths: list[str | os.PathLike]) -> Reading:
    """Cell results, run manifests, workflow records and context frontiers from files or folders (every ``*.json``
    under a folder, at any depth).

    Six formats are read: cell results (``SCHEMA``, one per file, as the sweep and ``bench/`` write them),
    pytest-benchmark JSON written by ``bench/`` (``cells_from_benchmark``), run manifests (``RUN_SCHEMA``), the
    classic workflow's summaries and merge reports (``FINETUNE_SCHEMA``, ``MERGE_SCHEMA``) and ``qlora-bench
    frontier`` documents (``FRONTIER_SCHEMA``; one without the fields ``missing_frontier_fields`` names is skipped).
    A file that cannot be parsed, a cell the result model refuses (``CellResult.from_json``: a field missing or
    of the wrong type) or a manifest without the fields the report reads (``missing_run_fields``), is listed in ``skipped`` with the reason; other JSON is
    listed in ``others``. When several files describe the same cell (same model label, mode and settings), as
    a ``bench/`` run's ``--bench-out`` folder and its ``--benchmark-json`` do, the one holding more information
    is kept. Raises FileNotFoundError for a path that does not exist.
    """
    reading = Reading()
    cells = []
    for path in map(Path, paths):
        for file in _json_files(path):
            found, runs = _read_file(file, reading)
            cells += found
            reading.runs += runs
            if found or runs:
                reading.sources.append(file)
    unique, reading.repeated = _dedupe(cells)
    reading.results = label_setups(unique)
    return reading


#: Fields the report needs in a ``finetune`` summary (key paths; per-step times came later and are optional) and
#: in a ``merge`` report.
FINETUNE_FIELDS = (
    ("status",), ("mode", "name"), ("model", "label"), ("settings",), ("training", "losses"),
    ("training", "global_step"), ("training", "wall_s"), ("memory", "training_peak"), ("adapter_dir",),
)
MERGE_FIELDS = (
    ("mode", "name"), ("adapter_dir",), ("merged", "perplexity", "perplexity"), ("merged", "relative_delta"),
    ("base_plus_adapter", "perplexity", "perplexity"), ("tolerance", "relative_perplexity"), ("tolerance", "within"),
)
#: Where each workflow record goes in a ``Reading``: schema -> (attribute, required fields, what it is called).
WORKFLOW_RECORDS = {
    FINETUNE_SCHEMA: ("finetunes", FINETUNE_FIELDS, "finetune summary"),
    MERGE_SCHEMA: ("merges", MERGE_FIELDS, "merge report"),
}


def _read_workflow_record(file: Path, data: dict, reading: Reading) -> None:
    """The record into its list of ``reading`` (and its file into ``sources``), or the file into ``skipped``."""
    attribute, fields, what = WORKFLOW_RECORDS[data["schema"]]
    if missing := _missing(data, fields):
        reading.skipped.append((file, f"{what} without {', '.join(missing)}"))
    else:
        getattr(reading, attribute).append({**data, "path": str(file)})
        reading.sources.append(file)


#: Fields the frontier table needs in each frontier of a ``qlora-bench frontier`` document (``bytes_per_token`` is
#: null for a frontier of 0 tokens, but present). A measured one (``--measure``) also carries ``probes``.
FRONTIER_FIELDS = (("shape",), ("mode",), ("path",), ("capacity_bytes",), ("tokens",), ("limited_by",),
                   ("peak_bytes",), ("bytes_per_token",))
#: ... and then these, and ``tokens`` and ``status`` in each of its probes.
MEASURED_FRONTIER_FIELDS = (("measured_bytes_per_token",), ("confirmed",))
PROBE_FIELDS = (("tokens",), ("status",))


def missing_frontier_fields(document: dict) -> list[str]:
    """The fields a ``qlora-bench frontier`` document lacks for the frontier table, as dotted paths
    (``frontiers[0].probes.at.status``); empty for a usable one."""
    frontiers = document.get("frontiers")
    if not isinstance(frontiers, list):
        return ["frontiers[]"]
    missing = []
    for index, frontier in enumerate(frontiers):
        where = f"frontiers[{index}]."
        missing += _missing(frontier, FRONTIER_FIELDS, where)
        if isinstance(frontier, dict) and "probes" in frontier:
            missing += _missing(frontier, MEASURED_FRONTIER_FIELDS, where)
            probes = frontier["probes"]
            if not isinstance(probes, dict):
                missing.append(where + "probes{}")
                continue
            for probe, measured in probes.items():
                missing += _missing(measured, PROBE_FIELDS, f"{where}probes.{probe}.")
    return missing


def _read_frontiers(file: Path, document: dict, reading: Reading) -> None:
    """The document's frontiers into ``reading.frontiers`` (and its file into ``sources``), each with what its
    document says of it; or the file into ``skipped``."""
    if missing := missing_frontier_fields(document):
        reading.skipped.append((file, f"frontier document without {', '.join(missing)}"))
        return
    about = {"document": str(file), "commit": (document.get("environment") or {}).get("commit"),
             "command": document.get("command")}
    if "probe_allocator_conf" in document:
        about["probe_allocator_conf"] = document["probe_allocator_conf"]
    reading.frontiers += [{**frontier, **about} for frontier in document["frontiers"]]
    reading.sources.append(file)


def _read_file(file: Path, reading: Reading) -> tuple[list[CellResult], list[dict]]:
    """The valid cells and manifests in one file (workflow records and frontiers go straight into ``reading``);
    what is wrong with it goes to ``reading`` too."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reading.skipped.append((file, f"unreadable JSON ({error})"))
        return [], []
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == RUN_SCHEMA:
        missing = missing_run_fields(data)
        if missing:
            reading.skipped.append((file, f"run manifest without {', '.join(missing)}"))
            return [], []
        return [], [{**data, "path": str(file)}]
    if schema in WORKFLOW_RECORDS:
        _read_workflow_record(file, data, reading)
        return [], []
    if schema == FRONTIER_SCHEMA:
        _read_frontiers(file, data, reading)
        return [], []
    if schema == SCHEMA:
        candidates = [data]
    elif isinstance(schema, str) and schema.startswith(CELL_SCHEMA_PREFIX):
        reading.skipped.append((file, f"unsupported cell schema {schema!r} (this version reads {SCHEMA!r})"))
        return [], []
    elif is_benchmark_json(data):
        try:
            candidates = cells_from_benchmark(data)
        except (KeyError, TypeError, AttributeError) as error:  # another shape than bench/ writes
            reading.skipped.append((file, f"pytest-benchmark JSON not as bench/ writes it ({error!r})"))
            return [], []
    else:
        reading.others.append(file)
        return [], []
    cells = []
    for cell in candidates:
        try:
            cells.append(CellResult.from_json(cell))
        except ResultError as error:
            name = (cell.get("mode") or {}).get("name") if isinstance(cell.get("mode"), dict) else None
            what = f"cell {name}" if len(candidates) > 1 and name else "cell result"
            reading.skipped.append((file, what + str(error).removeprefix("cell result")))
    return cells, []


#: Fields of a run manifest's entry for one cell, and of the manifest itself.
RUN_CELL_FIELDS = (("name",), ("mode",), ("status",))
RUN_FIELDS = (("command",), ("started",), ("cells",))


def _has(data, keys: tuple[str, ...]) -> bool:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _missing(data: dict, fields, prefix: str = "") -> list[str]:
    return [prefix + ".".join(keys) for keys in fields if not _has(data, keys)]


def missing_cell_fields(result: dict) -> list[str]:
    """What ``result`` (a cell result's JSON) lacks for the report, as ``CellResult.from_json`` finds it: the
    missing fields' dotted paths, then the fields of the wrong type (each a sentence naming the field); empty for
    a usable cell result. The required fields are the result model's (``qlora_core.result_model``)."""
    try:
        CellResult.from_json(result)
    except ResultError as error:
        return error.missing + error.wrong
    return []


def missing_run_fields(manifest: dict) -> list[str]:
    """The fields a run manifest lacks for the report: its command, start time and cells (each with name, mode
    and status); empty for a usable one."""
    missing = _missing(manifest, RUN_FIELDS)
    cells = manifest.get("cells")
    if "cells" not in missing and not isinstance(cells, list):
        return missing + ["cells[]"]
    for index, entry in enumerate(cells or []):
        missing += _missing(entry, RUN_CELL_FIELDS, f"cells[{index}].")
    return missing


def describe_reading(reading: Reading, paths: list[str | os.PathLike]) -> str:
    """One line: how many cells, runs, workflow records and frontiers came from how many files under ``paths``,
    and what was left out."""
    where = ", ".join(map(str, paths))
    counts = [_count(len(reading.results), "cell")] + [
        _count(n, noun, plural) for n, noun, plural in (
            (len(reading.runs), "run manifest", None),
            (len(reading.finetunes), "finetune summary", "finetune summaries"),
            (len(reading.merges), "merge report", None),
            (len(reading.frontiers), "context frontier", None)) if n]
    what = counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " and " + counts[-1]
    line = f"read {what} from {_count(len(reading.sources), 'file')} in {where}"
    if reading.skipped:
        line += f"; skipped {len(reading.skipped)} unusable (warnings above)"
    if reading.others:
        line += f"; {len(reading.others)} other JSON not cells ({_short_list(reading.others, paths)})"
    if reading.repeated:
        line += (f"; {_count(reading.repeated, 'cell')} measured again with the same model, mode and settings, "
                 f"shown once: report each run apart to see both")
    return line


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


#: Files named in a one-line summary before "+N more" (a workflow folder holds dozens of adapter configs).
LISTED_FILES = 3


def _short_list(files: list[Path], paths: list[str | os.PathLike]) -> str:
    names = [_relative(file, paths) for file in files[:LISTED_FILES]]
    more = len(files) - LISTED_FILES
    return ", ".join(names) + (f", +{more} more" if more > 0 else "")


def _relative(file: Path, paths: list[str | os.PathLike]) -> str:
    """``file`` relative to the folder it was found under (as given when it was named directly)."""
    for path in map(Path, paths):
        if path.is_dir() and file.is_relative_to(path):
            return str(file.relative_to(path))
    return str(file)


def model_label(result: CellResult) -> str:
    """The short model name tables use: the result's own label, else the one its settings imply (a shape's
    name, a folder's name), with the training path when it is not the reference one, so the two paths of one
    model and mode stay two rows."""
    label = _base_label(result)
    path = result.settings.path or "reference"
    return label if path == "reference" else f"{label} ({path} path)"


def _base_label(result: CellResult) -> str:
    """``model_label`` without the training path."""
    from qlora_core.default_model import DEFAULT_MODEL

    settings = result.settings
    return result.label or settings.shape or Path(settings.model or DEFAULT_MODEL).name


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
    # a separate memory-pass process: bench/ before 2026-12 (its record holds the pass's memory); since then the
    # memory suite runs in the cell's own process and its record is one of the cell's
    memory_pass = [b for b in benches
                   if b["name"].startswith(f"{MEMORY_PASS_TEST}[") and "memory" in b.get("extra_info", {})]
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


def settings_as_today(described: dict) -> dict:
    """Cell settings as a result file holds them, with the defaults of settings added since it was written
    filled in (a setting is added with what ran before it as its default: the int8 matmul, the attention as
    loaded), as JSON holds them (tuples as lists); as written when they no longer read as today's settings (one
    since removed or renamed). Resuming, telling cells apart and labelling set-ups all compare these."""
    from qlora_core.cell import CellSettings  # the cell imports this module

    try:
        described = CellSettings.from_dict(described).describe()
    except (TypeError, ValueError):
        pass
    return json.loads(json.dumps(described))


def _cell_key(result: CellResult) -> tuple:
    """What identifies a cell across files: its model, mode and settings (``settings_as_today``)."""
    return model_label(result), result.mode.name, json.dumps(_setup(result), sort_keys=True)


def _information(value) -> int:
    """How many values a JSON document holds (leaves of its tree)."""
    if isinstance(value, dict):
        return sum(map(_information, value.values()))
    if isinstance(value, list):
        return sum(map(_information, value))
    return 1


#: Settings named first when one model was measured in several set-ups (``label_setups``).
SETUP_KEYS_FIRST = ("seq_len", "batch_size", "train.max_steps", "path", "lora.r")


def flatten_settings(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys (``train.max_steps``)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _setup(result: CellResult) -> dict:
    """A result's settings (``settings_as_today``) but its mode, flattened: what makes two cells of one model
    comparable."""
    settings = flatten_settings(settings_as_today(result.settings.to_json()))
    return {key: value for key, value in settings.items() if key != "mode"}


def _setup_suffixes(setups: dict[str, dict]) -> dict[str, str]:
    """For several set-ups of one model (signature -> flat settings): each one's suffix naming the settings
    that differ, ``SETUP_KEYS_FIRST`` first, as few as tell every set-up apart (all of them if need be: two
    labels alike would make two cells one row). A setting one set-up lacks reads ``unset`` there; a list reads
    as its items comma-separated, ``none`` when empty (``kernels=rms-norm,swiglu``, ``kernels=none``)."""
    first = {key: rank for rank, key in enumerate(SETUP_KEYS_FIRST)}

    def shown(setup: dict, key: str) -> str:
        if key not in setup:
            return "unset"
        value = setup[key]
        return (",".join(map(str, value)) or "none") if isinstance(value, list) else str(value)

    differing = sorted((key for key in set().union(*setups.values())
                        if len({shown(setup, key) for setup in setups.values()}) > 1),
                       key=lambda key: (first.get(key, len(first)), key))
    def tells_apart(keys: list[str]) -> bool:
        return len({tuple(shown(setup, key) for key in keys) for setup in setups.values()}) == len(setups)

    count = next((count for count in range(1, len(differing)) if tells_apart(differing[:count])), len(differing))
    keys = differing[:count]
    return {signature: ", ".join(f"{key}={shown(setup, key)}" for key in keys)
            for signature, setup in setups.items()}


def label_setups(results: list[CellResult]) -> list[CellResult]:
    """Results where one model label covers several set-ups (settings other than the mode), as when two runs
    of different profiles are read together, get labels that tell them apart: the label plus the settings
    that differ (``_setup_suffixes``), e.g. ``smollm2 [seq_len=512, batch_size=8]``. Otherwise every row of a
    model would compete for one baseline and one table column. Others are returned as they are; labelled ones
    as copies."""
    setups = [_setup(result) for result in results]
    signatures = [json.dumps(setup, sort_keys=True, default=str) for setup in setups]
    groups: dict[str, dict[str, dict]] = {}
    for result, setup, signature in zip(results, setups, signatures):
        groups.setdefault(model_label(result), {})[signature] = setup
    suffixes = {label: _setup_suffixes(group) for label, group in groups.items() if len(group) > 1}
    labelled = []
    for result, signature in zip(results, signatures):
        suffix = suffixes.get(model_label(result), {}).get(signature)
        if suffix is not None:
            label = f"{_base_label(result)} [{suffix}]"  # model_label adds the path after the set-up
            result = result.with_values(model=(result.model or Model.only()).with_values(label=label))
        labelled.append(result)
    return labelled


#: Seconds between the timestamps of two results of one cell that make them two measurements: a cell's own
#: files (its JSON, the pytest-benchmark entry built from it) are stamped within a second or two of each other,
#: and no measurement of a cell, process start included, takes less than this.
SAME_MEASUREMENT_S = 10


def _measured_at(result: CellResult) -> float | None:
    """When the result was stamped (``environment.timestamp``), in seconds since the epoch; None if unstamped."""
    stamp = result.environment and result.environment.timestamp
    return None if stamp is None else datetime.datetime.fromisoformat(stamp).timestamp()


def _measurements(times: list[float]) -> int:
    """How many measurements a cell's timestamps come from: groups of stamps within ``SAME_MEASUREMENT_S``."""
    times = sorted(times)
    return sum(1 for earlier, later in zip([None, *times], times)
               if earlier is None or later - earlier > SAME_MEASUREMENT_S)


def _dedupe(results: list[CellResult]) -> tuple[list[CellResult], int]:
    """One result per cell, at the place of its first file, the fullest one where several describe it; and how
    many other measurements of those cells were left out (``_measurements``), files of the same measurement (a
    ``bench/`` run's cell JSON and its pytest-benchmark JSON) not counted."""
    kept: list[CellResult] = []
    index: dict[tuple, int] = {}
    measured_at: dict[tuple, list[float]] = {}
    for result in results:
        key = _cell_key(result)
        if _measured_at(result) is not None:
            measured_at.setdefault(key, []).append(_measured_at(result))
        if key not in index:
            index[key] = len(kept)
            kept.append(result)
        elif _information(result.to_json()) > _information(kept[index[key]].to_json()):
            kept[index[key]] = result
    return kept, sum(_measurements(times) - 1 for times in measured_at.values())
