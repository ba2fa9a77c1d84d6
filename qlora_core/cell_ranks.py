"""One cell across several processes of one host (``CellSettings.num_processes``): every rank trains on its rows of
each global batch, holding the whole quantized model (DDP: the adapters' gradients all-reduced) or its shards
(FSDP), each evaluation is computed once and recorded by rank 0 (``Cell.evaluate``), and the result is rank 0's
with each rank's memory and step times beside it.

``run_on_ranks`` (in the cell's own process) writes the settings and the tokenized inputs to a folder, starts
the ranks with ``distributed.torchrun`` on this module, and merges the per-rank results they write there. Each
rank (``main``) runs the ordinary ``Cell`` phases; the cell notices its rank from the environment torchrun sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from qlora_core.cell import Cell, CellInputs, CellSettings, failure_result
from qlora_core.distributed import torchrun
from qlora_core.results import write_cell_result

SETTINGS_FILE, INPUTS_FILE = "settings.json", "inputs.pt"


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank}.json"


def run_on_ranks(settings: CellSettings, inputs: CellInputs | None) -> dict:
    """The cell's result from ``settings.num_processes`` ranks: rank 0's, with ``ranks`` (each rank's memory
    readings and step seconds) added; a failure result when a rank failed or wrote nothing."""
    with tempfile.TemporaryDirectory(prefix="qlora-bench-cell-") as name:
        folder = Path(name)
        (folder / SETTINGS_FILE).write_text(json.dumps(settings.describe()))
        if inputs is not None:
            torch.save(inputs, folder / INPUTS_FILE)
        exit_code = torchrun(__name__, [str(folder)], settings.num_processes)
        results = {rank: json.loads(_rank_file(folder, rank).read_text())
                   for rank in range(settings.num_processes) if _rank_file(folder, rank).exists()}
    return merge_ranks(settings, results, exit_code)


def merge_ranks(settings: CellSettings, results: dict[int, dict], exit_code: int) -> dict:
    """Rank 0's result with ``ranks`` beside it: ``[{"rank", "memory", "step_seconds"}]``. The first failed rank's
    result (its rank named in the error) when one failed; a ``crashed`` result naming the ranks that wrote none
    when a rank died before writing."""
    for rank, result in sorted(results.items()):
        if result["status"] != "ok":
            return {**result, "error": f"rank {rank}: {result['error']}"}
    missing = [rank for rank in range(settings.num_processes) if rank not in results]
    if missing:
        return failure_result(settings, "crashed", f"torchrun exited {exit_code}; rank(s) {missing} wrote no "
                                                   f"result (the cell's log has their output)")
    ranks = [{"rank": rank, "memory": result["memory"], "step_seconds": result["training"]["step_seconds"]}
             for rank, result in sorted(results.items())]
    return {**results[0], "ranks": ranks}


def main(argv: list[str] | None = None) -> int:
    """One rank, started by ``run_on_ranks`` through torchrun: the cell's phases, its result written for the
    merge (a failure result when a phase raised, and exit code 1 so torchrun stops the other ranks)."""
    parser = argparse.ArgumentParser(description="one rank of a qlora-bench cell (started by torchrun)")
    parser.add_argument("folder", type=Path, help="where run_on_ranks put the settings and inputs")
    folder = parser.parse_args(argv).folder
    settings = CellSettings.from_dict(json.loads((folder / SETTINGS_FILE).read_text()))
    inputs_file = folder / INPUTS_FILE
    inputs = torch.load(inputs_file, weights_only=False) if inputs_file.exists() else None
    try:
        result = Cell(settings, inputs=inputs).run_all()
    except torch.cuda.OutOfMemoryError as error:
        result = failure_result(settings, "oom", f"{type(error).__name__}: {error}")
    except Exception as error:  # recorded as the cell's failure, with the traceback in its log
        traceback.print_exc()
        result = failure_result(settings, "error", f"{type(error).__name__}: {error}")
    write_cell_result(result, _rank_file(folder, int(os.environ["RANK"])))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
